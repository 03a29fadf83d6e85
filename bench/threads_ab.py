"""One thread against two for the small calls of a decode step: median µs of each call.

    OMP_WAIT_POLICY=PASSIVE python bench/threads_ab.py        # the workers' policy

The rules it backs (docs/benchmarks.md, "Threads"): a dense linear of fewer than
``kernels.cpu_dense.SERIAL_MACS`` multiply-adds runs on one thread, the paged decode kernel
takes one thread per ``kernels.cpu_paged.THREAD_WORK`` keys, and a forward whose element-wise
operands stay below ``kernels.threads.SERIAL_ELEMENTS`` runs them on one thread (LayerNorm,
GELU and a product over rows x width, in bf16 and fp32). The rules are switched off here (every
call runs on the thread count under test), and the sides alternate twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels.cpu_dense as cpu_dense
from kernels import cpu_paged
from model.paged_kv import BlockPool, PagedCache
from services.bench.step import _timed

LINEARS = (((768, 256), 1), ((768, 256), 32), ((1376, 256), 64), ((4096, 1024), 32), ((150528, 256), 1))
ATTENTION = ((1, 100), (32, 220))          # rows x cached tokens, heads 8 x 32, bf16 pool
# rows x width of the element-wise ops: the demo's hidden and GeGLU widths, GLM-130B's
ELEMENTWISE = ((32, 256), (64, 688), (8, 12288), (32, 12288), (64, 12288), (32, 32768), (128, 32768))


def median_us(fn, calls: int) -> float:
    return sorted(_timed(fn, calls, 10))[calls // 2] * 1e6


def sides(fn, calls: int) -> str:
    got: dict[int, list[float]] = {1: [], 2: []}
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        got[threads].append(median_us(fn, calls))
    return "  ".join(f"{t} thread(s) " + " / ".join(f"{v:.0f}" for v in got[t]) for t in (1, 2))


def main() -> None:
    torch.manual_seed(0)
    cpu_dense.SERIAL_MACS = 0                       # the thread count under test, always
    cpu_paged.THREAD_WORK = 1
    for (n, k), rows in LINEARS:
        op = cpu_dense.prepare_dense(torch.randn(n, k).bfloat16())
        x = torch.randn(rows, k).bfloat16()
        print(f"{op.layout} bf16 linear {n} x {k}, {rows} row(s), {rows * n * k / 1e6:.1f} M MACs: "
              f"{sides(lambda: op(x), 30 if n > 10000 else 200)}")
    for rows, context in ATTENTION:
        pool = BlockPool(1, rows * (context // 16 + 2), 16, 8, 32, dtype=torch.bfloat16)
        cache = PagedCache(pool)
        cache.add_rows(rows)
        cache.append([context] * rows)
        pool.keys.normal_()
        pool.values.normal_()
        tables = cache.block_index(range(rows), max(len(t) for t in cache.tables))
        lens, q = torch.tensor(cache.lengths), torch.randn(rows, 8, 32)
        print(f"paged decode kernel, {rows} row(s) x {context} tokens: "
              f"{sides(lambda: cpu_paged.paged_decode(q, pool.keys[0], pool.values[0], tables, lens, 16), 200)}")
        cache.release()
    for dtype in (torch.bfloat16, torch.float32):
        for rows, width in ELEMENTWISE:
            x = torch.randn(rows, width).to(dtype)
            w, b = torch.randn(width).to(dtype), torch.randn(width).to(dtype)
            name = f"{str(dtype).removeprefix('torch.')} {rows} x {width} ({rows * width} elements)"
            print(f"LayerNorm {name}: {sides(lambda: F.layer_norm(x, (width,), w, b, 1e-5), 200)}")
            print(f"GELU {name}: {sides(lambda: F.gelu(x), 200)}")
            print(f"product {name}: {sides(lambda: x * x, 200)}")


if __name__ == "__main__":
    main()
