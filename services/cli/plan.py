"""``glm plan``: memory per GPU for a model × quantization × TP × context.

It answers a question, so "does not fit" still exits 0; only bad input fails."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from model.config import PRESETS, GLMConfig
from model.plan import GIB, plan_memory


def load_config(model: str) -> GLMConfig:
    """A preset name, or a checkpoint folder (its config.json, else the glm-130b preset)."""
    if model in PRESETS:
        return GLMConfig.from_name(model)
    if Path(model).is_dir():
        return GLMConfig.for_checkpoint(model)
    raise ValueError(f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     f"nor a checkpoint folder")


def _table(model: str, plan) -> str:
    gib = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
    return "\n".join([
        f"{model}  quant={plan.quant}  tp={plan.tp}  {plan.max_tokens} tokens x batch "
        f"{plan.batch}  on {plan.gpu_memory / GIB:.2f} GiB GPUs",
        f"  weights      {gib(plan.weights)}",
        f"  kv cache     {gib(plan.kv_cache)}",
        f"  activations  {gib(plan.activations)}",
        f"  reserve      {gib(plan.reserve)}",
        f"  total        {gib(plan.total)} per GPU ({plan.total * plan.tp / GIB:.2f} GiB "
        f"over {plan.tp} GPUs)",
        f"  headroom     {gib(plan.headroom)}",
        f"  fits         {'yes' if plan.fits else 'no':>8}",
        f"  kv tokens that fit beside the rest: {plan.to_dict()['max_batch_tokens']}",
    ])


def run(args) -> int:
    config = load_config(args.model)
    if args.num_layers is not None:
        if args.num_layers > config.num_layers:
            raise ValueError(f"--num-layers {args.num_layers}: the model has {config.num_layers} layers")
        config = dataclasses.replace(config, num_layers=args.num_layers)
    quant = "none" if args.quant == "fp16" else args.quant
    plan = plan_memory(config, quant=quant, tp=args.tp, gpu_memory_gib=args.gpu_memory_gib,
                       max_tokens=args.max_tokens, batch=args.batch, group_size=args.group_size,
                       cpu_kernels=args.cpu_kernels, head_copy=args.cpu_kernels)
    if args.json:
        print(json.dumps({"model": args.model, **plan.to_dict()}))
    else:
        print(_table(args.model, plan))
    return 0
