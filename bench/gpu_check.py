"""The GPU check: CUDA kernels, bandwidth and full GLM-130B decode, in one run (< 8 min on an H200).

    python bench/gpu_check.py [--quick] [--json OUT]                    # on the GPU machine
    python bench/gpu_check.py --device cpu --preset glm-tiny --layers 2 --quick   # every path, on a CPU

1. Kernels (``bench/gpu_kernel_checks.py``): the quantized linears (``kernels.prepare``: the CUDA kernels on cuda) against
   ``kernels.reference`` at the preset's shard shapes (GLM-130B: hidden 12288, inner 32768)
   for TP 1/4/8, INT8 and INT4, batch 1/8/32/64; and the paged decode attention
   (``kernels.cuda_paged``) against ``kernels.reference.paged_decode`` at the shard's heads
   for rows of 1 to 2048 tokens; random data, fresh every run.
2. Bandwidth: a large device-to-device copy ((read + write) bytes / time), and the decode
   GEMV (M = 1 and 8) at the same shapes: packed bytes / time, and the fraction of the copy.
3. Model: the preset (70 layers for glm-130b; ``--layers`` shortens it) with random INT4
   weights built on the device (``model.dummy`` when present, else the builder below; no
   host copy of the weights), TP 1, its KV in a paged pool (``model.paged_kv``) as the worker
   holds it. Decode at batch 1/8/32/64, eager and through CUDA graphs (``model.cuda_graphs``),
   and a 512-token prefill; ms per step against the floor
   ``(weight + KV bytes) / copy bandwidth`` and the published FasterTransformer INT4 figures.

On a CPU every path runs (the CPU backend of ``kernels.prepare`` in the kernel checks, the
static-shape decode without capture) except the CUDA kernels and the capture, which it says
it skips. The last line of the output is the JSON summary; exit status 1 when a check fails.
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

import kernels  # noqa: E402
from gpu_kernel_checks import free_memory, kernel_checks, paged_checks, random_qweight, shard_shapes  # noqa: E402
from kernels import cpu_paged, cuda_paged  # noqa: E402
from kernels.reference import QuantizedWeight  # noqa: E402
from model.config import GMASK_ID, GLMConfig  # noqa: E402
from model.cuda_graphs import PagedDecodeGraphs  # noqa: E402
from model.engine import Batch, Engine, RequestState  # noqa: E402
from model.kv_footprint import blocks_for  # noqa: E402
from model.paged_kv import BlockPool, PagedStep  # noqa: E402
from model.glm import GLMModel  # noqa: E402
from model.prompt import Blank  # noqa: E402
from model.quantization import SCALE_SUFFIX, QuantSpec, is_quantized_weight, is_scale  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402

# FasterTransformer's GLM-130B INT4 decode, ms per token (the official GLM-130B repository's FasterTransformer guide)
OFFICIAL = {"FasterTransformer INT4, 4x RTX 3090": (64, 73), "FasterTransformer INT4, 8x A100": (34, 42)}
BLOCK_SIZE = 16   # the worker's default --kv-block-size
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---- timing ---------------------------------------------------------------------------

class Clock:
    """Seconds of work on one device: CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, repeat: int, warmup: int = 1, calls: int = 1) -> float:
        """Median seconds per call of ``fn()``, which makes ``calls`` calls, over ``repeat`` runs
        after ``warmup``. On a GPU the stream is first held busy (``torch.cuda._sleep``) so that
        the Python launch loop does not leave it idle inside the timed span."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            self.sync()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if calls > 1 and hasattr(torch.cuda, "_sleep"):
                    torch.cuda._sleep(200_000 * calls)                  # ~100 us of GPU time per call
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / calls)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) / calls)
        return statistics.median(times)


# ---- 2. bandwidth -----------------------------------------------------------------------

def copy_bandwidth(clock: Clock, nbytes: int) -> float:
    """(read + write) bytes per second of a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=clock.device)
    dst = torch.empty_like(src)
    seconds = clock.time(lambda: dst.copy_(src), repeat=10, warmup=2)
    return 2 * nbytes / seconds


def copies_for(device: torch.device, nbytes: int) -> int:
    """Weight copies to rotate over so that a timed batch does not live in the GPU's L2."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) or (64 << 20)
    return max(1, min(32, math.ceil(3 * l2 / nbytes)))


def gemv_bandwidth(config: GLMConfig, clock: Clock, dtype: torch.dtype, copy_bw: float, tps, repeat: int) -> list[dict]:
    gen = torch.Generator(device=clock.device).manual_seed(1)
    rows = []
    for tp in tps:
        for name, (n, k) in shard_shapes(config, tp).items():
            for bits in (4, 8):
                qw = random_qweight(n, k, bits, clock.device, gen)
                ops = [kernels.prepare(QuantizedWeight(qw.values.clone(), qw.scale.clone(), bits, k, None),
                                       device=clock.device, dtype=dtype)
                       for _ in range(copies_for(clock.device, qw.nbytes))]   # distinct memory: no L2 reuse
                rounds = max(1, 16 // len(ops))
                for m in (1, 8):
                    x = torch.randn(m, k, device=clock.device, dtype=torch.float32, generator=gen).to(dtype)

                    def run():
                        for _ in range(rounds):
                            for op in ops:
                                op(x)

                    seconds = clock.time(run, repeat=repeat, warmup=2, calls=rounds * len(ops))
                    bw = qw.nbytes / seconds
                    rows.append(dict(tp=tp, layer=name, n=n, k=k, bits=bits, m=m, us=seconds * 1e6,
                                     gbps=bw / 1e9, fraction_of_copy=bw / copy_bw, copies=len(ops)))
                del ops, qw
                free_memory(clock.device)
    return rows


# ---- 3. the model -----------------------------------------------------------------------

def random_model(config: GLMConfig, dtype: torch.dtype, device: torch.device, quant: QuantSpec) -> GLMModel:
    """TP 1 with random weights drawn on ``device`` (``model.dummy`` when it is there)."""
    try:
        from model.dummy import build_dummy_model
    except ImportError:
        build_dummy_model = None
    if build_dummy_model is not None:
        print("   weights: model.dummy.build_dummy_model")
        return build_dummy_model(config, dtype=dtype, device=device, quant=quant)
    print("   weights: the random builder of bench/gpu_check.py (model.dummy is not there)")
    model = GLMModel(config, dtype=dtype, device=device, quant=quant)
    gen = torch.Generator(device=device).manual_seed(0)
    state = model.state_dict()
    with torch.no_grad():
        for key, t in state.items():
            if is_scale(key):
                continue
            if is_quantized_weight(key):   # INT8 values in [-127, 127]; INT4: any byte, two nibbles
                low = -127 if quant.bits == 8 else -128
                t.random_(low, 128, generator=gen)
                fan_in = t.shape[1] * (8 // quant.bits)
                limit = 127 if quant.bits == 8 else 7
                state[key + SCALE_SUFFIX].fill_(math.sqrt(3) / (limit * math.sqrt(fan_in)))
            elif "layernorm" in key and key.endswith(".weight"):
                t.fill_(1.0)
            elif key.endswith(".bias"):
                t.zero_()
            else:
                t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]), generator=gen)
    return model.eval().prepare()


def weight_params(model: GLMModel) -> int:
    """Weights of the matmuls of one token (the quantized ones unpacked; the head once)."""
    n = 0
    for key, t in model.state_dict().items():
        if is_quantized_weight(key):
            n += t.numel() * (2 if model.quant.bits == 4 else 1)
        elif not is_scale(key) and t.dim() == 2:
            n += t.numel()
    return n


def weight_bytes(model: GLMModel) -> int:
    """Bytes a decode step reads: every parameter and buffer (the tied head read once)."""
    return sum(t.nbytes for t in model.state_dict().values())


def new_batch(rows: int, context: int, new_tokens: int, batch_id: int = 0) -> Batch:
    """``rows`` greedy rows of ``context`` tokens (text, then [gMASK]) that may generate ``new_tokens``."""
    ids = [20100 + i % 5000 for i in range(context - 1)] + [GMASK_ID]
    return Batch(batch_id, [RequestState(i, Blank.first(ids), SamplingParams(greedy=True), allowed=new_tokens)
                            for i in range(rows)])


def decode_run(engine: Engine, clock: Clock, rows: int, context: int, steps: int) -> tuple[float, torch.Tensor, int]:
    """Prefill ``rows`` rows into the engine's pool (one packed forward), then time ``steps``
    decode forwards, through ``engine.graphs`` when set, else the eager paged step: (seconds
    per step, the first step's logits on the host, the KV tokens the last step read)."""
    batch = engine.prefill(new_batch(rows, context, steps + 4)).batch
    cache = batch.cache
    tokens = torch.full((rows,), 20100, dtype=torch.long, device=clock.device)
    positions = batch.decode_positions(clock.device).view(-1)

    def step() -> torch.Tensor:
        if engine.graphs is not None and (logits := engine.graphs.decode(cache, tokens, positions)) is not None:
            return logits
        return engine.model.step_logits(tokens, positions, PagedStep.build(cache, rows, []))

    first = step()[:, :4096].float().cpu()
    seconds = clock.time(step, repeat=steps, warmup=1)
    used = max(cache.lengths)
    batch.release()
    return seconds, first, used


def model_runs(args, config: GLMConfig, clock: Clock, dtype: torch.dtype, copy_bw: float) -> dict:
    device = clock.device
    t0 = time.perf_counter()
    model = random_model(config, dtype, device, QuantSpec.parse(args.quant))
    clock.sync()
    wbytes = weight_bytes(model)
    kv_per_slot = 2 * config.num_layers * config.hidden_size * torch.empty((), dtype=dtype).element_size()
    out = dict(layers=config.num_layers, quant=args.quant, dtype=args.dtype, weight_gb=wbytes / 1e9,
               build_s=time.perf_counter() - t0, decode=[], prefill=None)
    print(f"   built {config.num_layers} layers, {wbytes / 1e9:.1f} GB of weights in {out['build_s']:.0f}s")
    batches = args.batches
    blocks = max(max(batches) * blocks_for(args.context + args.steps + 8, BLOCK_SIZE), blocks_for(args.prefill, BLOCK_SIZE))
    pool = BlockPool(config.num_layers, blocks, BLOCK_SIZE, config.num_attention_heads, config.head_dim,
                     dtype=dtype, device=device, scratch=True)
    out["kv_pool_gb"] = pool.nbytes() / 1e9
    kernel = (cuda_paged.supports(device, dtype, config.head_dim) if device.type == "cuda"
              else cpu_paged.supports(dtype))
    out["paged_kernel"] = kernel
    print(f"   paged KV pool: {blocks} blocks of {BLOCK_SIZE} tokens, {pool.nbytes() / 1e9:.1f} GB;"
          f" decode attention through {'the paged kernel' if kernel else 'the torch path'}")
    for mode in ("eager", "graphs"):
        engine = Engine(model, pool=pool)
        if mode == "graphs":
            graphs = PagedDecodeGraphs(model, pool, max_batch=max(batches), buckets=tuple(batches))
            t1 = time.perf_counter()
            captured = graphs.capture()
            if device.type == "cuda":
                print(f"   captured CUDA graphs for batches {captured} in {time.perf_counter() - t1:.1f}s")
            else:
                print("   (cpu: no capture; the same static-shape decode runs eagerly)")
            engine.graphs = graphs
        for rows in batches:
            seconds, first, used = decode_run(engine, clock, rows, args.context, args.steps)
            floor = (wbytes + rows * used * kv_per_slot) / copy_bw
            row = next((r for r in out["decode"] if r["batch"] == rows), None)
            if row is None:
                row = dict(batch=rows, kv_slots=used, floor_ms=floor * 1e3, first_logits=first)
                out["decode"].append(row)
            row[f"{mode}_ms"] = seconds * 1e3
            row[f"{mode}_tokens_per_s"] = rows / seconds
            if mode == "graphs":
                eager_first = row.pop("first_logits")
                diff = float((first - eager_first).abs().max() / eager_first.abs().max())
                row["graphs_vs_eager_rel"] = diff
                row["graphs_ok"] = bool(math.isfinite(diff) and diff <= args.graph_tolerance)
                row["static_steps"] = graphs.stats.replayed + graphs.stats.static
                graphs.stats.replayed = graphs.stats.static = 0
            print(f"   decode b={rows:<3} {mode:<6} {seconds * 1e3:9.2f} ms/step  {rows / seconds:9.1f} tok/s"
                  f"  floor {floor * 1e3:7.2f} ms  ({floor / seconds:5.1%} of it)")
        assert pool.used_blocks == 0, "a decode run kept blocks"
        del engine
        if mode == "graphs":
            del graphs
        free_memory(device)
    engine = Engine(model, pool=pool)

    def prefill() -> None:                                 # context + sop = --prefill tokens, one packed forward
        done = engine.prefill(new_batch(1, args.prefill - 1, 2))
        if done.batch is not None:
            done.batch.release()

    seconds = clock.time(prefill, repeat=max(1, args.steps // 4), warmup=1)
    flops = 2 * args.prefill * weight_params(model)                      # attention's own FLOPs left out
    out["prefill"] = dict(tokens=args.prefill, ms=seconds * 1e3, ms_per_token=seconds * 1e3 / args.prefill,
                          tflops_approx=flops / seconds / 1e12)
    print(f"   prefill {args.prefill} tokens: {seconds * 1e3:.1f} ms ({seconds * 1e3 / args.prefill:.2f} ms/token)")
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        print(f"   peak device memory {out['peak_memory_gb']:.1f} GB")
    del engine, model, pool
    free_memory(device)
    return out


def print_official(decode: list[dict]) -> None:
    one = next((r for r in decode if r["batch"] == 1), None)
    if one is None:
        return
    best = min(one["eager_ms"], one["graphs_ms"])
    for name, (low, high) in OFFICIAL.items():
        print(f"   batch 1: {best:.1f} ms/token here; {name}: {low}-{high} ms/token"
              f" (theirs / ours: {low / best:.2f}-{high / best:.2f})")


# ---- main -------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--preset", default="glm-130b", help="model preset (glm-130b, glm-small, glm-tiny)")
    ap.add_argument("--layers", type=int, help="shorten the preset to this many layers")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="activations (default: float16 on cuda, float32 on cpu)")
    ap.add_argument("--quant", default="int4", choices=("int4", "int8"))
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, default=128, help="context tokens of each decoded row")
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per batch")
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill")
    ap.add_argument("--graph-tolerance", type=float, help="max |graph - eager| / max |eager| of the first "
                                                          "step's logits (default: 0.02 in 16-bit, 1e-5 in float32)")
    ap.add_argument("--quick", action="store_true", help="TP 8 kernel shapes, batches 1 and 8, 4 steps")
    ap.add_argument("--skip", action="append", default=[], choices=("kernels", "bandwidth", "model"))
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.graph_tolerance is None:
        args.graph_tolerance = 1e-5 if args.dtype == "float32" else 2e-2
    if args.quick:
        args.batches, args.steps = [b for b in args.batches if b <= 8] or [1], min(args.steps, 4)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device visible to torch (use --device cpu for the CPU run)")
    return args


def device_info(device: torch.device) -> dict:
    info = dict(device=str(device), torch=torch.__version__)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 1e9)
        try:
            import cupy
            info.update(cupy=cupy.__version__, nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())))
        except Exception as exc:  # noqa: BLE001 - reported; the kernel check then fails loudly
            info["cupy"] = f"unavailable ({exc})"
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    config = GLMConfig.from_name(args.preset)
    if args.layers:
        config = GLMConfig(**{**config.describe(), "num_layers": args.layers})
    dtype, clock = DTYPES[args.dtype], Clock(device)
    report: dict = dict(info=device_info(device), args={k: str(v) for k, v in vars(args).items()})
    print("== device:", ", ".join(f"{k} {v}" for k, v in report["info"].items()))
    tps = (8,) if args.quick else (1, 4, 8)
    failures, t0 = 0, time.perf_counter()
    try:
        if "kernels" not in args.skip:
            rows = report["kernels"] = kernel_checks(config, device, dtype, tps, (1, 8) if args.quick else (1, 8, 32, 64))
            bad = [r for r in rows if not r["ok"]]
            failures += len(bad)
            print(f"== kernels vs kernels.reference: {len(rows) - len(bad)}/{len(rows)} passed"
                  f" ({time.perf_counter() - t0:.0f}s)")
            for r in bad:
                print("   FAIL", r)
            rows = report["paged"] = paged_checks(config, device, dtype, tps)
            bad = [r for r in rows if not r["ok"]]
            failures += len(bad)
            print(f"== paged decode attention vs kernels.reference: {len(rows) - len(bad)}/{len(rows)} passed"
                  + "".join(f"; tp{r['tp']} {r['heads']}x{r['dim']} max |err| {r['max_abs_err']:.2e}" for r in rows))
            for r in bad:
                print("   FAIL", r)
        copy_bw = copy_bandwidth(clock, (1 << 30) if device.type == "cuda" else (64 << 20))
        report["copy_gbps"] = copy_bw / 1e9
        print(f"== device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
        if "bandwidth" not in args.skip:
            report["gemv"] = gemv_bandwidth(config, clock, dtype, copy_bw, tps, repeat=5 if args.quick else 20)
            print("== decode GEMV (packed bytes / time):")
            for r in report["gemv"]:
                print(f"   tp{r['tp']} {r['layer']:<16} [{r['n']:>5},{r['k']:>5}] w{r['bits']} M={r['m']}:"
                      f" {r['us']:9.1f} us {r['gbps']:7.0f} GB/s {r['fraction_of_copy']:6.1%} of copy")
        if "model" not in args.skip:
            print(f"== {args.preset}, {config.num_layers} layers, {args.quant}, {args.dtype}, TP 1:")
            report["model"] = model_runs(args, config, clock, dtype, copy_bw)
            bad = [r for r in report["model"]["decode"] if not r["graphs_ok"]]
            failures += len(bad)
            for r in bad:
                print(f"   FAIL graphs vs eager at b={r['batch']}: max |diff| / max |logit| {r['graphs_vs_eager_rel']:.3g}")
            print_official(report["model"]["decode"])
    except Exception:  # noqa: BLE001 - the summary still comes out, with the traceback
        traceback.print_exc()
        failures += 1
        report["error"] = traceback.format_exc()
    report["failures"], report["seconds"] = failures, time.perf_counter() - t0
    print(f"== {'OK' if failures == 0 else f'FAILED ({failures})'} in {report['seconds']:.0f}s")
    text = json.dumps(report, default=str)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    print(text)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
