"""The tied LM head (150 528 x 256, bf16 weights) in each CPU layout, at several row counts,
in one process, alternating in rounds: oneDNN's packed layout (what the model runs where bf16
is native), plain ``F.linear``, an ``[in, out]`` bf16 copy, and MKL on an fp32 copy.

    .venv/bin/python bench/head_layouts.py [--rows 1,4,8,16,32,64] [--rounds 8]

Prints the median ms per call of each layout for each row count (docs/benchmarks.md, "Against
vLLM (CPU)", its Intel/AMX machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kernels.cpu_dense import CpuDenseLinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,4,8,16,32,64")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    weight = torch.randn(150528, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ops = {"packed": CpuDenseLinear(weight, layout="packed"), "F.linear": CpuDenseLinear(weight, layout="linear"),
           "[in,out] bf16": CpuDenseLinear(weight, layout="transposed"),
           "fp32 copy": CpuDenseLinear(weight.float(), layout="transposed")}
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, 256).to(torch.bfloat16)
            times: dict[str, list[float]] = {name: [] for name in ops}
            for _ in range(args.rounds):
                for name, op in ops.items():
                    inp = x.float() if op.dtype == torch.float32 else x
                    op(inp)
                    start = time.perf_counter()
                    op(inp)
                    op(inp)
                    times[name].append((time.perf_counter() - start) / 2)
            print(f"rows {rows:>3}: " + "  ".join(f"{name} {statistics.median(t) * 1e3:.2f}"
                                                 for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
