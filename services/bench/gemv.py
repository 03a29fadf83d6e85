"""``glm bench gemv``: every linear of a preset's decode step against the machine's read bandwidth.

Decode at batch 1 is a chain of GEMVs: each reads its whole weight once to produce one row, so the
floor of its time is the weight's bytes over the memory read bandwidth. This rung measures that
bandwidth (best of N: a sum, a max and a dot over a ``--bandwidth-gib`` fp32 buffer; a copy too),
then, for each linear shape of ``--preset`` at ``--tp`` (one rank's shard: QKV, attention dense,
GeGLU h→2·inner, inner→h, the tied LM head vocab/tp × h) × dtype × quantization × batch, times
every candidate implementation (best of ``--repeats``) and reports ms, the bytes it must move
(the weight as stored, scales included, plus the activations in and out), GB/s and the fraction
of the read bandwidth, the winner of each case marked, and what the model itself runs.

Shapes are built one at a time, directly with random values (no checkpoint), and freed before
the next; a case whose peak memory would pass ``--max-gib`` is skipped and reported as skipped.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import kernels.cpu as cpu
from kernels import cpu_gemv, cpu_int4
from kernels.cpu_dense import CpuDenseLinear, choose_layout, native_bf16
from kernels.reference import QuantizedWeight, dequantize
from model.config import GLMConfig
from services.bench.bandwidth import GIB, best_of, measure_bandwidth

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTS = ("none", "int8", "int4")


@dataclass
class Result:
    """One implementation timed on one case."""

    shape: str
    out_features: int
    in_features: int
    dtype: str
    quant: str
    batch: int
    impl: str
    ms: float | None = None
    median_ms: float | None = None
    bytes: int = 0
    gb_s: float | None = None
    fraction: float | None = None
    winner: bool = False
    model: bool = False  # the implementation the model runs for this case
    note: str = ""


@dataclass
class Report:
    """The bandwidth figures and every result."""

    read_gb_s: float
    copy_gb_s: float
    bandwidth: dict = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"read_gb_s": self.read_gb_s, "copy_gb_s": self.copy_gb_s, "bandwidth": self.bandwidth,
                "results": [asdict(r) for r in self.results]}


def linear_shapes(config: GLMConfig, tp: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of one rank's linears: the four of a layer and the tied LM head."""
    config.check_tp(tp)
    h, inner, vocab = config.hidden_size, config.inner_hidden_size, config.vocab_size
    if vocab % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide vocab_size ({vocab})")
    return [
        ("qkv", 3 * h // tp, h),
        ("attn_dense", h, h // tp),
        ("h_to_4h", 2 * inner // tp, h),
        ("4h_to_h", h, inner // tp),
        ("lm_head", vocab // tp, h),
    ]


def _random_quantized(out_f: int, in_f: int, bits: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    cols = in_f if bits == 8 else in_f // 2
    low, high = (-127, 128) if bits == 8 else (-128, 128)  # any byte is two valid nibbles
    values = torch.randint(low, high, (out_f, cols), generator=g, dtype=torch.int8)
    scale = (torch.rand(out_f, generator=g) * 1e-3 + 1e-4).half()
    return QuantizedWeight(values, scale, bits, in_f)


GEMV_NAME = "C GEMV (kernels.cpu_gemv)"
INT4_GEMV_NAME = "C INT4 GEMV (kernels.cpu_int4)"


def _dense_candidates(weight: torch.Tensor, with_compile: bool):
    """(name, builder) pairs; each builder returns (callable(x), bytes read) and holds its copy."""
    def layout(name):
        def build():
            op = CpuDenseLinear(weight, layout=name)
            return op, op.nbytes or weight.numel() * weight.element_size()
        return build

    cands = [
        ("F.linear [out,in]", layout("linear")),
        ("torch.mm(x, W.t())", lambda: ((lambda x: torch.mm(x, weight.t())), weight.nbytes)),
        ("x @ Wt [in,out]", layout("transposed")),
        ("oneDNN packed", layout("packed")),
    ]
    if weight.dtype == torch.bfloat16 and cpu_gemv.supports(weight):
        cands.append((GEMV_NAME, lambda: ((lambda x: cpu_gemv.matmul_t(x, weight)), weight.nbytes)))
    if with_compile:
        def compiled():
            fn = torch.compile(lambda x: F.linear(x, weight), dynamic=False)
            return fn, weight.nbytes
        cands.append(("torch.compile(F.linear)", compiled))
    return cands


def _quant_candidates(qw: QuantizedWeight, dtype: torch.dtype):
    cands = []
    kernel = "_weight_int8pack_mm" if qw.bits == 8 else "_weight_int4pack_mm_for_cpu"

    def kernel_op():
        op = cpu.CpuQuantizedLinear(qw, kernel_max_rows=1 << 30, gemv=False)
        if not op.has_kernel:
            raise RuntimeError("no kernel for this shape")
        return op, op.nbytes - (qw.values.numel() if qw.bits == 4 else 0)

    if dtype == torch.bfloat16:
        cands.append((kernel, kernel_op))
        if cpu_int4.supports(qw):
            scale = cpu_int4.scales(qw)
            cands.append((INT4_GEMV_NAME, lambda: ((lambda x: cpu_int4.matmul_t(x, qw, scale)), qw.nbytes)))
    else:
        def cast_op():
            op, nbytes = kernel_op()
            return (lambda x: op(x.to(torch.bfloat16)).to(x.dtype)), nbytes
        cands.append((f"bf16 cast + {kernel}", cast_op))
    for compute in dict.fromkeys((dtype, torch.float32)):
        name = f"dequantize({str(compute).removeprefix('torch.')}) + matmul"
        cands.append((name, lambda c=compute: (
            (lambda x: (x.to(c) @ dequantize(qw, c).t()).to(x.dtype)), qw.nbytes)))
    return cands


def model_choice(dtype: torch.dtype, quant: str, batch: int, shape: str = "", int4_gemv: bool = False) -> str:
    """The candidate name the model's prepared op runs for this case (``shape``: the linear's
    name; the tied head at one or two bf16 rows takes ``kernels.cpu_gemv`` where it runs; an INT4
    linear the INT4 GEMV serves, ``int4_gemv``, takes it up to its ``MAX_ROWS``: both are measured
    when the model is prepared, so the mark is where they may run)."""
    if (shape == "lm_head" and quant == "none" and dtype == torch.bfloat16 and batch <= cpu_gemv.MAX_ROWS
            and cpu_gemv.kernel() is not None):
        return GEMV_NAME
    if quant == "none":
        return {"linear": "F.linear [out,in]", "packed": "oneDNN packed",
                "transposed": "x @ Wt [in,out]"}[choose_layout(dtype)]
    kernel = "_weight_int8pack_mm" if quant == "int8" else "_weight_int4pack_mm_for_cpu"
    if quant == "int4" and int4_gemv and dtype == torch.bfloat16 and batch <= cpu_int4.MAX_ROWS:
        return INT4_GEMV_NAME
    if dtype == torch.bfloat16 and batch <= cpu.KERNEL_MAX_ROWS:
        return kernel
    compute = cpu.bf16_dense_compute() if dtype == torch.bfloat16 else dtype
    return f"dequantize({str(compute).removeprefix('torch.')}) + matmul"


def _peak_bytes(out_f: int, in_f: int, dtype: torch.dtype, quant: str) -> int:
    n = out_f * in_f
    if quant == "none":
        return 2 * n * dtype.itemsize  # the weight and one candidate's copy
    # canonical int values + the dequantize path's fp32 product and its cast (the int4 repack's
    # int32 temporary is of the same size)
    return n + n * 4 + n * dtype.itemsize


def run_case(name: str, out_f: int, in_f: int, dtype: torch.dtype, quant: str, batches: list[int],
             repeats: int, with_compile: bool, read_gb_s: float, seed: int) -> list[Result]:
    dname = str(dtype).removeprefix("torch.")
    if quant == "none":
        weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
        cands = _dense_candidates(weight, with_compile)
    else:
        weight = _random_quantized(out_f, in_f, 8 if quant == "int8" else 4, seed)
        cands = _quant_candidates(weight, dtype)
    int4_gemv = quant == "int4" and cpu_int4.supports(weight)
    results = []
    for impl, build in cands:
        try:
            fn, wbytes = build()
        except RuntimeError as exc:
            results.extend(Result(name, out_f, in_f, dname, quant, b, impl, note=f"unavailable: {exc}")
                           for b in batches)
            continue
        for b in batches:
            x = torch.randn(b, in_f).to(dtype)
            moved = wbytes + b * (in_f + out_f) * dtype.itemsize
            try:
                t, med = best_of(lambda: fn(x), repeats)
            except RuntimeError as exc:
                results.append(Result(name, out_f, in_f, dname, quant, b, impl, note=f"failed: {exc}"))
                continue
            results.append(Result(name, out_f, in_f, dname, quant, b, impl, ms=t * 1e3, median_ms=med * 1e3,
                                  bytes=moved, gb_s=moved / t / 1e9, fraction=moved / t / 1e9 / read_gb_s))
        del fn
        gc.collect()
    del weight, cands
    gc.collect()
    for b in batches:
        timed = [r for r in results if r.batch == b and r.ms is not None]
        if timed:
            min(timed, key=lambda r: r.ms).winner = True
        chosen = model_choice(dtype, quant, b, name, int4_gemv)
        for r in results:
            r.model = r.model or (r.batch == b and r.impl == chosen)
    return results


def run_gemv(config: GLMConfig, *, tp: int, dtypes: list[str], quants: list[str], batches: list[int],
             shapes: list[str] | None, repeats: int, bandwidth_gib: float, max_gib: float,
             with_compile: bool, log=print) -> Report:
    """Measure the bandwidth, then every case in turn (one shape alive at a time)."""
    bw = measure_bandwidth(bandwidth_gib, repeats)
    gc.collect()
    log(f"read {bw['read_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s")
    report = Report(bw["read_gb_s"], bw["copy_gb_s"], bw)
    all_shapes = linear_shapes(config, tp)
    known = [s[0] for s in all_shapes]
    if shapes:
        unknown = [s for s in shapes if s not in known]
        if unknown:
            raise ValueError(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        all_shapes = [s for s in all_shapes if s[0] in shapes]
    for i, (name, out_f, in_f) in enumerate(all_shapes):
        for dname in dtypes:
            dtype = DTYPES[dname]
            for quant in quants:
                if name == "lm_head" and quant != "none":
                    continue  # the embedding and its tied head are never quantized
                peak = _peak_bytes(out_f, in_f, dtype, quant)
                if peak > max_gib * GIB:
                    report.results.append(Result(name, out_f, in_f, dname, quant, batches[0], "-", note=(
                        f"skipped: needs ~{peak / GIB:.1f} GiB > --max-gib {max_gib}")))
                    log(f"{name} {dname} {quant}: skipped ({peak / GIB:.1f} GiB)")
                    continue
                done = run_case(name, out_f, in_f, dtype, quant, batches, repeats, with_compile,
                                report.read_gb_s, seed=i)
                report.results.extend(done)
                log(f"{name} [{out_f} x {in_f}] {dname} {quant}: " + ", ".join(
                    f"{r.impl} b{r.batch} {r.ms:.3f} ms ({r.fraction:.2f})" if r.ms is not None else
                    f"{r.impl} b{r.batch} {r.note}" for r in done))
    return report


def format_report(report: Report, machine: dict | None = None) -> str:
    bw = report.bandwidth
    lines = []
    if machine:
        lines.append(f"machine: {machine.get('cpu')} ({machine.get('cores')} cores), torch {torch.__version__}, "
                     f"{torch.get_num_threads()} threads, oneDNN native bf16: {native_bf16()}")
    lines.append("read bandwidth: " + ", ".join(
        f"{k.removeprefix('read_').removesuffix('_gb_s')} {v:.1f}" for k, v in bw.items()
        if k.startswith("read_") and k != "read_gb_s") + f" GB/s -> {report.read_gb_s:.1f} GB/s (best); "
        f"copy {report.copy_gb_s:.1f} GB/s (read + write)")
    lines.append(f"{'shape':<11}{'out x in':>16} {'dtype':<9}{'quant':<6}{'b':>3}  {'implementation':<40}"
                 f"{'ms':>9}{'MB':>9}{'GB/s':>7}{'frac':>6}")
    for r in report.results:
        mark = ("*" if r.winner else " ") + ("m" if r.model else " ")
        if r.ms is None:
            lines.append(f"{r.shape:<11}{f'{r.out_features} x {r.in_features}':>16} {r.dtype:<9}{r.quant:<6}"
                         f"{r.batch:>3}  {r.impl:<40}  {r.note}")
            continue
        lines.append(f"{r.shape:<11}{f'{r.out_features} x {r.in_features}':>16} {r.dtype:<9}{r.quant:<6}"
                     f"{r.batch:>3}{mark} {r.impl:<40}{r.ms:>9.3f}{r.bytes / 1e6:>9.1f}{r.gb_s:>7.1f}"
                     f"{r.fraction:>6.2f}")
    lines.append("(* = fastest of the case, m = what the model runs; ms = best of the repeats; MB = weight as "
                 "stored incl. scales + activations; frac = GB/s / read bandwidth)")
    return "\n".join(lines)
