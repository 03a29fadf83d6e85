"""The memory-bandwidth probe both rungs of the ladder divide by (``glm bench gemv``, ``glm bench
step``): read GB/s, the best of a sum, a max and a dot over a buffer of random fp32 (all torch
threads), and copy GB/s. The values are random: pages of one constant value may be merged by the
host (one physical page read again and again), which would time the cache, not the memory."""

from __future__ import annotations

import gc
import time

import torch

GIB = 1 << 30


def best_of(fn, repeats: int, budget_s: float = 2.0) -> tuple[float, float]:
    """(min, median) seconds of ``fn()`` over ``repeats`` calls after warm-up; stops early once
    ``budget_s`` is spent (at least three timed calls, two for a call slower than 0.2 s, which
    also gets a single warm-up)."""
    start = time.perf_counter()
    fn()
    slow = time.perf_counter() - start > 0.2
    if not slow:
        fn()
    times: list[float] = []
    spent = 0.0
    least = 2 if slow else 3
    while len(times) < repeats and (len(times) < least or spent < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    times.sort()
    return times[0], times[len(times) // 2]


def measure_bandwidth(gib: float, repeats: int) -> dict:
    """Read GB/s (best of a sum, a max and a dot over ``gib`` GiB of fp32) and copy GB/s
    (bytes read + written)."""
    n = int(gib * GIB) // 4
    x = torch.empty(n, dtype=torch.float32).uniform_()
    half = n // 2
    reads = {
        "sum": best_of(lambda: x.sum(), repeats)[0],
        "amax": best_of(lambda: x.amax(), repeats)[0],
        "dot": best_of(lambda: torch.dot(x[:half], x[half:2 * half]), repeats)[0],
    }
    out = {f"read_{k}_gb_s": x.nbytes / t / 1e9 for k, t in reads.items()}
    del x
    gc.collect()
    src = torch.empty(n // 2, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    out["copy_gb_s"] = 2 * src.nbytes / best_of(lambda: dst.copy_(src), repeats)[0] / 1e9
    out["read_gb_s"] = max(v for k, v in out.items() if k.startswith("read_"))
    return out
