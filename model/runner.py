"""Loading a rank's shard and running a generation job on it.

A ``GenerateJob`` is a small picklable description; ``generate_on_rank`` is what
every rank of ``glm generate --tp N`` runs (rank 0 returns the result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from model.checkpoint import CheckpointError, CheckpointInfo, inspect_checkpoint, iter_rank_tensors, load_rank_into
from model.config import check_model_source, dummy_config
from model.generation import GenerationOptions, Generator
from model.glm import GLMModel
from model.parallel import ParallelContext
from model.quantization import SCALE_SUFFIX, QuantSpec, is_quantized_weight
from model.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"           # the fastest dtype for the device (``default_dtype``)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (x86 ``flags``, Arm
    ``Features``); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (x86 AVX512_BF16 or AMX-BF16, Arm BF16).
    oneDNN emulates bf16 on other AVX-512 CPUs, and there it is slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype(device: str | torch.device) -> str:
    """``auto``: float16 on CUDA (the official GLM-130B inference dtype); on a CPU bfloat16
    where it is native, else float32. Measured on the demo model (``docs/benchmarks.md``):
    bf16 serves ~1.5x the tokens/s of fp32 on a Zen 5 with AVX512_BF16, while on an AVX2-only
    Zen 3 a bf16 matmul row cost ~5x an fp32 one."""
    if torch.device(device).type == "cuda":
        return "float16"
    return "bfloat16" if native_bf16() else "float32"


def parse_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by name; ``auto`` is ``default_dtype(device)``."""
    if name == AUTO:
        name = default_dtype(device)
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)} or {AUTO}") from None


def rank_device(device: str, ctx: ParallelContext) -> torch.device:
    """``cuda`` means this rank's own GPU; anything else is taken as given."""
    if device == "cuda":
        return torch.device("cuda", ctx.rank % torch.cuda.device_count())
    return torch.device(device)


def load_model(info: CheckpointInfo | str, ctx: ParallelContext | None = None, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quant: QuantSpec | str | None = None) -> GLMModel:
    """Build this rank's shard and fill it from the checkpoint (resharded on the fly).

    A pre-quantized checkpoint loads as it is; a 16-bit one is quantized at load when
    ``quant`` asks for it, tensor by tensor after sharding, never holding the whole
    16-bit shard.
    """
    ctx = ctx or ParallelContext()
    if not isinstance(info, CheckpointInfo):
        info = inspect_checkpoint(info)
    if isinstance(quant, str) or quant is None:
        quant = QuantSpec.parse(quant)
    info.config.check_tp(ctx.world_size)
    if info.quant is not None:
        if quant is not None and quant != info.quant:
            raise CheckpointError(
                f"{info.directory} is already quantized as {info.quant.name}; cannot load it as {quant.name}")
        quant = info.quant
    model = GLMModel(info.config, ctx, dtype=dtype, device=device, quant=quant)
    state = model.state_dict()
    if quant is None or info.quant is not None:
        load_rank_into(info, ctx.world_size, ctx.rank, state)
    else:
        _load_quantizing(info, ctx, state, quant)
    return model.eval().prepare()


def open_model(checkpoint: str | None, ctx: ParallelContext | None = None, *, load_format: str = "auto",
               preset: str | None = None, num_layers: int | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quant: QuantSpec | str | None = None) -> GLMModel:
    """This rank's shard from ``checkpoint`` (``load_format`` auto) or with random weights for
    ``preset`` shortened to ``num_layers`` (dummy: ``model.dummy``, no checkpoint at all)."""
    from model.dummy import build_dummy_model

    check_model_source(load_format, checkpoint, preset, num_layers)
    if load_format != "dummy" and not checkpoint:
        raise ValueError("no model: give --checkpoint DIR, or --load-format dummy --preset NAME")
    if load_format == "dummy":
        return build_dummy_model(dummy_config(preset, num_layers), ctx, dtype=dtype, device=device, quant=quant)
    return load_model(checkpoint, ctx, dtype=dtype, device=device, quant=quant)


def _load_quantizing(info: CheckpointInfo, ctx: ParallelContext, state: dict, quant: QuantSpec) -> None:
    """Fill ``state`` from a 16-bit checkpoint, quantizing the four linears of each layer
    from this rank's own fp16 shard (the official quantize-after-sharding semantics)."""
    for key, tensor in iter_rank_tensors(info, ctx.world_size, ctx.rank):
        if is_quantized_weight(key):
            qw = kernels.quantize(tensor, quant.bits, quant.group_size)
            state[key].copy_(qw.values)
            state[key + SCALE_SUFFIX].copy_(qw.scale)
        else:
            state[key].copy_(tensor)
        del tensor


@dataclass(frozen=True)
class GenerateJob:
    """A picklable ``glm generate`` run: checkpoint, prompt, sampling and options, handed to
    every rank by ``generate_on_rank``."""

    checkpoint: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    options: GenerationOptions
    dtype: str = "float32"
    device: str = "cpu"
    all_blanks: bool = True
    quant: QuantSpec | None = None


def generate_on_rank(ctx: ParallelContext, job: GenerateJob) -> dict | None:
    """Run ``job`` on this rank; rank 0 returns ids, log-probs and finish reasons."""
    model = load_model(job.checkpoint, ctx, dtype=parse_dtype(job.dtype),
                       device=rank_device(job.device, ctx), quant=job.quant)
    result = Generator(model).fill_blanks(list(job.prompt_ids), job.sampling, job.options,
                                          all_blanks=job.all_blanks)
    if ctx.rank != 0:
        return None
    return {
        "blanks": [
            {"token_ids": b.token_ids, "logprobs": b.logprobs, "finish_reason": b.finish_reason,
             "content_ids": b.content_ids,
             "candidates": [{"token_ids": ids, "score": score} for ids, score in b.candidates]}
            for b in result.blanks
        ],
        "output_ids": result.output_ids,
    }
