"""Model configs (presets, config.json, validation) and the GLM_ environment defaults
of the command line."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import EOP_ID, PRESETS, GLMConfig
from services.cli.main import build_parser, main
from services.common.env import apply_env_defaults


def test_presets_and_130b_numbers():
    c = GLMConfig.from_name("glm-130b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.inner_hidden_size, c.vocab_size,
            c.max_sequence_length) == (70, 12288, 96, 32768, 150528, 2048)
    assert c.head_dim == 128 and c.alpha == pytest.approx(140 ** 0.5)
    with pytest.raises(ValueError, match="unknown model preset 'glm-7b'"):
        GLMConfig.from_name("glm-7b")
    for name, preset in PRESETS.items():
        for tp in (1, 2, 4):
            preset.check_tp(tp)
    PRESETS["glm-130b"].check_tp(8)
    PRESETS["glm-small"].check_tp(8)
    with pytest.raises(ValueError, match="does not divide num_attention_heads"):
        PRESETS["glm-tiny"].check_tp(8)


@pytest.mark.parametrize("change,needle", [
    ({"hidden_size": 65}, "not divisible by num_attention_heads"),
    ({"num_layers": 0}, "num_layers must be a positive integer"),
    ({"vocab_size": EOP_ID}, "must cover the special ids"),
    ({"hidden_size": 12, "num_attention_heads": 4}, "must be even"),
])
def test_invalid_configs_name_the_problem(change, needle):
    base = GLMConfig.from_name("glm-tiny").to_json_dict() | change
    with pytest.raises(ValueError, match=needle):
        GLMConfig.from_json_dict(base)


def test_smallest_vocabulary_that_holds_sop_and_eop():
    cfg = GLMConfig.from_json_dict(GLMConfig.from_name("glm-tiny").to_json_dict() | {"vocab_size": EOP_ID + 1})
    cfg.check_tp(2)
    with pytest.raises(ValueError, match="does not divide vocab_size"):
        cfg.check_tp(4)


def test_config_json_round_trip_and_errors(tmp_path):
    assert GLMConfig.for_checkpoint(tmp_path) == PRESETS["glm-130b"]          # absent file
    PRESETS["glm-tiny"].write_json(tmp_path)
    assert GLMConfig.for_checkpoint(tmp_path) == PRESETS["glm-tiny"]
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(data | {"hiden_size": 3}))
    with pytest.raises(ValueError, match="unknown key.*hiden_size"):
        GLMConfig.for_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GLMConfig.for_checkpoint(tmp_path)


def test_env_defaults_fill_flags_and_flags_win():
    parser = build_parser()
    apply_env_defaults(parser, {"GLM_GENERATE_TP": "2", "GLM_GENERATE_JSON": "yes", "GLM_GENERATE_CHECKPOINT": "/ckpt",
                                "GLM_TP": "8"})     # a service's variable: not generate's
    args = parser.parse_args(["generate", "--prompt-ids", "1,150001"])
    assert (args.tp, args.json, args.checkpoint) == (2, True, "/ckpt")
    args = parser.parse_args(["generate", "--prompt-ids", "1,150001", "--tp", "4"])
    assert args.tp == 4


def test_bad_env_value_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("GLM_PLAN_TP", "two")
    with pytest.raises(SystemExit):
        main(["plan", "--tp", "1", "--gpu-memory-gib", "24"])
    assert "GLM_PLAN_TP='two'" in capsys.readouterr().err


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    from model import runner

    assert runner.native_bf16(frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"}))
    assert runner.native_bf16(frozenset({"amx_bf16", "amx_tile"}))
    assert runner.native_bf16(frozenset({"fp", "asimd", "bf16"}))                  # Arm
    assert not runner.native_bf16(frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}))   # emulated only
    monkeypatch.setattr(runner, "native_bf16", lambda flags=None: False)
    assert runner.parse_dtype("auto") == torch.float32
    assert runner.parse_dtype("auto", "cuda") == torch.float16
    monkeypatch.setattr(runner, "native_bf16", lambda flags=None: True)
    assert runner.parse_dtype("auto", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*or auto"):
        runner.parse_dtype("fp8")
