"""``glm worker``: serve one tensor-parallel rank of a pool over gRPC until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from services.worker.options import WorkerOptions


def options_from_args(args) -> WorkerOptions:
    options = WorkerOptions.from_args(args)
    if options.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {options.device}: no CUDA device is available")
    return options


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(levelname)s %(message)s")
    from services.common.env import quiet_openmp

    quiet_openmp()                                  # before torch loads OpenMP
    from services.worker.server import serve      # torch: only once the options are valid

    asyncio.run(serve(options_from_args(args)))
    return 0
