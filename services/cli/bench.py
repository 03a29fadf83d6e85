"""``glm bench serve``: load a server with concurrent streaming clients (Poisson arrivals, mixed
prompt and output lengths) and report throughput, TTFT and inter-token latency.

Without ``--address`` it starts one local stack per batching mode in turn (continuous, static,
sequential = the official one-request-at-a-time behaviour), each with the same checkpoint and
the same seeded load, and prints a table and the ratios between the modes. With ``--address``
it measures that running server only, in whatever mode it runs; ``--api openai`` makes that
server any OpenAI-compatible completions server. ``--peer HOST:PORT`` adds a running peer
server (vLLM, say), measured right after our rows with the same seeded load, in the same
table, with the ratios ours ÷ peer.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from services.bench.cpu_split import CpuSplit, format_cpu
from services.bench.driver import run_load, server_model
from services.bench.redis_load import RedisLoad, format_line
from services.bench.stats import peer_ratios, ratios, summarise
from services.bench.workload import make_workload
from services.local import LocalStack, StackError
from services.local_options import MODES, ServeOptions
from services.common.net import free_port



def machine(cpu_flags: bool = False) -> dict:
    """The CPU model, cores, Python and platform; with ``cpu_flags``, lscpu's flags too."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    found = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
             "platform": platform.platform()}
    if cpu_flags:
        found["cpu_flags"] = _cpu_flags()
    return found


def _cpu_flags() -> list[str]:
    """The CPU's feature flags (lscpu's ``Flags``: avx512_bf16, amx_tile...), sorted."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def _log(args, text: str) -> None:
    print(f"glm bench: {text}", file=sys.stderr, flush=True)


def measure(address: str, args, model: str = "", api: str = "grpc", on_start=None) -> dict:
    """Warm the server up, then run the seeded workload against it; one mode's report.
    ``on_start``, when given, is called between the warm-up and the measured run."""
    workload = make_workload(args.requests, rate=args.rate, min_new_tokens=args.min_new_tokens,
                             max_new_tokens=args.max_new_tokens, seed=args.seed,
                             prompt_tokens=args.prompt_tokens, early_stops=args.early_stops)
    load = dict(api=api, model=model, temperature=args.temperature, extra_body=args.extra_body)
    if args.warmup:
        warm = make_workload(args.warmup, rate=0, min_new_tokens=2, max_new_tokens=4, seed=args.seed + 1)
        asyncio.run(run_load(address, warm, concurrency=args.warmup, duration_s=600, **load))
    if on_start is not None:
        on_start()
    started = time.perf_counter()
    results = asyncio.run(run_load(address, workload, concurrency=args.concurrency,
                                   duration_s=args.duration_s, **load))
    report = summarise(results)
    report["wall_s"] = time.perf_counter() - started
    return report


def measure_peer(args) -> dict:
    """The peer's row: its model resolved (``--peer-model`` or the server's first), then the
    same workload as our rows."""
    model = args.peer_model or asyncio.run(server_model(args.peer_api, args.peer, extra_body=args.extra_body))
    args.peer_model = model
    _log(args, f"{args.peer_label}: {args.requests} requests at {args.rate}/s, concurrency "
               f"{args.concurrency} ({args.peer_api} {args.peer}, model {model or 'default'})")
    report = measure(args.peer, args, model=model, api=args.peer_api)
    _log(args, f"{args.peer_label}: {report['completed']}/{args.requests} completed")
    return report


def stack_processes(stack: LocalStack) -> dict[str, list[int]]:
    """The local stack's processes by role, and this one (the load generator)."""
    return {"workers": [pid for pool in stack.pools for pid in pool.pids],
            "schedulers": [p.pid for p in stack.schedulers],
            "gateway": [stack.gateway.pid] if stack.gateway is not None else [],
            "redis": [stack.redis.process.pid] if stack.redis is not None else [],
            "load generator": [os.getpid()]}


def bench_local(args, checkpoint: str) -> dict[str, dict]:
    """One stack per mode, started and stopped in turn."""
    reports = {}
    logs = tempfile.mkdtemp(prefix="glm-bench-logs-")
    for mode in args.modes:
        options = ServeOptions.from_flat(
            checkpoint=checkpoint, model_name="glm-bench", port=free_port(), tp=args.tp,
            dtype=args.dtype, device=args.device, mode=mode, max_batch_size=args.max_batch_size,
            kv_memory_gib=args.kv_memory_gib, threads=args.threads, workdir=logs,
            gateway_args=("--max-queue-depth", str(max(1024, args.requests))))
        _log(args, f"{mode}: starting a stack ({checkpoint})")
        stack = LocalStack(options).start()
        try:
            _log(args, f"{mode}: {args.requests} requests at {args.rate}/s, concurrency {args.concurrency}")
            load = RedisLoad(stack.redis_url)
            cpu = CpuSplit(stack_processes(stack))

            def start() -> None:
                load.start()
                cpu.start()

            reports[mode] = measure(stack.address, args, model="glm-bench", on_start=start)
            reports[mode]["cpu"] = cpu.report()
            reports[mode]["redis"] = load.report(reports[mode]["generated_tokens"], reports[mode]["elapsed_s"])
            load.close()
            stack.check_alive()
        except StackError as exc:
            raise StackError(f"{exc} (logs in {logs})") from None
        finally:
            stack.stop()
        _log(args, f"{mode}: {reports[mode]['completed']}/{args.requests} completed")
    shutil.rmtree(logs, ignore_errors=True)
    return reports


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(reports: dict[str, dict], compared: dict[str, dict]) -> str:
    width = max([12] + [len(name) + 2 for name in reports])
    head = (f"{'mode':<{width}}{'done':>7}{'req/s':>8}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'ITL p50':>9}{'ITL p99':>9}{'lat p50':>9}   (times in ms)")
    lines = [head]
    for mode, r in reports.items():
        lines.append(
            f"{mode:<{width}}{r['completed']:>3}/{r['requests']:<3}{_num(r['throughput_rps']):>8}"
            f"{_num(r['throughput_tok_s'], 1):>8}{_ms(r['ttft_s']['p50']):>10}{_ms(r['ttft_s']['p99']):>10}"
            f"{_ms(r['itl_s']['p50']):>9}{_ms(r['itl_s']['p99']):>9}{_ms(r['latency_s']['p50']):>9}")
    for name, row in compared.items():
        lines.append(
            f"{name.replace('_vs_', ' vs ')}: throughput x{_num(row['throughput_tok_s'])} tokens/s, "
            f"x{_num(row['throughput_rps'])} requests/s; TTFT p50 x{_num(row['ttft_p50'])}, "
            f"p99 x{_num(row['ttft_p99'])}; ITL p50 x{_num(row['itl_p50'])}, p99 x{_num(row['itl_p99'])}")
    lines += [format_line(mode, r["redis"]) for mode, r in reports.items() if "redis" in r]
    lines += [f"{mode}: {format_cpu(r['cpu'])}" for mode, r in reports.items() if "cpu" in r]
    if compared:
        lines.append("(ratios are first / second: above 1 is better for throughput, below 1 for latency)")
    return "\n".join(lines)


def check_args(args) -> None:
    """Refuse flag combinations that cannot be measured, before anything starts."""
    if args.requests < 1 or args.concurrency < 1 or args.duration_s <= 0:
        raise ValueError("--requests, --concurrency and --duration-s must be positive")
    if not 1 <= args.min_new_tokens <= args.max_new_tokens:
        raise ValueError("need 1 <= --min-new-tokens <= --max-new-tokens")
    if args.redis_url and not args.address:
        raise ValueError("--redis-url is for --address (a local stack reports its own Redis)")
    if args.api != "grpc" and not args.address:
        raise ValueError(f"--api {args.api} needs --address (the local stacks speak gRPC; "
                         "use --peer to add another server to them)")
    if not args.peer and (args.peer_model or args.peer_label != "peer" or args.peer_api != "openai"):
        raise ValueError("--peer-model, --peer-label and --peer-api need --peer HOST:PORT")
    if args.peer and args.peer_label == (args.label if args.address else None):
        raise ValueError(f"--peer-label {args.peer_label!r} is also the --label of --address")
    if isinstance(args.extra_body, str):
        try:
            args.extra_body = json.loads(args.extra_body) if args.extra_body else {}
        except ValueError as exc:
            raise ValueError(f"--extra-body: not JSON ({exc})") from None
        if not isinstance(args.extra_body, dict):
            raise ValueError("--extra-body: expected a JSON object of request fields")
    if args.extra_body and "openai" not in (args.api, args.peer and args.peer_api):
        raise ValueError("--extra-body is for OpenAI servers (--api openai or --peer)")


def serve(args) -> int:
    check_args(args)
    checkpoint = None
    if args.address:
        model = args.model or asyncio.run(server_model(args.api, args.address, extra_body=args.extra_body))
        load = RedisLoad(args.redis_url) if args.redis_url else None
        reports = {args.label: measure(args.address, args, model=model, api=args.api,
                                       on_start=load.start if load else None)}
        if load is not None:
            report = reports[args.label]
            report["redis"] = load.report(report["generated_tokens"], report["elapsed_s"])
            load.close()
    else:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in args.modes if m not in MODES]
        if unknown or not args.modes:
            raise ValueError(f"--modes: choose from {', '.join(MODES)}, got {unknown or 'nothing'}")
        if args.peer_label in args.modes:
            raise ValueError(f"--peer-label {args.peer_label!r} is also a mode's name")
        if args.checkpoint:
            checkpoint = args.checkpoint
        else:
            from services.cli.serve import demo_checkpoint
            checkpoint = str(demo_checkpoint(Path(args.cache_dir)))
        reports = bench_local(args, checkpoint)
    if args.peer:
        reports[args.peer_label] = measure_peer(args)
    compared = ratios(reports)
    against_peer = peer_ratios(reports, args.peer_label) if args.peer else {}
    if args.json:
        settings = {k: getattr(args, k) for k in (
            "requests", "rate", "concurrency", "min_new_tokens", "max_new_tokens", "prompt_tokens", "early_stops",
            "duration_s",
            "seed", "temperature", "max_batch_size", "tp", "dtype", "device", "address", "api",
            "extra_body")}
        if args.peer:
            settings["peer"] = {"address": args.peer, "api": args.peer_api, "model": args.peer_model,
                                "label": args.peer_label}
        print(json.dumps({"machine": machine(), "checkpoint": checkpoint, "settings": settings,
                          "modes": reports, "ratios": compared, "peer_ratios": against_peer}, indent=2))
    else:
        print(format_table(reports, {**compared, **against_peer}))
    bad = [m for m, r in reports.items() if r["failed"] and r["errors"] != ["cut at --duration-s"]]
    if bad:
        _log(args, f"requests failed in {', '.join(bad)}: " + "; ".join(reports[bad[0]]["errors"]))
    return 1 if bad else 0


def gemv(args) -> int:
    from model.config import GLMConfig
    from services.bench.gemv import DTYPES, QUANTS, format_report, run_gemv

    def items(text: str, flag: str, allowed=None) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise ValueError(f"{flag}: choose from {', '.join(allowed)}, got {bad or 'nothing'}")
        return values

    batches = items(args.batch, "--batch")
    if not all(b.isdigit() and int(b) > 0 for b in batches):
        raise ValueError(f"--batch: positive integers, got {args.batch!r}")
    report = run_gemv(
        GLMConfig.from_name(args.preset), tp=args.tp, dtypes=items(args.dtypes, "--dtypes", DTYPES),
        quants=items(args.quant, "--quant", QUANTS), batches=[int(b) for b in batches],
        shapes=[s.strip() for s in args.shapes.split(",") if s.strip()] or None, repeats=args.repeats,
        bandwidth_gib=args.bandwidth_gib, max_gib=args.max_gib, with_compile=args.compile,
        log=lambda text: _log(args, text))
    if args.json:
        print(json.dumps({"machine": machine(), "preset": args.preset, "tp": args.tp, **report.to_dict()}, indent=2))
    else:
        print(format_report(report, machine()))
def step(args) -> int:
    """``glm bench step``: the model-level ladder (``services.bench.step``)."""
    from services.bench.step import StepBench, run as run_step
    from services.bench.step_report import format_table

    bench = StepBench(checkpoint=args.checkpoint, load_format=args.load_format, preset=args.preset,
                      num_layers=args.num_layers, dtype=args.dtype, quant=None if args.quant == "none" else args.quant,
                      tp=args.tp, batches=tuple(args.batch), prompt_tokens=args.prompt_tokens,
                      context_tokens=args.context_tokens, steps=args.steps, warmup=args.warmup,
                      bandwidth_gib=args.bandwidth_gib, threads=args.threads, kv_cache=args.kv_cache,
                      kv_block_size=args.kv_block_size)
    report = run_step(bench)
    if args.json:
        print(json.dumps({"machine": machine(cpu_flags=True), **report}, indent=2))
    else:
        print(format_table(report))
    return 0


def run(args) -> int:
    if args.bench_command == "serve":
        return serve(args)
    if args.bench_command == "gemv":
        return gemv(args)
    if args.bench_command == "step":
        return step(args)
    raise ValueError(f"unknown bench command {args.bench_command}")
