"""A request that fails on the workers fails alone (issue 10): in one process (TP=1, no
gRPC), a row whose sampling raises leaves the batch (``PrefillResponse.failed`` /
``DecodeResponse.failed`` name it with the reason), the other rows of its batch give
exactly their ``glm generate`` tokens, the rank stays healthy and serves the next
batch; parameters outside ``model.limits`` are refused before any forward, naming the
request; ``mask_position`` says which mask a blank fills. At TP=2 (real processes)
both ranks drop the failed row in the same step."""

from __future__ import annotations

import pytest

import isolation_jobs
from model.config import GMASK_ID, MASK_ID
from model.distributed import run_local_ranks
from model.runner import load_model
from model.sampling import Sampler
from services.common.errors import InvalidArgument
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.batch import ShardBatch
from services.worker.shard import Shard
from tests.worker_cases import PROMPTS, SAMPLED, Tokens, reference, request

POISON = isolation_jobs.POISON


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("glm-tiny", tp=1, seed=5))


@pytest.fixture
def shard(model):
    s = Shard(model, model_name="tiny", kv_memory_gib=0.001)
    s.warmup(pb.WarmupRequest(max_batch_size=2, max_input_tokens=16, max_total_tokens=32))
    return s


@pytest.fixture
def poison(monkeypatch):
    """Sampling raises for a row seeded ``POISON`` once it has generated ``at[0]`` tokens
    (a fault of that row alone: the batched draw raises, and so does that row's own)."""
    at = [0]
    plain = Sampler.choose

    def sample(self, logits, prompt_ids, output_ids):
        for seed, out in zip(self.seeds, output_ids):
            if seed == POISON and len(out) >= at[0]:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return plain(self, logits, prompt_ids, output_ids)

    monkeypatch.setattr(Sampler, "choose", sample)
    return at


def run(shard, batch):
    tokens, failed = Tokens(), {}
    reply = shard.prefill(pb.PrefillRequest(batch=batch))
    while True:
        failed.update({f.request_id: f.message for f in reply.failed})
        cached = tokens.add(reply)
        if cached is None:
            return tokens, failed
        assert not set(cached.request_ids) & set(failed)           # a failed row left the batch
        reply = shard.decode(pb.DecodeRequest(batches=[cached]))


@pytest.mark.parametrize("fail_at", [0, 2], ids=["prefill", "decode"])
def test_a_row_whose_sampling_fails_leaves_alone(shard, model, poison, fail_at):
    poison[0] = fail_at
    good = [request(1, PROMPTS["mask"], 6), request(2, PROMPTS["long_gmask"], 6, **SAMPLED),
            request(4, PROMPTS["mid_mask"], 5)]
    bad = request(3, PROMPTS["gmask"], 6, **dict(SAMPLED, seed=POISON))
    tokens, failed = run(shard, pb.Batch(id=1, requests=[good[0], good[1], bad, good[2]]))
    assert list(failed) == [3] and "sampling failed" in failed[3] and "inf, nan" in failed[3]
    assert len(tokens.ids.get(3, [])) == fail_at                 # what it had before it failed
    for req in good:                                             # neighbours: exactly their tokens
        assert tokens.ids[req.id] == reference(model, req), req.id
    assert not shard.batches
    # the rank is healthy and serves the next batch, the same request included
    assert shard.health().cached_batches == 0
    after, failed = run(shard, pb.Batch(id=2, requests=[request(5, PROMPTS["gmask"], 4)]))
    assert not failed and after.ids[5] == reference(model, request(5, PROMPTS["gmask"], 4))


def test_a_batch_whose_every_row_fails_is_no_row_fault(shard, monkeypatch):
    """When every row of several fails alone the fault is not one row's: it propagates."""
    def sample(self, *args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(Sampler, "choose", sample)
    batch = pb.Batch(id=1, requests=[request(1, PROMPTS["gmask"], 3), request(2, PROMPTS["mask"], 3)])
    with pytest.raises(RuntimeError, match="device lost"):
        shard.prefill(pb.PrefillRequest(batch=batch))


@pytest.mark.parametrize("field,value", [("temperature", 1e-38), ("repetition_penalty", 1e-38),
                                         ("temperature", 1e-6), ("repetition_penalty", 1e3)])
def test_parameters_outside_the_limits_are_refused_naming_the_request(model, field, value):
    req = request(7, PROMPTS["gmask"], 4, **{**SAMPLED, field: value})
    with pytest.raises(InvalidArgument, match=field) as refused:
        ShardBatch.from_pb(pb.Batch(id=1, requests=[request(6, PROMPTS["gmask"]), req]), model.config)
    assert refused.value.request_id == 7


def test_mask_position_names_the_blank(model, shard):
    """A context whose earlier content holds a generated [MASK]: the blank is the mask at
    ``mask_position``, with its kind's positions, not the first mask id in the ids."""
    ids = [20100, MASK_ID, 20200, GMASK_ID]
    req = request(1, ids, 3)
    req.mask_position = 3
    row = ShardBatch.from_pb(pb.Batch(id=1, requests=[req]), model.config).requests[0]
    assert row.blank.mask_pos == 3 and row.blank.use_gmask
    req.mask_position = 2
    with pytest.raises(InvalidArgument, match="mask_position"):
        ShardBatch.from_pb(pb.Batch(id=1, requests=[req]), model.config)


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [0, 2], ids=["prefill", "decode"])
def test_tp_ranks_drop_the_failed_row_in_step(checkpoint, fail_at):
    """TP=2 over gloo: rank 0's sampling raises for one row; rank 0 broadcasts it failed, so
    both ranks drop it in the same step and keep the same rows (the next collectives match),
    and the other rows give what TP=1 gives."""
    ckpt = checkpoint("glm-tiny", tp=1, seed=5)
    rows = [(PROMPTS["mask"], {"greedy": True}), (PROMPTS["gmask"], dict(SAMPLED, seed=isolation_jobs.POISON)),
            (PROMPTS["long_gmask"], SAMPLED)]
    ranks = run_local_ranks(isolation_jobs.decode_with_a_failing_row, 2, ckpt, rows, 5, fail_at)
    single = run_local_ranks(isolation_jobs.decode_with_a_failing_row, 1, ckpt, rows, 5, fail_at)[0]
    (held0, failed0, tokens0), (held1, failed1, _) = ranks
    assert failed0 == failed1 == [1] and held0 == held1
    assert all(1 not in ids for ids in held0[fail_at:])
    assert len(tokens0.get(1, [])) == fail_at
    assert {r: tokens0[r] for r in (0, 2)} == {r: single[2][r] for r in (0, 2)}
