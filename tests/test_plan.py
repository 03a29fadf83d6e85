"""``model.plan`` against the official hardware table (``G130: README.md``), the derived
weight and KV-cache sizes (``docs/model.md`` "Quantization"), and ``glm plan`` as a real
process."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import GLMConfig
from model.plan import GIB, MIB, RESERVE_BYTES, max_batch_tokens, plan_memory, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
GLM_130B = GLMConfig.from_name("glm-130b")
A100_40G = 40.0
RTX_3090 = 24576 / 1024  # "24 GB" marketing = 24576 MiB
RTX_2080_TI = 11264 / 1024  # "11 GB" marketing = 11264 MiB
V100_32G = 32.0

# (gpus, GiB per GPU, quant, fits) for 2048-token generation at batch 1 (G130: README.md;
# the two no-fit rows are the table's minimums one step down, issue #27).
TABLE = [
    (8, A100_40G, "none", True),
    (8, V100_32G, "int8", True),
    (8, RTX_3090, "int8", True),
    (4, RTX_3090, "int4", True),
    (8, RTX_2080_TI, "int4", True),
    (4, RTX_3090, "int8", False),
    (4, RTX_2080_TI, "int4", False),
]


def _plan(**kw):
    args = dict(quant="int4", tp=4, gpu_memory_gib=RTX_3090)
    args.update(kw)
    return plan_memory(GLM_130B, **args)


@pytest.mark.parametrize("gpus,gib,quant,fits", TABLE,
                         ids=[f"{n}x{g:g}GiB-{q}" for n, g, q, _ in TABLE])
def test_official_hardware_table(gpus, gib, quant, fits):
    plan = plan_memory(GLM_130B, quant=quant, tp=gpus, gpu_memory_gib=gib, max_tokens=2048)
    margin = plan.headroom / GIB
    print(f"{gpus}x{gib:g} GiB {quant}: {plan.total / GIB:.2f} GiB/GPU, headroom {margin:+.2f} GiB")
    assert plan.fits is fits
    assert plan.fits == (plan.total <= gib * GIB)
    # The verdict is not a coin toss: each case clears its line by a visible margin.
    assert abs(plan.headroom) > 0.5 * GIB


@pytest.mark.parametrize("quant,derived_gib", [("none", 239.7), ("int8", 121.6), ("int4", 62.5)])
@pytest.mark.parametrize("tp", [1, 4, 8])
def test_weight_totals_match_derived_numbers(quant, derived_gib, tp):
    total = weight_bytes(GLM_130B, quant=quant, tp=tp) * tp / GIB
    # tp > 1 adds the replicated LayerNorms/biases and the row-parallel scales per rank.
    assert derived_gib - 0.05 <= total <= derived_gib + 0.05 + 0.02 * (tp - 1)


def test_kv_cache_is_3_44_mb_per_token_over_ranks():
    for tp in (1, 2, 4, 8):
        plan = _plan(quant="int8", tp=tp, max_tokens=2048, batch=3)
        per_token = plan.kv_cache * tp / (2048 * 3)
        assert per_token == 2 * 70 * 12288 * 2 == plan.kv_bytes_per_token * tp
        assert round(per_token / 1e6, 2) == 3.44
    assert round(_plan(tp=8, max_tokens=2048).kv_cache * 8 / 1e9, 2) == 7.05


def test_parts_add_up_and_serialize():
    plan = _plan()
    assert plan.total == plan.weights + plan.kv_cache + plan.activations + plan.reserve
    assert plan.reserve == RESERVE_BYTES
    d = plan.to_dict()
    assert d["fits"] is True and d["per_gpu_gib"] == round(plan.total / GIB, 3)
    for part in ("weights", "kv_cache", "activations", "reserve", "headroom"):
        assert d[f"{part}_gib"] == round(getattr(plan, part) / GIB, 3)
    json.dumps(d)


def test_more_tokens_or_batch_needs_more_memory():
    previous = None
    for tokens in (1, 128, 512, 1024, 2048):
        plan = _plan(max_tokens=tokens)
        if previous is not None:
            assert plan.kv_cache > previous.kv_cache and plan.total > previous.total
        previous = plan
    totals = [_plan(batch=b, max_tokens=512).total for b in (1, 2, 4, 8)]
    assert totals == sorted(set(totals))
    assert _plan(tp=8).total < _plan(tp=4).total
    assert _plan(quant="int4").weights < _plan(quant="int8").weights < _plan(quant="none").weights


def test_quantization_formats():
    per_row = _plan(quant="int4").weights
    grouped = _plan(quant="int4", group_size=128).weights
    assert grouped > per_row  # more fp16 scales
    assert _plan(quant="int4", dtype_bytes=4).weights > per_row  # fp32 embedding, norms, biases
    assert _plan(quant="none").activations < _plan(quant="int8").activations  # no dequant buffer


def test_max_batch_tokens_fills_what_is_left():
    plan = _plan()
    tokens = max_batch_tokens(plan)
    assert tokens > plan.max_tokens * plan.batch
    per_token = plan.kv_bytes_per_token
    used = plan.weights + plan.activations + plan.reserve
    assert used + tokens * per_token <= plan.gpu_memory < used + (tokens + 1) * per_token
    assert max_batch_tokens(_plan(quant="int8")) == 0  # weights alone overflow
    assert plan.to_dict()["max_batch_tokens"] == tokens


@pytest.mark.parametrize("kw,field", [
    (dict(tp=3), "tp"),
    (dict(tp=0), "tp"),
    (dict(tp=64), "tp"),
    (dict(quant="int3"), "quant"),
    (dict(quant="fp16"), "quant"),
    (dict(gpu_memory_gib=0), "gpu_memory_gib"),
    (dict(gpu_memory_gib=-24), "gpu_memory_gib"),
    (dict(gpu_memory_gib=float("nan")), "gpu_memory_gib"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2049), "max_tokens"),
    (dict(batch=0), "batch"),
    (dict(batch=1.5), "batch"),
    (dict(dtype_bytes=3), "dtype_bytes"),
    (dict(group_size=0), "group_size"),
    (dict(group_size=100), "group_size"),
    (dict(quant="none", group_size=128), "group_size"),
])
def test_bad_inputs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        _plan(**kw)


def test_rejects_non_config():
    with pytest.raises(ValueError, match="config"):
        plan_memory("glm-130b", quant="int4", tp=4, gpu_memory_gib=24)


def glm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli.main", "plan", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("gpus,gib,quant,fits", [TABLE[3], TABLE[4], TABLE[5], TABLE[6]])
@pytest.mark.processes                 # the glm CLI as a subprocess
def test_cli_json_matches_table(gpus, gib, quant, fits):
    out = glm("--model", "glm-130b", "--quant", quant, "--tp", str(gpus),
              "--gpu-memory-gib", str(gib), "--max-tokens", "2048", "--json")
    assert out.returncode == 0, out.stderr  # no-fit is an answer, not an error
    data = json.loads(out.stdout)
    assert data["fits"] is fits
    expected = plan_memory(GLM_130B, quant=quant, tp=gpus, gpu_memory_gib=gib)
    assert data["per_gpu_gib"] == pytest.approx(expected.total / GIB, abs=1e-3)


@pytest.mark.processes
def test_cli_table_fp16_alias_and_checkpoint_folder(tmp_path):
    GLMConfig.from_name("glm-tiny").write_json(tmp_path)
    out = glm("--model", str(tmp_path), "--quant", "fp16", "--tp", "2",
              "--gpu-memory-gib", "2", "--max-tokens", "512", "--batch", "2")
    assert out.returncode == 0, out.stderr
    assert "fits" in out.stdout and "yes" in out.stdout and "quant=none" in out.stdout
    tiny = plan_memory(GLMConfig.from_name("glm-tiny"), quant="none", tp=2, gpu_memory_gib=2,
                       max_tokens=512, batch=2)
    assert f"{tiny.total / GIB:.2f} GiB per GPU" in out.stdout
    assert tiny.reserve == 1024 * MIB


@pytest.mark.parametrize("args,needle", [
    (["--tp", "3", "--gpu-memory-gib", "24"], "tp"),
    (["--tp", "4", "--gpu-memory-gib", "0"], "gpu_memory_gib"),
    (["--tp", "4", "--gpu-memory-gib", "24", "--max-tokens", "4096"], "max_tokens"),
    (["--model", "no-such-model", "--tp", "4", "--gpu-memory-gib", "24"], "--model"),
])
@pytest.mark.processes
def test_cli_bad_input_is_one_line_error(args, needle):
    out = glm(*args)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glm plan: error:") and needle in lines[0]


def test_a_shortened_model_on_cpu_kernels_counts_its_layers_and_the_repacked_copies(capsys):
    """``glm plan --num-layers 2 --cpu-kernels``: two 130B layers, with what the CPU int4 kernel
    repacks (its own copy of the values) on top of the canonical weights."""
    from services.cli.main import main

    assert main(["plan", "--num-layers", "2", "--quant", "int4", "--tp", "1", "--gpu-memory-gib", "80",
                 "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["weights_gib"]
    assert main(["plan", "--num-layers", "2", "--quant", "int4", "--tp", "1", "--gpu-memory-gib", "80",
                 "--cpu-kernels", "--json"]) == 0
    cpu = json.loads(capsys.readouterr().out)["weights_gib"]
    short = dataclasses.replace(GLM_130B, num_layers=2)
    assert plain == round(weight_bytes(short, quant="int4", tp=1) / GIB, 3)
    assert cpu > plain and cpu == round(weight_bytes(short, quant="int4", tp=1, cpu_kernels=True,
                                                                      head_copy=True) / GIB, 3)
    assert main(["plan", "--num-layers", "71", "--tp", "1", "--gpu-memory-gib", "80"]) == 2
