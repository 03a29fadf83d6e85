"""``glm serve``: the all-in-one mode — gateway, scheduler(s) and worker pool(s) as
local processes, with a private Redis unless ``--redis-url`` is given and the demo
model created on first use unless ``--checkpoint`` is given. Once ready it shows a
client call, then serves until interrupted; a process that dies stops the stack."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from services.local import LocalStack, StackError, StackOptions

DEMO_PRESET = "glm-small"
DEMO_PROMPT = "The capital of the country is [MASK], a city by the river."


def demo_checkpoint(cache: Path) -> Path:
    """The demo model, written once (a random glm-small checkpoint + tokenizer)."""
    folder = cache / "demo-glm-small"
    if not (folder / "latest").exists():
        from model.tiny import init_tiny      # only on first use: it needs torch

        print(f"glm serve: creating the demo model in {folder} (first use)", file=sys.stderr)
        init_tiny(folder, preset=DEMO_PRESET, seed=0)
    return folder


def _show_client_call(address: str, model: str) -> None:
    from services.client import GLMClient

    print(f"glm serve: ready on {address}; a client call:", file=sys.stderr)
    print(f"  glm client --address {address} --prompt {DEMO_PROMPT!r} --max-new-tokens 16", file=sys.stderr)
    with GLMClient(address) as client:
        reply = client.generate(DEMO_PROMPT, model=model, max_new_tokens=16, temperature=0, timeout=120)
    print(f"  -> {reply.output_text}", file=sys.stderr)


def run(args) -> int:
    if not 0.0 <= args.layer_trace_ratio <= 1.0:
        raise ValueError(f"--layer-trace-ratio must be in [0, 1], got {args.layer_trace_ratio}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_checkpoint(Path(args.cache_dir))
    name = args.model_name or ("glm-demo" if not args.checkpoint else checkpoint.resolve().name)
    options = StackOptions(
        checkpoint=str(checkpoint), model_name=name, host=args.host, port=args.port,
        redis_url=args.redis_url, tp=args.tp, pools=args.pools, dtype=args.dtype, device=args.device,
        quant=None if args.quant == "none" else args.quant, kv_memory_gib=args.kv_memory_gib,
        mode=args.mode, max_batch_size=args.max_batch_size, tokenizer=args.tokenizer,
        otlp_endpoint=args.otlp_endpoint, layer_trace_ratio=args.layer_trace_ratio,
        metrics_port=args.metrics_port,
    )
    stack = LocalStack(options)
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"glm serve: starting {args.pools} pool(s) of {args.tp} rank(s) for {name}", file=sys.stderr)
    stack.start()
    try:
        if not args.no_demo_call:
            _show_client_call(stack.address, name)
        if stack.metrics is not None:
            print(f"glm serve: metrics of every process on http://{stack.address.rsplit(':', 1)[0]}:"
                  f"{stack.metrics.port}/metrics", file=sys.stderr)
        print("glm serve: serving; Ctrl-C stops", file=sys.stderr)
        while not stopping:
            stack.check_alive()
            time.sleep(0.5)
    except StackError as exc:
        print(f"glm serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    return 0
