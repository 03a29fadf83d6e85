"""Dummy weights: one rank's shard of a preset, drawn in memory (vLLM's ``--load-format dummy``).

No checkpoint is written or read. ``build_dummy_model`` allocates the rank's shard exactly as
``load_model`` does (``GLMModel`` with the same dtype, device and quantization), fills every
tensor with random values and prepares every quantized linear's kernel op, so the shard holds
the shapes, dtypes and kernel ops a loaded checkpoint gives; ``num_layers`` shortens a preset at
its full width.

* Every tensor is drawn from its own generator, seeded from ``(seed, key, rank)``, where ``rank``
  is 0 for a replicated tensor (LayerNorms, row-parallel biases): the ranks of a pool hold
  identical copies of those, as they would from a checkpoint. Partitioned tensors are
  independent draws per rank (not slices of one global draw: nothing global is ever built).
* Quantized linears are filled quantized in place: integer values uniform in ``[-q, q]``
  (``q`` = 127 for INT8, 7 for INT4, the official ranges) and fp16 scales chosen so that the
  dequantized weight has the standard deviation of ``model.tiny``'s linears. Drawing the
  integers directly beats drawing floats and quantizing them with ``kernels.quantize`` by 3-10x
  on the project's CPU (``docs/benchmarks.md`` "Dummy weights"), and never needs a float copy.
  INT4 values are drawn in chunks of rows and packed into the shard, so the transient is one
  chunk; dense tensors are drawn in place.
* Magnitudes follow ``model.tiny`` (linears ``N(0, (2/sqrt(fan_in))^2)`` with the global fan-in,
  embedding ``N(0, (4/sqrt(h))^2)``, LayerNorm weights ``1 + N(0, 0.1^2)``, biases
  ``N(0, 0.02^2)``), so activations and logits stay finite in bf16 and fp16.

The draws use a generator on the shard's device (fast on a GPU); the same seed gives the same
weights on the same kind of device, not across CPU and CUDA.
"""

from __future__ import annotations

import hashlib
import math

import torch

import kernels
from kernels.reference import qmax
from model import reshard
from model.config import GLMConfig
from model.glm import GLMModel
from model.parallel import ParallelContext
from model.quantization import SCALE_SUFFIX, QuantSpec, is_quantized_weight, is_scale, layer_suffix
from model.tiny import BRANCH_GAIN, EMBEDDING_SCALE

CHUNK_ELEMENTS = 1 << 25           # unpacked INT4 values drawn at once (32 MiB of int8)
SCALE_JITTER = 0.1                 # per-row (or per-group) spread of the scales


def tensor_seed(seed: int, key: str, rank: int) -> int:
    """The generator seed of ``key`` on ``rank`` (63 bits of a hash: stable across processes)."""
    digest = hashlib.sha256(f"{seed}/{key}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _fan_in(key: str, config: GLMConfig) -> int:
    """Global input width of a layer's linear weight (the std must not depend on TP)."""
    return config.inner_hidden_size if layer_suffix(key) == "mlp.dense_4h_to_h.weight" else config.hidden_size


def _fill_float(key: str, tensor: torch.Tensor, config: GLMConfig, gen: torch.Generator) -> None:
    if key == "transformer.word_embeddings.weight":
        tensor.normal_(0.0, EMBEDDING_SCALE / math.sqrt(config.hidden_size), generator=gen)
    elif "layernorm" in key and key.endswith(".weight"):
        tensor.normal_(1.0, 0.1, generator=gen)
    elif key.endswith(".bias"):
        tensor.normal_(0.0, 0.02, generator=gen)
    else:   # a dense linear weight [out, in]
        tensor.normal_(0.0, BRANCH_GAIN / math.sqrt(_fan_in(key, config)), generator=gen)


def _fill_quantized(values: torch.Tensor, scale: torch.Tensor, quant: QuantSpec, std: float,
                    gen: torch.Generator) -> None:
    """Integer values uniform in ``[-q, q]`` and fp16 scales giving the dequantized weight a
    standard deviation of about ``std``."""
    limit = qmax(quant.bits)
    if quant.bits == 8:
        values.random_(-limit, limit + 1, generator=gen)               # in place, no copy
    else:
        rows = max(1, CHUNK_ELEMENTS // (2 * values.shape[1]))
        for start in range(0, values.shape[0], rows):
            chunk = values[start: start + rows]                          # [r, in/2] packed
            q = torch.empty((chunk.shape[0], 2 * chunk.shape[1]), dtype=torch.int8, device=values.device)
            chunk.copy_(kernels.pack_int4(q.random_(-limit, limit + 1, generator=gen)))
            del q
    q_std = math.sqrt(limit * (limit + 1) / 3)                            # std of uniform ints in [-q, q]
    jitter = torch.randn(scale.shape, generator=gen, device=scale.device, dtype=torch.float32)
    scale.copy_((1.0 + SCALE_JITTER * jitter).abs_().mul_(std / q_std))


@torch.no_grad()
def fill_dummy(model: GLMModel, seed: int = 0) -> GLMModel:
    """Fill every tensor of ``model``'s shard with its seeded random values and prepare each
    quantized linear's kernel op as soon as its weight is drawn (what ``GLMModel.prepare`` does,
    one linear at a time). The embedding comes last: its pages are only touched when drawn, so
    the transient of a kernel's repacking never adds to the largest tensor of the shard."""
    config, rank, quant = model.config, model.ctx.rank, model.quant
    state = model.state_dict()
    embedding = "transformer.word_embeddings.weight"
    for key in [k for k in state if k != embedding] + [embedding]:
        tensor = state[key]
        if quant is not None and is_scale(key):
            continue                                                     # drawn with its weight
        split = reshard.split_of(key)
        owner = 0 if split is None else rank                            # replicated: one draw for all
        gen = torch.Generator(device=tensor.device).manual_seed(tensor_seed(seed, key, owner))
        if quant is not None and is_quantized_weight(key):
            std = BRANCH_GAIN / math.sqrt(_fan_in(key, config))
            _fill_quantized(tensor, state[key + SCALE_SUFFIX], quant, std, gen)
            model.get_submodule(key.removesuffix(".weight")).prepare()
        else:
            _fill_float(key, tensor, config, gen)
    return model


def build_dummy_model(config: GLMConfig, ctx: ParallelContext | None = None, *,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      quant: QuantSpec | str | None = None, seed: int = 0) -> GLMModel:
    """This rank's shard of ``config`` with random weights, prepared as ``load_model`` prepares
    a loaded one (``fill_dummy`` prepares each quantized linear once its weight is drawn).
    Memory: the shard plus one chunk (plus, on CPU, a kernel's repacking transient)."""
    ctx = ctx or ParallelContext()
    if isinstance(quant, str) or quant is None:
        quant = QuantSpec.parse(quant)
    config.check_tp(ctx.world_size)
    model = GLMModel(config, ctx, dtype=dtype, device=device, quant=quant)
    return fill_dummy(model, seed).eval().prepare()      # the dense layouts and the tied head's
