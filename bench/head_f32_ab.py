"""The fp32 tied LM head (150 528 x 256 by default) three ways, in one process, alternating in
rounds: MKL over the column-major embedding (``x @ Wt``, the fp32 head before), oneDNN's packed
fp32 inner product, and ``kernels.cpu_gemm_f32``'s micro-panels. glibc malloc is tuned as in the
worker (``services.common.malloc``), so a call's output does not pay fresh pages.

    .venv/bin/python bench/head_f32_ab.py [--rows 1,8,16,32,64] [--rounds 9] [--vocab 150528] [--hidden 256]

Prints the median ms per call of each, its bytes read per ms (GB/s) and GFLOP/s
(docs/benchmarks.md, "The fp32 head on AVX2").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kernels import cpu_gemm_f32
from kernels.cpu_dense import CpuDenseLinear
from services.common.malloc import tune_malloc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,8,16,32,64")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--vocab", type=int, default=150528)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()
    tune_malloc()
    weight = torch.randn(args.vocab, args.hidden, generator=torch.Generator().manual_seed(0))
    ops = {"MKL x @ Wt": CpuDenseLinear(weight, layout="transposed")}
    try:
        ops["oneDNN packed"] = CpuDenseLinear(weight, layout="packed")
    except RuntimeError as exc:
        print(f"oneDNN packed fp32: not available ({exc})")
    if cpu_gemm_f32.supports(weight):
        ops["cpu_gemm_f32 panels"] = cpu_gemm_f32.Panels(weight)
    nbytes = weight.numel() * 4
    print(f"weight {args.vocab} x {args.hidden} fp32 ({nbytes / 1e6:.0f} MB), {torch.get_num_threads()} threads")
    print(f"{'rows':>5} " + " ".join(f"{name:>22}" for name in ops) + "   (median ms; GB/s; GFLOP/s)")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.hidden)
            times: dict[str, list[float]] = {name: [] for name in ops}
            for round_ in range(args.rounds + 1):
                for name, op in ops.items():
                    start = time.perf_counter()
                    op(x)
                    if round_:
                        times[name].append(time.perf_counter() - start)
            cells = []
            for name in ops:
                t = statistics.median(times[name])
                cells.append(f"{t * 1e3:7.2f} {nbytes / t / 1e9:5.1f} {2 * rows * weight.numel() / t / 1e9:6.1f}")
            print(f"{rows:>5} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
