"""One thread against two for the small calls of a decode step: median µs of each call.

    OMP_WAIT_POLICY=PASSIVE python bench/threads_ab.py        # the workers' policy

The rules it backs (docs/benchmarks.md, "Threads"): a dense linear of fewer than
``kernels.cpu_dense.SERIAL_MACS`` multiply-adds runs on one thread, and the paged decode kernel
takes one thread per ``kernels.cpu_paged.THREAD_WORK`` keys. Both rules are switched off here
(every call runs on the thread count under test), and the sides alternate twice.
"""

from __future__ import annotations

import torch

import kernels.cpu_dense as cpu_dense
from kernels import cpu_paged
from model.paged_kv import BlockPool, PagedCache
from services.bench.step import _timed

LINEARS = (((768, 256), 1), ((768, 256), 32), ((1376, 256), 64), ((4096, 1024), 32), ((150528, 256), 1))
ATTENTION = ((1, 100), (32, 220))          # rows x cached tokens, heads 8 x 32, bf16 pool


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


if __name__ == "__main__":
    main()
