"""Loading a rank's shard and running a generation job on it.

A ``GenerateJob`` is a small picklable description; ``generate_on_rank`` is what
every rank of ``glm generate --tp N`` runs (rank 0 returns the result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.checkpoint import CheckpointInfo, inspect_checkpoint, load_rank_into
from model.generation import GenerationOptions, Generator
from model.glm import GLMModel
from model.parallel import ParallelContext
from model.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def rank_device(device: str, ctx: ParallelContext) -> torch.device:
    """``cuda`` means this rank's own GPU; anything else is taken as given."""
    if device == "cuda":
        return torch.device("cuda", ctx.rank % torch.cuda.device_count())
    return torch.device(device)


def load_model(info: CheckpointInfo | str, ctx: ParallelContext | None = None, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> GLMModel:
    """Build this rank's shard and fill it from the checkpoint (resharded on the fly)."""
    ctx = ctx or ParallelContext()
    if not isinstance(info, CheckpointInfo):
        info = inspect_checkpoint(info)
    info.config.check_tp(ctx.world_size)
    model = GLMModel(info.config, ctx, dtype=dtype, device=device)
    load_rank_into(info, ctx.world_size, ctx.rank, model.state_dict())
    return model.eval()


@dataclass(frozen=True)
class GenerateJob:
    checkpoint: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    options: GenerationOptions
    dtype: str = "float32"
    device: str = "cpu"
    all_blanks: bool = True


def generate_on_rank(ctx: ParallelContext, job: GenerateJob) -> dict | None:
    """Run ``job`` on this rank; rank 0 returns ids, log-probs and finish reasons."""
    model = load_model(job.checkpoint, ctx, dtype=parse_dtype(job.dtype),
                       device=rank_device(job.device, ctx))
    result = Generator(model).fill_blanks(list(job.prompt_ids), job.sampling, job.options,
                                          all_blanks=job.all_blanks)
    if ctx.rank != 0:
        return None
    return {
        "blanks": [
            {"token_ids": b.token_ids, "logprobs": b.logprobs, "finish_reason": b.finish_reason,
             "content_ids": b.content_ids}
            for b in result.blanks
        ],
        "output_ids": result.output_ids,
    }
