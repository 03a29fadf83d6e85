"""``glm bench step`` (services/bench/step.py, step_report.py): the figures are derived from
what was measured and what the shard holds (bytes = stored weights + KV read, the bandwidth
fraction uses the bandwidth measured in the run), ``glm plan``'s weights equal the bytes a
shard really holds (the CPU kernels' repacked copies included), the command prints a table
and JSON with the CPU's flags, and TP 2 runs real ranks."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import cpu_gemm_f32
from kernels.cpu_dense import choose_layout

from model.config import dummy_config
from model.dummy import build_dummy_model
from model.plan import weight_bytes
from services.bench.step import StepBench, bench_rank, run, shard_bytes
from services.bench.step_report import decode_row, memory_rows
from services.cli.main import main
from model.parallel import ParallelContext

TINY = dict(load_format="dummy", preset="glm-tiny", num_layers=1, batches=(1, 3), prompt_tokens=16,
            context_tokens=8, steps=2, warmup=1, bandwidth_gib=0.02)


def held_bytes(model) -> int:
    """Every byte the shard holds: its tensors plus what the kernel ops repacked and the tied
    head's packed copy."""
    ops = [m.op for m in model.modules() if getattr(m, "op", None) is not None and hasattr(m.op, "qw")]
    repacked = sum(op.nbytes - op.qw.nbytes for op in ops)
    return sum(t.nbytes for t in model.state_dict().values()) + repacked + model.transformer.word_embeddings.head_nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
@pytest.mark.parametrize("tp", [1, 2])
def test_plan_weights_equal_the_bytes_a_shard_holds(dtype, quant, tp):
    config = dummy_config("glm-small", 1)
    ctx = ParallelContext(rank=tp - 1, world_size=tp, group=object()) if tp > 1 else ParallelContext()
    model = build_dummy_model(config, ctx, dtype=dtype, quant=None if quant == "none" else quant)
    size = torch.empty((), dtype=dtype).element_size()
    bf16 = dtype == torch.bfloat16
    head = model.transformer.word_embeddings.head
    if head.layout == "panels":              # fp32 where kernels.cpu_gemm_f32 measured faster
        assert dtype == torch.float32 and cpu_gemm_f32.kernel() is not None
    else:
        assert head.layout == choose_layout(dtype)
    predicted = weight_bytes(config, quant=quant, tp=tp, dtype_bytes=size, cpu_kernels=bf16,
                             head_copy=head.layout in ("packed", "panels"))
    assert predicted == held_bytes(model)


def test_decode_figures_follow_from_the_timings_and_the_shard():
    rank = {"config": {"num_layers": 2, "hidden_size": 64}, "hidden_local": 64, "dtype_bytes": 2,
            "bytes": {"layers": 1000, "embedding": 4000, "other": 24}, "linear_params": 500, "vocab_local": 100}
    row = {"batch": 4, "kv_length": 10, "forward": [0.010, 0.020, 0.030], "step": [0.012, 0.024, 0.036],
           "head": [0.004] * 3, "embed": [0.001] * 3}
    got = decode_row(rank, row, tp=1, bandwidth=1e6)
    kv = 2 * 2 * 4 * 10 * 64 * 2
    assert got["bytes"] == {"weights": 5024, "kv_cache": kv, "total": 5024 + kv}
    assert got["forward_ms"]["median"] == pytest.approx(20.0) and got["step_over_forward"] == pytest.approx(1.2)
    assert got["layer_ms"] == pytest.approx((20 - 4 - 1) / 2)
    assert got["forward_bandwidth_fraction"] == pytest.approx((5024 + kv) / 0.020 / 1e6)
    assert got["head_bandwidth_fraction"] == pytest.approx(4000 / 0.004 / 1e6)
    assert got["forward_gflop_s"] == pytest.approx((2 * 4 * (500 + 100 * 64) + 4 * 4 * 10 * 64 * 2) / 0.020 / 1e9)
    assert got["step_tok_s"] == pytest.approx(4 / 0.024)
    doubled = decode_row(rank, row, tp=2, bandwidth=1e6)                 # two ranks' bytes, one's time
    assert doubled["bytes"]["total"] == 2 * got["bytes"]["total"]


def test_one_rank_measures_every_batch_and_the_prefill():
    bench = StepBench(**TINY, dtype="bfloat16", quant="int8")
    rank = bench_rank(ParallelContext(), bench)
    assert [r["batch"] for r in rank["decode"]] == [1, 3]
    for r in rank["decode"]:
        assert all(len(r[k]) == bench.steps and min(r[k]) > 0 for k in ("forward", "step", "head", "embed"))
        assert r["kv_length"] > bench.context_tokens
    assert rank["prefill"]["tokens"] == 16 and rank["quant"] == "int8"
    # RSS readings, not growth: in a process that freed memory before (an earlier test), the
    # shard may be built in pages already resident; growth is measured at full width (docs).
    assert min(rank["rss_before_build"], rank["rss_after_build"], rank["rss_end"]) > 0
    model = build_dummy_model(dummy_config("glm-tiny", 1), dtype=torch.bfloat16, quant="int8")
    assert rank["bytes"] == shard_bytes(model)
    memory = memory_rows(bench, [rank])[0]
    assert memory["plan_weights"] == held_bytes(model)
    assert memory["built"] == rank["rss_after_build"] - rank["rss_before_build"]
    assert memory["stored"] == sum(rank["bytes"].values())


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="needs a model"):
        StepBench()
    with pytest.raises(ValueError, match="drop --checkpoint"):
        StepBench(checkpoint="/c", load_format="dummy")
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        StepBench(**{**TINY, "steps": 0})


def test_the_command_prints_json_with_the_cpu_flags(capsys):
    assert main(["bench", "step", "--load-format", "dummy", "--preset", "glm-tiny", "--num-layers", "1",
                 "--batch", "2", "--prompt-tokens", "8", "--context-tokens", "4", "--steps", "1", "--warmup", "0",
                 "--bandwidth-gib", "0.02", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["cpu_flags"] and report["decode"][0]["batch"] == 2
    assert report["memory"][0]["plan_weights"] > 0 and report["read_bandwidth_gb_s"] > 0
    with pytest.raises(SystemExit):
        main(["bench", "step", "--load-format", "dummy", "--batch", "0"])


@pytest.mark.processes
def test_tp2_runs_two_real_ranks():
    report = run(StepBench(**TINY, tp=2))
    assert [m["rank"] for m in report["memory"]] == [0, 1]
    row = report["decode"][1]
    assert row["bytes"]["total"] == 2 * sum(report["shard_bytes"].values()) + row["bytes"]["kv_cache"]
