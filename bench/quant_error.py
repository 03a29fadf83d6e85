"""Quantization error of INT8/INT4, per-row (official) and group-wise, on a GLM-130B layer shard.

    python bench/quant_error.py [--json]

Weights: there is no GLM-130B checkpoint here, so each shard is synthetic, cast to fp16 as the
official model is, in two versions:
  normal: N(0, 0.02^2);
  heavy:  Student-t with 5 degrees of freedom rescaled to std 0.02 (a row of 12288 then reaches
          ~7 std), plus 2 outliers per row of magnitude 0.12-0.2 (6-10 std) at random columns.
Activations: 64 rows of standard normal, with 1% of the feature channels scaled by 20 (GLM's
activations carry large outlier channels, which is why the official scheme keeps them 16-bit).
Errors are relative Frobenius norms against the fp16 weight, computed in fp32:
  weight: |Wq - W| / |W|;  output: |x Wq^T - x W^T| / |x W^T|.
The bf16 row (W rounded to bf16, no quantization) gives the scale of an ordinary 16-bit rounding.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.reference import dequantize, quantize  # noqa: E402

SHAPES = {"qkv": (4608, 12288), "4h_to_h": (12288, 4096)}  # GLM-130B TP=8 shards, [out, in]
SCHEMES = [("int8", 8, None), ("int8-g128", 8, 128), ("int4", 4, None), ("int4-g128", 4, 128)]


def normal_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, k, generator=gen) * 0.02).half()


def heavy_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    df = 5.0
    normal = torch.randn(n, k, generator=gen)
    chi2 = torch.randn(n, k, int(df), generator=gen).pow(2).sum(-1)  # chi-squared, df degrees
    t = normal / (chi2 / df).sqrt() / (df / (df - 2)) ** 0.5  # Student-t, unit variance
    w = t * 0.02
    cols = torch.randint(0, k, (n, 2), generator=gen)
    signs = torch.randint(0, 2, (n, 2), generator=gen) * 2 - 1
    w.scatter_(1, cols, signs * (0.12 + 0.08 * torch.rand(n, 2, generator=gen)))
    return w.half()


def activations(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[: k // 100]] *= 20
    return x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    results = []
    for (name, (n, k)), (dist, make) in [(s, d) for s in SHAPES.items()
                                         for d in (("normal", normal_weight), ("heavy", heavy_weight))]:
        w = make(n, k, gen)
        w32 = w.float()
        x = activations(64, k, gen)
        y = x @ w32.t()
        candidates = [("bf16", w.to(torch.bfloat16).float())]
        candidates += [(label, dequantize(quantize(w, bits, group), torch.float32)) for label, bits, group in SCHEMES]
        for label, wq in candidates:
            row = {"shape": name, "N": n, "K": k, "weights": dist, "scheme": label,
                   "weight_rel_err": rel(wq, w32), "output_rel_err": rel(x @ wq.t(), y)}
            results.append(row)
            print(f"{name:>8} [{n},{k}] {dist:>6} {label:>10}: weight {row['weight_rel_err']:.2e}  "
                  f"output {row['output_rel_err']:.2e}", flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
