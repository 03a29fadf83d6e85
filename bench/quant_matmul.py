"""Weight-only INT8/INT4 matmul vs dense bf16 on CPU, at GLM-130B TP=8 shard shapes.

    python bench/quant_matmul.py [--json] [--runs 20] [--threads 2]

Three parts:
  1. memory bandwidth: bytes read + written by a copy of a 1 GiB tensor, per second (the limit);
  2. decode shapes (M = 1..32 activation rows): median ms of dense bf16 `F.linear`, and of the
     `kernels.cpu` op forced onto torch's weight-only INT8 and INT4 kernels; weight bytes / time
     is the achieved bandwidth;
  3. the dispatch threshold: on the qkv shard, the kernel against the op's dense path (dequantize
     per call + dense matmul in `BF16_DENSE_COMPUTE`) for growing M; `KERNEL_MAX_ROWS` in
     kernels/cpu.py is the largest M where the kernel still wins.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.cpu import CpuQuantizedLinear  # noqa: E402
from kernels.reference import quantize  # noqa: E402

# GLM-130B (hidden 12288, ffn 32768, 96 heads) split for TP=8: [out, in] per rank.
SHAPES = {
    "qkv": (4608, 12288),
    "dense": (12288, 1536),
    "h_to_4h": (8192, 12288),
    "4h_to_h": (12288, 4096),
}
DECODE_ROWS = (1, 2, 4, 8, 16, 32)
SWEEP_ROWS = (16, 64, 256, 512, 1024)


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(gib: float = 1.0, runs: int = 5) -> float:
    src = torch.ones(int(gib * 2**30), dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), runs, warmup=1)
    return 2 * src.numel() / (ms * 1e-3) / 1e9  # read + write


def ops_for(n: int, k: int) -> dict:
    w = (torch.randn(n, k) * 0.02).to(torch.float16)  # [out, in]
    return {
        "dense": w.to(torch.bfloat16),
        8: CpuQuantizedLinear(quantize(w, 8), kernel_max_rows=1 << 30),
        4: CpuQuantizedLinear(quantize(w, 4), kernel_max_rows=1 << 30),
    }


def decode_table(runs: int) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        ops = ops_for(n, k)
        dense_w = ops["dense"]
        for m in DECODE_ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            row = {"shape": name, "N": n, "K": k, "M": m}
            row["dense_ms"] = median_ms(lambda: torch.nn.functional.linear(x, dense_w), runs)
            row["int8_ms"] = median_ms(lambda: ops[8](x), runs)
            row["int4_ms"] = median_ms(lambda: ops[4](x), runs)
            row["dense_gbs"] = dense_w.numel() * 2 / row["dense_ms"] / 1e6
            row["int8_gbs"] = ops[8].nbytes / row["int8_ms"] / 1e6
            row["int4_gbs"] = (ops[4].nbytes - ops[4].qw.nbytes) / row["int4_ms"] / 1e6  # repacked copy read
            rows.append(row)
            print_row(row)
        del ops
    return rows


def threshold_sweep(runs: int) -> list[dict]:
    n, k = SHAPES["qkv"]
    ops = ops_for(n, k)
    rows = []
    for m in SWEEP_ROWS:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        row = {"shape": "qkv", "M": m}
        for bits in (8, 4):
            kernel, dense = ops[bits], CpuQuantizedLinear(ops[bits].qw, kernel_max_rows=0, repack=False)
            row[f"int{bits}_kernel_ms"] = median_ms(lambda: kernel(x), runs, warmup=1)
            row[f"int{bits}_dense_ms"] = median_ms(lambda: dense(x), runs, warmup=1)
        rows.append(row)
        print("  " + "  ".join(f"{key}={val:.1f}" if isinstance(val, float) else f"{key}={val}"
                               for key, val in row.items()), flush=True)
    return rows


def print_row(row: dict) -> None:
    print(f"{row['shape']:>8} [{row['N']:>5},{row['K']:>5}] M={row['M']:>2}  "
          f"dense {row['dense_ms']:7.2f} ms {row['dense_gbs']:5.1f} GB/s | "
          f"int8 {row['int8_ms']:7.2f} ms {row['int8_gbs']:5.1f} GB/s | "
          f"int4 {row['int4_ms']:7.2f} ms {row['int4_gbs']:5.1f} GB/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="also print all results as one JSON object")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per decode point (median)")
    parser.add_argument("--sweep-runs", type=int, default=3, help="timed runs per threshold point")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    result = {"torch": torch.__version__, "threads": args.threads,
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    result["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    print(f"torch {result['torch']}, {args.threads} threads, {result['cpu_capability']}; "
          f"copy bandwidth (read+write of 1 GiB): {result['copy_bandwidth_gbs']:.1f} GB/s")
    print("decode shapes (median ms, weight bytes / time):")
    result["decode"] = decode_table(args.runs)
    if not args.skip_sweep:
        print("dispatch threshold, qkv [4608,12288]: weight-only kernel vs dequantize + dense (median ms):")
        result["sweep"] = threshold_sweep(args.sweep_runs)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
