"""Tensor parallelism with real processes over gloo: TP=2 and TP=4 equal TP=1 at
batch > 1 for both mask kinds (prefill and KV-cache decode), whatever the number
of partitions the checkpoint has on disk."""

from __future__ import annotations

import pytest

from model.config import GMASK_ID, MASK_ID
from model.distributed import RankError, run_local_ranks
from tp_jobs import batch_logits, paged_logits

pytestmark = [pytest.mark.processes, pytest.mark.slow]

TOL = 1e-4
ROWS = [
    ([20100, 20200, MASK_ID, 20300, 20400, 20002], [20800, 20900, 21000]),
    ([20500, 20600, 20700, 20750, 20760, 20770, 20780, GMASK_ID], [21100, 21200, 21300]),
    ([20123, MASK_ID], [20321, 20333, 20444]),
]
WIDTH = max(len(c) + 1 + len(g) for c, g in ROWS)
SPLIT = WIDTH - 3          # prefill the prompts, decode 3 tokens through the cache


@pytest.fixture(scope="module")
def checkpoints(checkpoint):
    # the same weights written as 1 and as 2 partitions
    return checkpoint("glm-tiny", tp=1, seed=11), checkpoint("glm-tiny", tp=2, seed=11)


@pytest.fixture(scope="module")
def baseline(checkpoints):
    return run_local_ranks(batch_logits, 1, checkpoints[0], ROWS, "float32", SPLIT)[0]


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_equals_tp1(checkpoints, baseline, tp):
    got = run_local_ranks(batch_logits, tp, checkpoints[0], ROWS, "float32", SPLIT)
    assert got[1:] == [None] * (tp - 1)       # only rank 0 reports
    assert max_diff(got[0], baseline) <= TOL


@pytest.mark.parametrize("tp", [1, 4])
def test_runtime_tp_differs_from_checkpoint_partitions(checkpoints, baseline, tp):
    # the same weights written as 2 partitions, loaded at TP 1 (merge) and TP 4 (split)
    got = run_local_ranks(batch_logits, tp, checkpoints[1], ROWS, "float32", SPLIT)
    assert max_diff(got[0], baseline) <= TOL


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_paged_steps_equal_the_reference_forward(checkpoints, tp):
    """The paged pool's packed steps (rows admitted while others decode, a resumed row) give
    the logits of the one-pass reference forward at every position they compute, at TP 1/2/4."""
    reference = run_local_ranks(batch_logits, 1, checkpoints[0], ROWS, "float32")[0]   # one pass, no cache
    got = run_local_ranks(paged_logits, tp, checkpoints[0], ROWS, "float32")
    assert got[1:] == [None] * (tp - 1)
    assert len(got[0]) == 8                     # 2 + 3 + 3 last tokens
    for (row, position), logits in got[0].items():
        assert (logits - reference[row][position]).abs().max().item() <= TOL, (row, position)


def test_a_failing_rank_fails_the_group_with_one_line(tmp_path):
    with pytest.raises(RankError) as err:
        run_local_ranks(batch_logits, 2, str(tmp_path / "missing"), ROWS, "float32", SPLIT)
    assert "\n" not in str(err.value) and "missing" in str(err.value)
