"""``glm generate``, ``glm convert`` and ``glm init-tiny`` as scripts use them:
JSON output, TP=2 equal to TP=1 through real processes, and one-line errors with
a non-zero exit for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import inspect_checkpoint, read_rank_state, save_checkpoint
from services.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
MASK_IDS = "20100,20200,150000,20300,20002"
GMASK_IDS = "20500,20600,20700,150001"


def glm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=9)


def generate_json(ckpt, *extra: str) -> dict:
    out = glm("generate", "--checkpoint", ckpt, "--json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.processes                 # glm as a script (subprocess)
@pytest.mark.slow
@pytest.mark.parametrize("ids", [MASK_IDS, GMASK_IDS], ids=["mask", "gmask"])
def test_greedy_json_tp2_equals_tp1(ckpt, ids):
    one = generate_json(ckpt, "--prompt-ids", ids, "--greedy", "--max-new-tokens", "6")
    two = generate_json(ckpt, "--prompt-ids", ids, "--greedy", "--max-new-tokens", "6", "--tp", "2")
    assert one["token_ids"] == two["token_ids"] and len(one["token_ids"]) == 6
    assert one["logprobs"] == pytest.approx(two["logprobs"], abs=1e-4)
    assert all(lp <= 0 for lp in one["logprobs"]) and isinstance(one["text"], str)
    assert one["finish_reason"] == "length"


@pytest.mark.processes                 # glm as a script (subprocess)
@pytest.mark.slow
def test_beam_search_tp2_equals_tp1(ckpt):
    args = ("--prompt-ids", MASK_IDS, "--num-beams", "3", "--greedy", "--max-new-tokens", "4",
            "--no-repeat-ngram-size", "2", "--length-penalty", "0.8")
    one, two = generate_json(ckpt, *args), generate_json(ckpt, *args, "--tp", "2")
    assert one["token_ids"] == two["token_ids"] and len(one["token_ids"]) == 4


@pytest.mark.processes                 # glm as a script (subprocess)
@pytest.mark.slow
def test_text_prompt_fills_every_blank(ckpt):
    out = generate_json(ckpt, "--prompt", "Alpha [MASK] beta [MASK] gamma", "--max-new-tokens", "3",
                        "--temperature", "0.7", "--top-k", "40", "--seed", "3")
    assert len(out["blanks"]) == 2
    assert out["token_ids"] == out["blanks"][0]["token_ids"] + out["blanks"][1]["token_ids"]
    assert out["output_text"].startswith("Alpha") and "[MASK]" not in out["output_text"]
    again = generate_json(ckpt, "--prompt", "Alpha [MASK] beta [MASK] gamma", "--max-new-tokens", "3",
                          "--temperature", "0.7", "--top-k", "40", "--seed", "3")
    assert again["token_ids"] == out["token_ids"]          # per-request seed


@pytest.mark.processes                 # glm as a script (subprocess)
@pytest.mark.slow
def test_plain_output_and_init_tiny_and_convert(tmp_path, ckpt):
    made = glm("init-tiny", str(tmp_path / "t"), "--tp", "2", "--seed", "9")
    assert made.returncode == 0, made.stderr
    conv = glm("convert", "--input-folder", str(tmp_path / "t"), "--output-folder", str(tmp_path / "c"),
               "--target-tp", "1")
    assert conv.returncode == 0, conv.stderr
    assert "tensor" in conv.stderr                           # the progress bar
    a = read_rank_state(inspect_checkpoint(ckpt), 1, 0)
    b = read_rank_state(inspect_checkpoint(tmp_path / "c"), 1, 0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = glm("generate", "--checkpoint", ckpt, "--prompt", "Hello [gMASK]", "--max-new-tokens", "2")
    assert text.returncode == 0 and text.stdout.startswith("Hello")


# ---- bad input: one line, non-zero exit, never a traceback ---------------------------

def broken_copy(src: str, dst: Path, edit) -> str:
    info = inspect_checkpoint(src)
    state = read_rank_state(info, 1, 0)
    edit(state)
    save_checkpoint(dst, info.iteration, [state], info.config)
    (dst / "ice_text.model").write_bytes((Path(src) / "ice_text.model").read_bytes())
    return str(dst)


def truncated(src: str, dst: Path) -> str:
    path = broken_copy(src, dst, lambda s: None)
    f = next(Path(path).glob("*/mp_rank_00_model_states.pt"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return path


def wrong_shape(state):
    key = "transformer.layers.1.mlp.dense_4h_to_h.weight"
    state[key] = state[key][:, :-2].clone()


CASES = {
    "missing checkpoint": (lambda c, t: str(t / "nope"), [], "nope"),
    "truncated file": (truncated, [], "mp_rank_00"),
    "missing key": (lambda c, t: broken_copy(c, t / "k", lambda s: s.pop("transformer.final_layernorm.bias")),
                    [], "transformer.final_layernorm.bias"),
    "wrong shape": (lambda c, t: broken_copy(c, t / "s", wrong_shape), [], "dense_4h_to_h.weight"),
    "tp does not divide": (lambda c, t: c, ["--tp", "3"], "does not divide"),
    "no mask id": (lambda c, t: c, ["--prompt-ids", "20100,20200"], "no mask"),
    "too long": (lambda c, t: c, ["--prompt-ids", ",".join(["20100"] * 600) + ",150001"], "too long"),
    "unknown id": (lambda c, t: c, ["--prompt-ids", "20100,150001,999999"], "999999"),
    "too many blanks": (lambda c, t: c, ["--prompt-ids", ",".join(["150000"] * 257)], "257 blanks"),
    "bad id list": (lambda c, t: c, ["--prompt-ids", "20100,abc"], "--prompt-ids"),
    "bad tokenizer": (lambda c, t: c, ["--tokenizer", "/dev/null", "--prompt", "hi"], "/dev/null"),
    "rank fails at tp 2": (truncated, ["--tp", "2"], "mp_rank_00"),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.processes) if "tp 2" in n else n
                                  for n in CASES])                 # tp 2: real rank processes
def test_bad_input_is_one_line(ckpt, tmp_path, capsys, name):
    make, extra, needle = CASES[name]
    path = make(ckpt, tmp_path)
    argv = ["generate", "--checkpoint", path, "--max-new-tokens", "2", "--greedy"]
    if not any(a.startswith("--prompt") for a in extra):
        argv += ["--prompt-ids", GMASK_IDS]
    code = main(argv + extra)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("glm generate: error: ") and "\n" not in err, err
    assert needle in err and "Traceback" not in err


@pytest.mark.processes                 # glm as a script (subprocess)
@pytest.mark.slow
def test_errors_from_the_real_script_have_no_traceback(ckpt):
    out = glm("generate", "--checkpoint", ckpt, "--prompt-ids", "20100,20200")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
