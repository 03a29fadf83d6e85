"""Checkpoint layout, resharding rules (against a transcription of the official convert_tp.py),
every CheckpointError, conversion, and the memory bound of loading one rank."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model import reshard
from model.checkpoint import (
    CheckpointError,
    expected_shapes,
    inspect_checkpoint,
    load_rank_into,
    read_rank_state,
    save_checkpoint,
)
from model.config import GLMConfig
from model.convert import convert_checkpoint
from model.tiny import init_tiny, random_state

REPO = Path(__file__).resolve().parents[1]
TINY = GLMConfig.from_name("glm-tiny")
QKV = "transformer.layers.1.attention.query_key_value.weight"
H4H_W = "transformer.layers.0.mlp.dense_h_to_4h.weight"


# ---- transcription of G130: tools/convert_tp.py (docs/model.md "Checkpoint layout") -------

SEQUENTIAL_LAYERS = [
    "input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_4h_to_h.bias", "attention.rotary_emb.inv_freq",
    "final_layernorm.weight", "final_layernorm.bias",
]  # fmt: skip
GLU_LAYERS = ["mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"]
LAYER_CONCAT_DIM = {"attention.dense.weight": 1, "mlp.dense_4h_to_h.weight": 1}


def official_name(key):
    if key.startswith("transformer.layers."):
        return key.split(".", 3)[3]
    return key.split(".", 1)[1]


def official_merge(sds):
    out = {}
    for key in sds[0]:
        name = official_name(key)
        if name in SEQUENTIAL_LAYERS:
            out[key] = sds[0][key]
        elif name in GLU_LAYERS:
            halves = [torch.chunk(sd[key], 2, dim=0) for sd in sds]
            out[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        else:
            out[key] = torch.cat([sd[key] for sd in sds], dim=LAYER_CONCAT_DIM.get(name, 0))
    return out


def official_split(sd, k, i):
    out = {}
    for key, value in sd.items():
        name = official_name(key)
        if name in SEQUENTIAL_LAYERS:
            out[key] = value
        elif name in GLU_LAYERS:
            chunks = torch.chunk(value, 2 * k, dim=0)
            out[key] = torch.cat([chunks[i % k], chunks[k + i % k]], dim=0)
        else:
            out[key] = torch.chunk(value, k, dim=LAYER_CONCAT_DIM.get(name, 0))[i % k].clone()
    return out


def official_convert(sds, target):
    orig = len(sds)
    if orig >= target:
        k = orig // target
        return [official_merge(sds[i * k : (i + 1) * k]) for i in range(target)]
    k = target // orig
    return [official_split(sds[i // k], k, i) for i in range(target)]


# ---- helpers --------------------------------------------------------------------------------


def load_all(directory, tp):
    info = inspect_checkpoint(directory)
    return [read_rank_state(info, tp, r) for r in range(tp)]


def assert_same(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def tiny1(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny1")
    init_tiny(directory, tp=1, seed=3)
    return directory


# ---- resharding -----------------------------------------------------------------------------


def test_layout_and_shapes(tiny1):
    info = inspect_checkpoint(tiny1)
    assert (info.iteration, info.num_partitions, info.config) == (1, 1, TINY)
    assert (tiny1 / "latest").read_text().strip() == "1"
    assert json.loads((tiny1 / "config.json").read_text())["hidden_size"] == 64
    shapes = expected_shapes(TINY, 4)
    assert shapes[QKV] == (3 * 64 // 4, 64)
    assert shapes[H4H_W] == (2 * 176 // 4, 64)
    assert shapes["transformer.layers.0.mlp.dense_4h_to_h.weight"] == (64, 176 // 4)
    assert shapes["transformer.word_embeddings.weight"] == (150528 // 4, 64)
    assert shapes["transformer.final_layernorm.bias"] == (64,)
    sd = read_rank_state(info, 1, 0)
    assert sd[QKV].dtype == torch.float16
    assert all(v.abs().max() > 0 for v in sd.values())  # no zero-initialised bias


def test_reshard_chain_is_identity(tiny1, tmp_path):
    one = load_all(tiny1, 1)
    two = reshard.reshard_state(one, 2)
    four = reshard.reshard_state(two, 4)
    assert_same(reshard.reshard_state(four, 1), one)
    # the same chain through files and on-the-fly loading
    convert_checkpoint(tiny1, tmp_path / "t2", 2, progress=False)
    convert_checkpoint(tmp_path / "t2", tmp_path / "t4", 4, progress=False)
    assert_same(load_all(tmp_path / "t2", 2), two)
    assert_same(load_all(tmp_path / "t4", 4), four)
    assert_same(load_all(tmp_path / "t4", 1), one)
    assert_same(load_all(tmp_path / "t4", 2), two)


def test_init_tiny_tp_is_a_resharding(tiny1, tmp_path):
    init_tiny(tmp_path / "c", tp=2, seed=3)
    assert_same(load_all(tmp_path / "c", 2), load_all(tiny1, 2))
    assert_same(load_all(tmp_path / "c", 1), load_all(tiny1, 1))


@pytest.mark.parametrize(("src", "dst"), [(4, 2), (2, 4), (4, 1), (1, 4), (2, 1)])
def test_matches_official_convert_tp(src, dst):
    # Random shards (not a resharding of anything) so every position is distinguishable.
    gen = torch.Generator().manual_seed(src * 10 + dst)
    shapes = expected_shapes(GLMConfig(1, 64, 4, 176, 150528, 64), src)
    shapes = {k: s for k, s in shapes.items() if "word_embeddings" not in k}  # keep it fast
    sds = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(src)]
    ours = reshard.reshard_state(sds, dst)
    assert_same(ours, official_convert(sds, dst))


def test_glu_halves_stay_per_shard():
    inner, tp = 8, 2
    # logical unit j: x1 row has value j, x2 row has value 100 + j; TP=1 file = [x1; x2]
    full = torch.cat([torch.arange(inner), 100 + torch.arange(inner)]).float()
    shards = reshard.reshard_tensor([full], "transformer.layers.0.mlp.dense_h_to_4h.bias", tp)
    assert shards[0].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    assert shards[1].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    # a plain dim0 key is a plain chunk
    plain = reshard.reshard_tensor([full], QKV.replace("weight", "bias"), tp)
    assert plain[0].tolist() == list(range(4)) + [4, 5, 6, 7]
    back = reshard.reshard_tensor(shards, "transformer.layers.0.mlp.dense_h_to_4h.bias", 1)
    assert torch.equal(back[0], full)


def test_load_rank_into_other_dtype_and_inv_freq(tiny1, tmp_path):
    sd = load_all(tiny1, 1)[0]
    sd["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    save_checkpoint(tmp_path / "f", 7, [sd], TINY)
    info = inspect_checkpoint(tmp_path / "f")
    dest = {k: torch.zeros(s, dtype=torch.float32) for k, s in expected_shapes(TINY, 2).items()}
    load_rank_into(info, 2, 1, dest)
    ref = reshard.reshard_state([sd], 2)[1]
    for key, value in dest.items():
        assert torch.equal(value, ref[key].float()), key


# ---- errors ---------------------------------------------------------------------------------


@pytest.fixture
def broken(tiny1, tmp_path):
    """A fresh 2-way copy of the tiny checkpoint to break."""
    convert_checkpoint(tiny1, tmp_path / "b", 2, progress=False)
    return tmp_path / "b"


def _rewrite(path, fn):
    module = torch.load(path, weights_only=True)["module"]
    fn(module)
    torch.save({"module": module}, path)


def _load_all_ranks(directory, tp=2):
    info = inspect_checkpoint(directory)
    for rank in range(tp):
        read_rank_state(info, tp, rank)


def test_error_missing_folder_and_latest(tmp_path, broken):
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")
    (broken / "latest").write_text("abc\n")
    with pytest.raises(CheckpointError, match="latest: expected an iteration number"):
        inspect_checkpoint(broken)
    (broken / "latest").write_text("9\n")
    with pytest.raises(CheckpointError, match="iteration folder"):
        inspect_checkpoint(broken)
    (broken / "latest").unlink()
    with pytest.raises(CheckpointError, match="latest: missing"):
        inspect_checkpoint(broken)


def test_error_rank_files(broken):
    folder = broken / "1"
    (folder / "mp_rank_01_model_states.pt").rename(folder / "mp_rank_02_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt is missing"):
        inspect_checkpoint(broken)
    for path in folder.iterdir():
        path.unlink()
    with pytest.raises(CheckpointError, match="no mp_rank_XX"):
        inspect_checkpoint(broken)


def test_error_truncated_file(broken):
    path = broken / "1" / "mp_rank_01_model_states.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    info = inspect_checkpoint(broken)
    read_rank_state(info, 2, 0)  # rank 0 does not read the broken file
    with pytest.raises(CheckpointError, match=r"mp_rank_01_model_states.pt: truncated or corrupt"):
        read_rank_state(info, 2, 1)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_rank_state(info, 1, 0)


def test_error_no_module(broken):
    torch.save({"weights": {}}, broken / "1" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="no 'module' entry"):
        _load_all_ranks(broken)


def test_error_missing_key(broken):
    _rewrite(broken / "1" / "mp_rank_01_model_states.pt", lambda m: m.pop(QKV))
    with pytest.raises(CheckpointError, match=f"mp_rank_01_model_states.pt: missing key {QKV}"):
        _load_all_ranks(broken)


def test_error_unexpected_key(broken):
    extra = "transformer.layers.0.attention.extra.weight"
    _rewrite(broken / "1" / "mp_rank_00_model_states.pt", lambda m: m.update({extra: m[QKV]}))
    with pytest.raises(CheckpointError, match=f"unexpected key {extra}"):
        _load_all_ranks(broken)


def test_error_wrong_shape(broken):
    def grow(m):
        m[H4H_W] = torch.zeros(m[H4H_W].shape[0] + 2, 64, dtype=torch.float16)

    _rewrite(broken / "1" / "mp_rank_01_model_states.pt", grow)
    msg = rf"{H4H_W} in mp_rank_01: shape \[178, 64\] but config expects \[176, 64\]"
    with pytest.raises(CheckpointError, match=msg):
        _load_all_ranks(broken)


def test_error_bad_config(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad config.json.*not valid JSON"):
        inspect_checkpoint(broken)
    (broken / "config.json").write_text(json.dumps({**TINY.to_json_dict(), "hidden_size": 0}))
    with pytest.raises(CheckpointError, match="hidden_size must be a positive integer"):
        inspect_checkpoint(broken)
    # a config whose shapes disagree with the files
    (broken / "config.json").write_text(json.dumps({**TINY.to_json_dict(), "hidden_size": 128}))
    with pytest.raises(CheckpointError, match="but config expects"):
        _load_all_ranks(broken)


def test_error_tp_not_dividing(broken):
    info = inspect_checkpoint(broken)
    with pytest.raises(CheckpointError, match="tensor-parallel size 3 does not divide"):
        read_rank_state(info, 3, 0)
    with pytest.raises(CheckpointError, match="out of range"):
        read_rank_state(info, 2, 2)
    with pytest.raises(CheckpointError, match="does not divide"):
        convert_checkpoint(broken, broken.parent / "x", 3, progress=False)
    dest = {k: torch.empty(s) for k, s in expected_shapes(TINY, 2).items()}
    with pytest.raises(CheckpointError, match=r"destination .*needs"):
        load_rank_into(info, 4, 0, dest)
    dest.pop(QKV)
    with pytest.raises(CheckpointError, match=f"destination is missing key {QKV}"):
        load_rank_into(info, 2, 0, dest)


def test_convert_round_trip_and_refusal(tiny1, tmp_path, capsys):
    convert_checkpoint(tiny1, tmp_path / "a", 4, progress=True)
    assert "TP 1->4" in capsys.readouterr().err
    info = convert_checkpoint(tmp_path / "a", tmp_path / "b", 1, progress=False)
    assert info.num_partitions == 1 and info.iteration == 1
    assert (tmp_path / "b" / "config.json").read_text() == (tiny1 / "config.json").read_text()
    original = (tiny1 / "1" / "mp_rank_00_model_states.pt")
    a = torch.load(original, weights_only=True)["module"]
    b = torch.load(tmp_path / "b" / "1" / "mp_rank_00_model_states.pt", weights_only=True)
    assert a.keys() == b["module"].keys()
    assert all(torch.equal(a[k], b["module"][k]) for k in a)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        convert_checkpoint(tiny1, tmp_path / "b", 2, progress=False)


# ---- memory ---------------------------------------------------------------------------------

BIG = GLMConfig(6, 512, 8, 2048, 150528, 64)  # ~204 MB in fp16, 77% of it the embedding

MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch
    from model.checkpoint import expected_shapes, inspect_checkpoint, load_rank_into

    def rss_anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    info = inspect_checkpoint(sys.argv[1])
    torch.empty(1).copy_(torch.ones(1))  # warm up the allocator and copy kernels
    base, peak, stop = rss_anon(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    dest = {k: torch.empty(s, dtype=torch.float16) for k, s in expected_shapes(info.config, 2).items()}
    load_rank_into(info, 2, 0, dest)
    stop.set()
    thread.join()
    peak[0] = max(peak[0], rss_anon())
    dest_bytes = sum(t.nbytes for t in dest.values())
    print(json.dumps({"growth": peak[0] - base, "dest": dest_bytes}))
    """
)


@pytest.mark.processes                 # the probe runs in a fresh interpreter
@pytest.mark.slow
def test_load_rank_memory_is_own_shard_plus_constant(tmp_path):
    directory = tmp_path / "big"
    init_tiny(directory, preset=BIG, tp=1)
    file_bytes = (directory / "1" / "mp_rank_00_model_states.pt").stat().st_size
    assert file_bytes > 190e6
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(directory)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nmemory: file {file_bytes / 2**20:.1f} MiB, dest {result['dest'] / 2**20:.1f} MiB, "
          f"peak RssAnon growth {result['growth'] / 2**20:.1f} MiB")  # fmt: skip
    assert result["growth"] < result["dest"] + 64 * 2**20
    assert result["growth"] < 0.75 * file_bytes


def test_random_state_is_deterministic():
    a, b = random_state(TINY, seed=1), random_state(TINY, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[QKV], random_state(TINY, seed=2)[QKV])


def test_official_extras_and_legacy_format(broken):
    import argparse

    path = broken / "1" / "mp_rank_00_model_states.pt"
    module = torch.load(path, weights_only=True)["module"]
    torch.save({"module": module, "args": argparse.Namespace(fp16=True), "iteration": 1}, path)
    _load_all_ranks(broken)  # official files may pickle the argparse namespace
    torch.save({"module": module}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .* cannot be memory-mapped"):
        _load_all_ranks(broken)
