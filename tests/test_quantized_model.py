"""Weight-only quantization in the model: quantize-after-shard equals the official
per-shard semantics, the quantized model equals a model holding the dequantized
weights (fp32 path) at TP 1 and 2, and pre-quantized checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch

from glm_reference import forward as reference_forward
from kernels import dequantize, quantize
from model.checkpoint import CheckpointError, inspect_checkpoint, read_rank_state
from model.config import GMASK_ID, MASK_ID, GLMConfig
from model.convert import convert_checkpoint
from model.distributed import run_local_ranks
from model.prompt import Blank
from model.quantization import QuantSpec, ROW_PARALLEL_SUFFIXES, is_quantized_weight, layer_suffix
from model.runner import load_model
from tp_jobs import batch_logits, dequantized_state

pytestmark = [pytest.mark.processes, pytest.mark.slow]     # ranks are real processes (run_local_ranks)
TOL = 1e-4
ROWS = [
    ([20100, 20200, MASK_ID, 20300, 20400, 20002], [20800, 20900]),
    ([20500, 20600, 20700, GMASK_ID], [21100, 21200]),
]
CONFIG = GLMConfig.from_name("glm-tiny")


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=21)


@pytest.fixture(scope="module")
def fp16_state(ckpt):
    return read_rank_state(inspect_checkpoint(ckpt), 1, 0)


def official_dequantized(state: dict, bits: int, tp: int) -> dict:
    """The global weights the official code computes with at ``tp``: each rank's fp16
    shard quantized on its own (row-parallel weights split on the input dim)."""
    out = {}
    for key, w in state.items():
        if not is_quantized_weight(key):
            out[key] = w.float()
            continue
        dim = 1 if layer_suffix(key) in ROW_PARALLEL_SUFFIXES else 0
        parts = w.chunk(tp, dim=dim) if dim == 1 else [w]   # column splits keep per-row scales
        out[key] = torch.cat([dequantize(quantize(p, bits), torch.float32) for p in parts], dim=dim)
    return out


def reference_logits(state: dict) -> list[torch.Tensor]:
    out = []
    for context, generated in ROWS:
        blank = Blank.first(context)
        out.append(reference_forward(state, CONFIG, blank.input_ids + generated, blank.mask_pos,
                                     blank.use_gmask, blank.context_length + 1))
    return out


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tp", [1, 2])
def test_quantized_model_equals_official_per_shard_dequantized(ckpt, fp16_state, bits, tp):
    got = run_local_ranks(batch_logits, tp, ckpt, ROWS, "float32", None, f"int{bits}")[0]
    expected = reference_logits(official_dequantized(fp16_state, bits, tp))
    assert max_diff(got, expected) <= TOL
    if tp == 2:   # the row-parallel scales really differ from the TP=1 ones
        assert max_diff(got, reference_logits(official_dequantized(fp16_state, bits, 1))) > 10 * TOL


def test_quantized_rank_weights_are_the_per_shard_quantization(ckpt, fp16_state):
    ranks = run_local_ranks(dequantized_state, 2, ckpt, "int8")
    dense = fp16_state["transformer.layers.1.attention.dense.weight"]
    for rank, state in enumerate(ranks):
        mine = state["transformer.layers.1.attention.dense.weight"]
        shard = dense.chunk(2, dim=1)[rank]
        assert torch.equal(mine, dequantize(quantize(shard, 8), torch.float32))


def test_int8_error_is_below_int4_error(ckpt):
    # (the sizes on the demo and a GLM-130B-shaped shard are measured in docs/quantization.md)
    dense = batch_logits_local(ckpt, None)
    rel = {}
    for bits in (8, 4):
        q = batch_logits_local(ckpt, f"int{bits}")
        rel[bits] = sum((a - b).norm().item() / a.norm().item() for a, b in zip(dense, q)) / len(q)
    assert 0 < rel[8] < rel[4] / 4, rel


def batch_logits_local(ckpt, quant):
    from model.parallel import ParallelContext

    return batch_logits(ParallelContext(), ckpt, ROWS, "float32", None, quant)


@pytest.mark.parametrize("bits", [8, 4])
def test_prequantized_checkpoint_round_trip(ckpt, tmp_path, bits):
    out = tmp_path / f"int{bits}"
    info = convert_checkpoint(ckpt, out, 2, progress=False, quant=QuantSpec(bits))
    assert info.quant == QuantSpec(bits) and info.num_partitions == 2
    shards = [read_rank_state(info, 2, r) for r in range(2)]
    source = [read_rank_state(inspect_checkpoint(ckpt), 2, r) for r in range(2)]
    key = "transformer.layers.0.mlp.dense_4h_to_h.weight"
    for rank in range(2):
        qw = quantize(source[rank][key], bits)
        assert torch.equal(shards[rank][key], qw.values) and shards[rank][key].dtype == torch.int8
        assert torch.equal(shards[rank][key + "_scale"], qw.scale)
        assert shards[rank][key + "_scale"].dtype == torch.float16
    # loading the pre-quantized files computes what quantizing at load computes
    pre = run_local_ranks(batch_logits, 2, str(out), ROWS, "float32", None, None)[0]
    live = run_local_ranks(batch_logits, 2, ckpt, ROWS, "float32", None, f"int{bits}")[0]
    assert max_diff(pre, live) == 0.0


def test_prequantized_split_is_exact_and_merge_is_refused(ckpt, tmp_path):
    one = convert_checkpoint(ckpt, tmp_path / "q1", 1, progress=False, quant=QuantSpec(8))
    two = convert_checkpoint(one.directory, tmp_path / "q2", 2, progress=False)
    assert two.quant == QuantSpec(8)
    base = batch_logits_local(str(one.directory), None)
    split = run_local_ranks(batch_logits, 2, str(two.directory), ROWS, "float32", None, None)[0]
    assert max_diff(base, split) <= TOL
    with pytest.raises(CheckpointError, match="merging them would mean re-quantizing"):
        convert_checkpoint(two.directory, tmp_path / "back", 1, progress=False)
    with pytest.raises(CheckpointError, match="already quantized"):
        convert_checkpoint(one.directory, tmp_path / "q4", 1, progress=False, quant=QuantSpec(4))
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(str(one.directory), quant="int4")


def test_group_wise_checkpoint_reshards_both_ways(ckpt, tmp_path):
    spec = QuantSpec(4, 8)
    two = convert_checkpoint(ckpt, tmp_path / "g2", 2, progress=False, quant=spec)
    assert two.quant == spec
    one = convert_checkpoint(two.directory, tmp_path / "g1", 1, progress=False)   # merge is exact
    a = run_local_ranks(batch_logits, 2, str(two.directory), ROWS, "float32", None, None)[0]
    b = batch_logits_local(str(one.directory), None)
    assert max_diff(a, b) <= TOL


def test_bfloat16_cpu_fast_path_tracks_fp32(ckpt):
    fp32 = batch_logits_local(ckpt, "int8")
    from model.parallel import ParallelContext

    bf16 = batch_logits(ParallelContext(), ckpt, ROWS, "bfloat16", None, "int8")
    for a, b in zip(fp32, bf16):
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
        assert (a - b).abs().max().item() <= 0.1 * a.abs().max().item()
