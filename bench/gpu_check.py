"""Every GPU check of the CUDA quantized kernels in one run (< 3 minutes on an H100).

Run from the repository root on a machine with a CUDA GPU and a CUDA build of torch:

    pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12   # cupy + NVRTC; no CUDA toolkit needed
    python bench/gpu_check.py [--json OUT] [--sweep]

1. Parity against kernels.reference on fresh random data: INT8/INT4 x per-row/group-wise
   x fp16/bf16 x M in {1, 3, 8, 17, 64} (GEMV for M <= 8, dequantize + cuBLAS above),
   bit-exact dequantization, leading dims, the torch fallback for unaligned shapes.
2. Device-to-device copy bandwidth (a large torch copy; read + write bytes / time).
3. Fused GEMV bandwidth (packed weight + scale bytes / kernel time) at GLM-130B
   shard shapes for TP 4 and 8, M = 1 and 8, and its ratio to the copy bandwidth;
   an fp16 cuBLAS GEMV on the dense weight for comparison.
4. Prefill: dequantize + cuBLAS at M = 512 and 2048, split into its two parts.
`--sweep` adds a rows-per-block x threads sweep of the GEMV (tuning data).

Timing: CUDA events, median over batches after warm-up. Each batch rotates over
enough weight copies to exceed the L2 cache, and the stream is first held busy
with torch.cuda._sleep so the Python launch loop does not leave the GPU idle.
Exit status: 0 when every parity check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.cuda import GEMV_MAX_ROWS, prepare_cuda  # noqa: E402
from kernels.reference import QuantizedWeight, dequantize, pack_int4, quantized_matmul  # noqa: E402

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
HIDDEN, FFN = 12288, 32768  # GLM-130B; dense_h_to_4h holds the two GeGLU halves


def shard_shapes(tp: int) -> dict[str, tuple[int, int]]:
    """[out, in] of the four quantized linears of one layer on one TP rank."""
    return {
        "query_key_value": (3 * HIDDEN // tp, HIDDEN),
        "dense": (HIDDEN, HIDDEN // tp),
        "dense_h_to_4h": (2 * FFN // tp, HIDDEN),
        "dense_4h_to_h": (HIDDEN, FFN // tp),
    }


def random_qweight(n, k, bits, group_size, device="cpu", gen=None) -> QuantizedWeight:
    qmax = 127 if bits == 8 else 7
    q = torch.randint(-qmax, qmax + 1, (n, k), dtype=torch.int8, generator=gen, device=device)
    groups = 1 if group_size is None else k // group_size
    scale = ((torch.rand(n, groups, generator=gen, device=device) + 0.5) / qmax).half()
    scale = scale[:, 0].contiguous() if group_size is None else scale
    return QuantizedWeight(q if bits == 8 else pack_int4(q), scale, bits, k, group_size)


def close_fp32_acc(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """Within two output ulps of the element plus the output's rms (see the tests)."""
    eps = torch.finfo(ref.dtype).eps
    got, ref = got.float(), ref.float()
    tol = 2 * eps * (ref.abs() + ref.pow(2).mean().sqrt())
    err = (got - ref).abs()
    return bool(torch.all(err <= tol)), float((err / tol).max()) if err.numel() else 0.0


# ---- 1. parity ----------------------------------------------------------------

def parity_checks() -> list[dict]:
    gen = torch.Generator().manual_seed(int(time.time()))  # fresh data every run
    rows = []
    cases = [(203, 1024, m) for m in (1, 3, 8, 17, 64)] + [(4608, 12288, 1), (4608, 12288, 8)]
    for bits in (8, 4):
        for group_size in (None, 128):
            for dname, dtype in DTYPES.items():
                for n, k, m in cases:
                    qw = random_qweight(n, k, bits, group_size, gen=gen)
                    op = prepare_cuda(qw, "cuda", dtype)
                    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
                    ok, worst = close_fp32_acc(op(x), quantized_matmul(x, op.qw))
                    rows.append(dict(check="matmul", bits=bits, group_size=group_size, dtype=dname,
                                     n=n, k=k, m=m, path="gemv" if m <= GEMV_MAX_ROWS else "dequant+cublas",
                                     ok=ok, err_over_tol=worst))
                exact = torch.equal(op.dequantize(), dequantize(op.qw, dtype))
                rows.append(dict(check="dequantize bit-exact", bits=bits, group_size=group_size,
                                 dtype=dname, n=n, k=k, ok=exact))
    qw = random_qweight(64, 256, 4, None, gen=gen)
    op = prepare_cuda(qw, "cuda", torch.float16)
    x = torch.randn(2, 3, 256, generator=gen).to("cuda", torch.float16)
    ok, worst = close_fp32_acc(op(x), quantized_matmul(x, op.qw))
    rows.append(dict(check="leading dims [2,3,K]", ok=ok and op(x[:, :0]).shape == (2, 0, 64)))
    qw = random_qweight(10, 40, 4, None, gen=gen)  # not 16-byte chunked: torch fallback
    op = prepare_cuda(qw, "cuda", torch.bfloat16)
    x = torch.randn(3, 40, generator=gen).to("cuda", torch.bfloat16)
    ok, worst = close_fp32_acc(op(x), quantized_matmul(x, op.qw))
    rows.append(dict(check="unaligned fallback", ok=ok and not op.vectorized))
    return rows


# ---- timing helpers -------------------------------------------------------------

def gpu_time(calls: list, batches: int = 15, warmup: int = 2) -> float:
    """Median seconds per call; each batch runs every callable once, back to back."""
    for _ in range(warmup):
        for c in calls:
            c()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sleep = getattr(torch.cuda, "_sleep", None)
    times = []
    for _ in range(batches):
        if sleep is not None:
            sleep(max(1_000_000, 200_000 * len(calls)))  # ~100 us of GPU time per queued call
        start.record()
        for c in calls:
            c()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    """How many weight copies a batch rotates over so that it does not live in L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
    return max(1, min(32, math.ceil(3 * l2 / nbytes)))


def copy_bandwidth() -> float:
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = gpu_time([lambda: dst.copy_(src)], batches=20)
    del src, dst
    return 2 * nbytes / t


# ---- 3. GEMV bandwidth ------------------------------------------------------------

def gemv_bandwidth(copy_bw: float, sweep: bool) -> list[dict]:
    rows = []
    configs = [(tp, name, nk, bits, g, m, "f16", {})
               for tp in (8, 4) for name, nk in shard_shapes(tp).items()
               for bits in (8, 4) for g in (None, 128) for m in (1, 8)]
    configs += [(8, "dense_h_to_4h", shard_shapes(8)["dense_h_to_4h"], bits, None, 1, "bf16", {})
                for bits in (8, 4)]
    if sweep:
        configs += [(8, name, shard_shapes(8)[name], bits, None, m, "f16",
                     dict(rows_per_block=r, gemv_threads=t))
                    for name in ("dense_h_to_4h", "dense") for bits in (8, 4) for m in (1, 8)
                    for r in (1, 2, 4, 8) for t in (64, 128)]
    for tp, name, (n, k), bits, g, m, dname, tuning in configs:
        dtype = DTYPES[dname]
        qw = random_qweight(n, k, bits, g, device="cuda")
        copies = [qw] + [QuantizedWeight(qw.values.clone(), qw.scale.clone(), bits, k, g)
                         for _ in range(copies_for(qw.nbytes) - 1)]  # distinct memory: no L2 reuse
        ops = [prepare_cuda(c, "cuda", dtype, **tuning) for c in copies]
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        t = gpu_time([lambda op=op: op(x) for op in ops] * max(1, 16 // len(ops)))
        bw = ops[0].nbytes / t
        rows.append(dict(tp=tp, layer=name, n=n, k=k, bits=bits, group_size=g, m=m, dtype=dname,
                         **tuning, us=t * 1e6, gbps=bw / 1e9, ratio_to_copy=bw / copy_bw))
        del ops, copies, qw
    for tp in (8, 4):  # dense fp16 cuBLAS GEMV, M = 1: the unquantized baseline
        for name, (n, k) in shard_shapes(tp).items():
            w = torch.randn(n, k, device="cuda", dtype=torch.float16)
            ws = [w] + [w.clone() for _ in range(copies_for(w.nbytes) - 1)]
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            t = gpu_time([lambda w=w: torch.matmul(x, w.t()) for w in ws] * max(1, 16 // len(ws)))
            rows.append(dict(tp=tp, layer=name, n=n, k=k, bits=16, group_size=None, m=1,
                             dtype="f16", us=t * 1e6, gbps=w.nbytes / t / 1e9,
                             ratio_to_copy=w.nbytes / t / copy_bw))
            del w, ws
    return rows


# ---- 4. prefill -------------------------------------------------------------------

def prefill_times() -> list[dict]:
    rows = []
    for name, (n, k) in shard_shapes(8).items():
        for bits in (8, 4):
            op = prepare_cuda(random_qweight(n, k, bits, None, device="cuda"), "cuda", torch.float16)
            w = op.dequantize().clone()
            for m in (512, 2048):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                total = gpu_time([lambda: op(x)], batches=10)
                deq = gpu_time([op.dequantize], batches=10)
                mm = gpu_time([lambda: torch.matmul(x, w.t())], batches=10)
                rows.append(dict(layer=name, n=n, k=k, bits=bits, m=m, total_us=total * 1e6,
                                 dequant_us=deq * 1e6, matmul_us=mm * 1e6,
                                 tflops=2 * m * n * k / total / 1e12))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write every result here")
    ap.add_argument("--sweep", action="store_true", help="rows-per-block x threads sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("FAIL: no CUDA device visible to torch")
        return 1
    import cupy

    try:
        nvrtc = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as e:  # reported, and the compile below will fail loudly
        nvrtc = f"unavailable ({e})"
    props = torch.cuda.get_device_properties(0)
    info = dict(device=props.name, capability="%d.%d" % (props.major, props.minor),
                torch=torch.__version__, cupy=cupy.__version__, nvrtc=nvrtc)
    print("== device:", ", ".join(f"{k} {v}" for k, v in info.items()))
    report: dict = dict(info=info)
    failures = 0
    t0 = time.time()
    try:
        report["parity"] = parity_checks()
        failures = sum(not r["ok"] for r in report["parity"])
        print(f"== parity: {len(report['parity']) - failures}/{len(report['parity'])} passed"
              f" ({time.time() - t0:.0f}s)")
        for r in report["parity"]:
            if not r["ok"]:
                print("   FAIL", r)
        copy_bw = copy_bandwidth()
        report["copy_gbps"] = copy_bw / 1e9
        print(f"== device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
        report["gemv"] = gemv_bandwidth(copy_bw, args.sweep)
        print("== GEMV (packed weight + scale bytes / kernel time):")
        for r in report["gemv"]:
            tune = f" R={r['rows_per_block']} T={r['gemv_threads']}" if "rows_per_block" in r else ""
            print(f"   tp{r['tp']} {r['layer']:<16} [{r['n']:>5},{r['k']:>5}] w{r['bits']:<2}"
                  f" {'row' if r['group_size'] is None else 'g%d' % r['group_size']:<4} {r['dtype']:<4}"
                  f" M={r['m']}{tune}: {r['us']:8.1f} us {r['gbps']:7.0f} GB/s"
                  f"  {100 * r['ratio_to_copy']:5.1f}% of copy")
        report["prefill"] = prefill_times()
        print("== prefill (fp16, dequantize + cuBLAS), tp8 shapes:")
        for r in report["prefill"]:
            print(f"   {r['layer']:<16} w{r['bits']} M={r['m']:<5} total {r['total_us']:8.1f} us"
                  f" (dequant {r['dequant_us']:7.1f}, matmul {r['matmul_us']:8.1f}) {r['tflops']:6.1f} TFLOP/s")
    except Exception:
        traceback.print_exc()
        failures += 1
        report["error"] = traceback.format_exc()
    report["failures"] = failures
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"== {'OK' if failures == 0 else 'FAILED (%d)' % failures} in {time.time() - t0:.0f}s")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
