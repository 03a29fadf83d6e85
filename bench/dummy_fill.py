"""How fast dummy INT8/INT4 weights are drawn at GLM-130B width: integer values drawn directly
(what ``model.dummy`` does) against floats drawn and quantized with the official scheme
(``kernels.quantize``). Rows of the qkv weight [3h, h], h = 12288; min of N runs.

    python bench/dummy_fill.py [--rows 2048] [--runs 5]
"""

from __future__ import annotations

import argparse
import time

import torch

import kernels
from model.dummy import CHUNK_ELEMENTS, _fill_quantized
from model.quantization import QuantSpec

H = 12288


def best_of(fn, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows, cols = args.rows, H
    print(f"{rows} x {cols} weight, {torch.get_num_threads()} threads; M values/s (min of {args.runs})")
    for bits in (8, 4):
        spec = QuantSpec(bits)
        values = torch.empty((rows, spec.packed_columns(cols)), dtype=torch.int8)
        scale = torch.empty((rows,), dtype=torch.float16)
        direct = best_of(lambda: _fill_quantized(values, scale, spec, 0.02, gen), args.runs)

        def quantized() -> None:
            step = max(1, CHUNK_ELEMENTS // cols)
            for start in range(0, rows, step):
                qw = kernels.quantize(torch.randn((min(step, rows - start), cols), generator=gen) * 0.02, bits)
                values[start: start + step].copy_(qw.values)
                scale[start: start + step].copy_(qw.scale)

        slow = best_of(quantized, args.runs)
        n = rows * cols / 1e6
        print(f"INT{bits}: direct int draw {n / direct:7.0f}   randn + kernels.quantize {n / slow:7.0f}   "
              f"x{slow / direct:.1f}")
    dense = torch.empty((rows, cols), dtype=torch.bfloat16)
    t = best_of(lambda: dense.normal_(0.0, 0.02, generator=gen), args.runs)
    print(f"bf16 normal_ in place (embedding, dense linears) {rows * cols / 1e6 / t:7.0f}")


if __name__ == "__main__":
    main()
