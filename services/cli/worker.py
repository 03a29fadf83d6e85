"""``glm worker``: serve one tensor-parallel rank of a pool over gRPC until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from services.worker.server import WorkerOptions, serve


def options_from_args(args) -> WorkerOptions:
    if not 0 <= args.rank < args.tp:
        raise ValueError(f"--rank {args.rank} is outside --tp {args.tp}")
    if args.kv_memory_gib is not None and args.kv_memory_gib <= 0:
        raise ValueError(f"--kv-memory-gib must be > 0, got {args.kv_memory_gib}")
    if not 0.0 <= args.layer_trace_ratio <= 1.0:
        raise ValueError(f"--layer-trace-ratio must be in [0, 1], got {args.layer_trace_ratio}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available")
    return WorkerOptions(
        checkpoint=args.checkpoint, tp=args.tp, rank=args.rank, listen=args.listen,
        dist_init=args.dist_init, dtype=args.dtype, device=args.device,
        quant=None if args.quant == "none" else args.quant,
        quant_group_size=args.quant_group_size,
        kv_memory_gib=args.kv_memory_gib, collective_timeout_s=args.collective_timeout_s,
        otlp_endpoint=args.otlp_endpoint, layer_trace_ratio=args.layer_trace_ratio,
        threads=args.threads, model_name=args.model_name,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
    )


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(levelname)s %(message)s")
    asyncio.run(serve(options_from_args(args)))
    return 0
