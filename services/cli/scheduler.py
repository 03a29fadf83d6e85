"""``glm scheduler``: one pool's scheduler, until SIGTERM (drains) or a worker failure
(exits non-zero, leaving its queue entries to another pool)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from model.config import GLMConfig
from model.tokenizer import GLMTokenizer
from services.common import redis_keys as keys
from services.common.metrics import new_registry, serve_metrics
from services.common.tracing import setup_tracing
from services.scheduler.loop import LoopOptions, PoolLoop
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.policy import Limits

TOKENIZER_FILE = "ice_text.model"


def options_from_args(args, config: GLMConfig) -> LoopOptions:
    workers = tuple(a.strip() for a in args.workers.split(",") if a.strip())
    if not workers:
        raise ValueError("--workers: no rank address given")
    total = args.max_total_tokens or config.max_sequence_length
    if total > config.max_sequence_length:
        raise ValueError(f"--max-total-tokens {total} exceeds max_sequence_length {config.max_sequence_length}")
    limits = Limits(
        max_batch_size=args.max_batch_size, max_input_tokens=args.max_input_tokens or total // 2,
        max_total_tokens=total, max_prefill_tokens=args.max_prefill_tokens,
        max_waiting_tokens=args.max_waiting_tokens, waiting_served_ratio=args.waiting_served_ratio,
        mode=args.mode)
    if args.shard_timeout_s <= 0:
        raise ValueError(f"--shard-timeout-s must be > 0, got {args.shard_timeout_s}")
    return LoopOptions(
        redis_url=args.redis_url, model=args.model, workers=workers,
        pool_id=args.pool_id or f"{socket.gethostname()}-{os.getpid()}", limits=limits,
        idle_block_ms=args.idle_block_ms, shard_timeout_s=args.shard_timeout_s,
        warmup_timeout_s=args.warmup_timeout_s, claim_idle_ms=args.claim_idle_ms or keys.CLAIM_IDLE_MS,
        drain_timeout_s=args.drain_timeout_s)


async def _main(loop_: PoolLoop) -> None:
    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        running.add_signal_handler(sig, loop_.stop)
    await loop_.run()


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s scheduler %(levelname)s %(message)s")
    config = GLMConfig.for_checkpoint(args.checkpoint)
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else Path(args.checkpoint) / TOKENIZER_FILE
    if not tokenizer_path.exists():
        raise ValueError(f"no tokenizer: {tokenizer_path} does not exist; pass --tokenizer PATH to ice_text.model")
    tokenizer = GLMTokenizer.from_file(tokenizer_path)
    options = options_from_args(args, config)
    provider = setup_tracing("glm-scheduler", otlp_endpoint=args.otlp_endpoint,
                             attributes={"glm.pool": options.pool_id})
    metrics = endpoint = None
    if args.metrics_port:
        registry = new_registry()
        metrics = SchedulerMetrics(registry, model=options.model, pool=options.pool_id)
        endpoint = serve_metrics(registry, args.metrics_port, args.metrics_host)
    loop_ = PoolLoop(options, decode=lambda ids: tokenizer.decode(ids, strict=False),
                     max_sequence_length=config.max_sequence_length,
                     tracer=provider.get_tracer("glm.scheduler"), metrics=metrics)
    try:
        asyncio.run(_main(loop_))
    finally:
        provider.shutdown()
        if endpoint is not None:
            endpoint.close()
    return 0
