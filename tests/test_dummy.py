"""``--load-format dummy`` (model/dummy.py): a rank's shard drawn in memory holds exactly the
tensors a loaded checkpoint gives that rank (names, shapes, dtypes) for every preset,
quantization and TP size; replicated tensors are identical on every rank and partitioned ones
are each rank's own draw; quantized values stay in the official ranges with the intended
magnitude; the forward is finite in bf16; bad combinations of flags are refused by name; and
``glm serve --load-format dummy`` answers a client call with tokens."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from kernels.reference import dequantize, int_values
from model import reshard
from model.config import PRESETS, check_model_source, dummy_config
from model.dummy import build_dummy_model
from model.parallel import ParallelContext
from model.quantization import QuantSpec, is_quantized_weight, is_scale
from model.runner import load_model, open_model

SHAPE_ONLY = object()   # a process group no collective is run on: building a shard needs none


def rank_ctx(rank: int, tp: int) -> ParallelContext:
    return ParallelContext(rank=rank, world_size=tp, group=SHAPE_ONLY) if tp > 1 else ParallelContext()


def layout(model) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", ["glm-tiny", "glm-small"])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("tp", [1, 2])
def test_a_dummy_shard_has_the_layout_of_the_loaded_checkpoint(checkpoint, preset, quant, tp):
    folder = checkpoint(preset, tp=1)
    for rank in range(tp):
        ctx = rank_ctx(rank, tp)
        loaded = load_model(folder, ctx, dtype=torch.bfloat16, quant=quant)
        dummy = build_dummy_model(PRESETS[preset], ctx, dtype=torch.bfloat16, quant=quant)
        assert layout(dummy) == layout(loaded)
        assert dummy.quant == loaded.quant
        def ops(model):
            return [(type(m.op).__name__, getattr(m.op, "layout", None)) for m in model.modules() if hasattr(m, "op")]

        assert ops(dummy) == ops(loaded) and all(op != "NoneType" for op, _ in ops(dummy))   # prepared as load_model does
        assert dummy.transformer.word_embeddings.head_nbytes == loaded.transformer.word_embeddings.head_nbytes


def test_the_layer_count_shortens_the_preset_at_full_width():
    model = build_dummy_model(dummy_config("glm-small", 1), dtype=torch.bfloat16, quant="int8")
    assert len(model.transformer.layers) == 1 and model.config.hidden_size == PRESETS["glm-small"].hidden_size
    assert model.config.alpha == math.sqrt(2)


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_replicated_tensors_agree_across_ranks_and_partitioned_ones_are_each_ranks_own(quant):
    config = dummy_config("glm-tiny")
    shards = [build_dummy_model(config, rank_ctx(r, 2), dtype=torch.float32, quant=quant).state_dict()
              for r in range(2)]
    replicated = [k for k in shards[0] if reshard.split_of(k, QuantSpec.parse(quant)) is None]
    assert {"transformer.final_layernorm.weight", "transformer.layers.0.attention.dense.bias",
            "transformer.layers.1.post_attention_layernorm.bias"} <= set(replicated)
    for key in shards[0]:
        same = torch.equal(shards[0][key], shards[1][key])
        assert same == (key in replicated), key
    again = build_dummy_model(config, rank_ctx(1, 2), dtype=torch.float32, quant=quant).state_dict()
    assert all(torch.equal(again[k], shards[1][k]) for k in again)           # seeded: reproducible
    other = build_dummy_model(config, rank_ctx(1, 2), dtype=torch.float32, quant=quant, seed=1).state_dict()
    assert not torch.equal(other["transformer.word_embeddings.weight"], shards[1]["transformer.word_embeddings.weight"])


@pytest.mark.parametrize("quant,limit", [("int8", 127), ("int4", 7)])
def test_quantized_values_are_in_the_official_range_with_the_intended_magnitude(quant, limit):
    config = dummy_config("glm-small", 1)
    model = build_dummy_model(config, dtype=torch.bfloat16, quant=quant)
    for name in ("query_key_value", "dense"):
        linear = getattr(model.transformer.layers[0].attention, name)
        qw = linear.quantized_weight()
        q = int_values(qw)
        assert int(q.min()) == -limit and int(q.max()) == limit
        std = dequantize(qw, torch.float32).std().item()
        assert 0.8 < std * math.sqrt(config.hidden_size) / 2.0 < 1.2    # model.tiny's 2/sqrt(fan_in)
        assert qw.scale.dtype == torch.float16 and bool((qw.scale > 0).all())
    keys = model.state_dict()
    assert sum(is_quantized_weight(k) for k in keys) == sum(is_scale(k) for k in keys) == 4


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_the_forward_of_a_dummy_model_is_finite_in_bf16(quant):
    model = build_dummy_model(dummy_config("glm-small", 2), dtype=torch.bfloat16, quant=quant)
    ids = torch.tensor([[20100, 20200, 150001, 150004]])
    mask = torch.zeros((1, 1, 4, 4), dtype=torch.bool)
    logits = model(ids, torch.arange(4)[None], mask)
    assert bool(logits.isfinite().all()) and 1.0 < logits.std().item() < 20.0


@pytest.mark.parametrize("args,needle", [
    (("dummy", "/ckpt", None, None), "drop --checkpoint /ckpt"),
    (("dummy", None, "glm-huge", None), "--preset 'glm-huge': unknown model preset"),
    (("dummy", None, "glm-tiny", 3), "--num-layers 3: glm-tiny has 2 layers"),
    (("dummy", None, None, 0), "--num-layers 0"),
    (("auto", "/ckpt", "glm-tiny", None), "--preset only apply to --load-format dummy"),
    (("auto", "/ckpt", None, 2), "--num-layers only apply to --load-format dummy"),
    (("safetensors", "/ckpt", None, None), "--load-format 'safetensors'"),
])
def test_bad_combinations_are_refused_by_name(args, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        check_model_source(*args)


def test_open_model_needs_a_source():
    with pytest.raises(ValueError, match="--checkpoint DIR, or --load-format dummy"):
        open_model(None)
    model = open_model(None, load_format="dummy", preset="glm-tiny", num_layers=1, quant="int4")
    assert model.config.num_layers == 1 and model.quant.bits == 4


def test_worker_pool_and_serve_options_check_the_source():
    from services.local_options import ServeOptions
    from services.worker.options import PoolOptions, WorkerOptions

    base = dict(tp=1, rank=0, listen="unix:///tmp/x.sock", dist_init="tcp://127.0.0.1:1")
    WorkerOptions(**base, load_format="dummy", preset="glm-tiny", num_layers=1)
    with pytest.raises(ValueError, match="--checkpoint DIR is required"):
        WorkerOptions(**base)
    with pytest.raises(ValueError, match="drop --checkpoint"):
        PoolOptions.from_flat(checkpoint="/c", tp=1, socket_dir="/s", load_format="dummy")
    with pytest.raises(ValueError, match="drop --checkpoint"):
        ServeOptions.from_flat(checkpoint="/c", load_format="dummy")
    with pytest.raises(ValueError, match="--num-layers 5: glm-small has 4 layers"):
        ServeOptions.from_flat(load_format="dummy", num_layers=5)


@pytest.mark.processes
@pytest.mark.redis
def test_serve_with_dummy_weights_answers_a_client_call(tmp_path):
    """The real stack (private Redis, a pool of 2 ranks over gloo, scheduler, gateway) with no
    checkpoint anywhere: the scheduler and gateway read only config.json and the tokenizer."""
    from services.cli.main import build_parser
    from services.cli.serve import options_from_args
    from services.client import GLMClient
    from services.local import LocalStack

    args = build_parser().parse_args(["serve", "--load-format", "dummy", "--preset", "glm-tiny", "--num-layers",
                                      "1", "--tp", "2", "--dtype", "bfloat16", "--port", "0",
                                      "--cache-dir", str(tmp_path / "cache")])
    options = dataclasses.replace(options_from_args(args), workdir=str(tmp_path))
    assert options.checkpoint is None and options.model_name == "glm-tiny-dummy"
    assert not list((tmp_path / "cache").rglob("*.pt"))                       # no weights written
    stack = LocalStack(options)
    try:
        stack.start(ready_timeout_s=180)
        with GLMClient(stack.address) as client:
            reply = client.generate("The river [MASK] the valley.", model="glm-tiny-dummy", max_new_tokens=6,
                                    min_new_tokens=6, temperature=0, timeout=120)
        assert len(reply.token_ids) == 6
    finally:
        stack.stop()
