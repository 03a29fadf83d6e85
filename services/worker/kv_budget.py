"""How many KV-cache token slots fit the memory a rank has left.

Bytes per token slot on one rank: keys and values of every layer for the rank's
heads, ``2 * layers * hidden/tp * dtype bytes``. The memory comes from the
device after the warm-up (CUDA: ``torch.cuda.mem_get_info``, the warm-up's peak
stays reserved by the caching allocator) or, on a CPU, from ``--kv-memory-gib``
when given, else ``MemAvailable`` in ``/proc/meminfo`` shared by the local ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import GLMConfig

CUDA_FRACTION = 0.90  # of the free device memory after the warm-up
CPU_FRACTION = 0.50   # of MemAvailable: the host runs other things too
GIB = 1 << 30


def kv_bytes_per_token(config: GLMConfig, tp: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * (config.hidden_size // tp) * element


def mem_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes."""
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            value, unit = line.split()[1:3]
            if unit.lower() != "kb":
                raise ValueError(f"{meminfo}: unexpected unit {unit!r} for MemAvailable")
            return int(value) * 1024
    raise ValueError(f"{meminfo}: no MemAvailable line")


def kv_memory_bytes(device: torch.device, *, kv_memory_gib: float | None, local_ranks: int) -> int:
    """The memory this rank may fill with KV cache, measured now."""
    if kv_memory_gib is not None:
        return int(kv_memory_gib * GIB)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FRACTION)
    return int(mem_available_bytes() * CPU_FRACTION / max(1, local_ranks))
