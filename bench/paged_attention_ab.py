"""Decode attention of one layer over the paged pool: the C kernel (``kernels/cpu_paged.py``)
against the torch path (gather whole blocks, then two batched fp32 matmuls) and against the
dense cache's ``model.glm.decode_attention`` over the same shape; min / median of 30 calls, ms,
and the largest difference between the kernel and the torch path.

    python bench/paged_attention_ab.py [--block-sizes 16] [--dtypes float32,bfloat16]

Each row's table is its prompt's blocks, taken at once, then blocks taken one token at a time
by every row in turn (as decoding rows take them: scattered over the pool). Heads 8 x 32 (the
demo model's attention), blocks of each of ``--block-sizes`` tokens in turn.
"""

from __future__ import annotations

import argparse

import torch

from kernels import cpu_paged
from model.glm import decode_attention
from model.paged_kv import BlockPool, PagedCache, PagedStep
from services.bench.step import _timed
from services.common.malloc import tune_malloc

HEADS, DIM = 8, 32
SHAPES = ((32, 64), (32, 220), (16, 1024), (8, 1000))      # rows x cached tokens


def timed(fn, calls: int = 30) -> tuple[float, float]:
    """Min and median ms of ``calls`` calls after 5 untimed ones."""
    times = sorted(_timed(fn, calls, 5))
    return times[0] * 1e3, times[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-sizes", default="16", help="tokens per block, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    tune_malloc()                                   # as the worker does
    torch.manual_seed(0)
    print(f"C kernel available: {cpu_paged.kernel() is not None}; heads {HEADS} x {DIM}; min / median ms of 30 calls")
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for rows, context in SHAPES:
            for block in (int(b) for b in args.block_sizes.split(",")):
                run(dtype, rows, context, block)


def run(dtype: torch.dtype, rows: int, context: int, block: int) -> None:
    """One line: the three ways of one layer's decode attention at this shape."""
    pool = BlockPool(1, rows * (context // block + 3), block, HEADS, DIM, dtype=dtype)
    cache = PagedCache(pool)
    cache.add_rows(rows)
    grow = min(2 * block, context // 2)             # decode-time growth: interleaved blocks
    cache.append([context - 1 - grow] * rows)
    for _ in range(grow):
        cache.append([1] * rows)
    step = PagedStep.build(cache, rows, [])
    pool.keys.normal_()
    pool.values.normal_()
    q = torch.randn(rows, HEADS, DIM).to(dtype)
    dense_k = torch.randn(rows, HEADS, context, DIM).to(dtype)
    dense_v = torch.randn(rows, HEADS, context, DIM).to(dtype)
    mask = torch.zeros(rows, 1, 1, context, dtype=torch.bool)
    out = torch.empty(rows, HEADS * DIM, dtype=dtype)

    def through(kernel: bool) -> torch.Tensor:
        step.kernel = kernel
        step._decode(0, q, 1.0, out)
        return out.clone()

    figures = {"C kernel": timed(lambda: through(True)) if cpu_paged.kernel() else None,
               "torch gather": timed(lambda: through(False)),
               "dense cache": timed(lambda: decode_attention(q.view(rows, HEADS, 1, DIM), dense_k, dense_v,
                                                             mask, 1.0))}
    diff = ((through(True).float() - through(False).float()).abs().max().item()
            if cpu_paged.kernel() else float("nan"))
    text = "  ".join(f"{name} {'-' if v is None else f'{v[0]:.2f} / {v[1]:.2f}'}" for name, v in figures.items())
    print(f"{str(dtype).removeprefix('torch.'):9s} {rows:3d} rows x {context:5d} blocks of {block:3d}  {text}  "
          f"max |kernel - torch| {diff:.1e}")
    cache.release()


if __name__ == "__main__":
    main()
