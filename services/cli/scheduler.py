"""``glm scheduler``: one pool's scheduler, until SIGTERM (drains) or a worker failure
(exits non-zero, leaving its queue entries to another pool)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from model.config import GLMConfig
from model.tokenizer import GLMTokenizer
from services.common.metrics import new_registry, serve_metrics
from services.common.tracing import setup_tracing
from services.scheduler.loop import PoolLoop
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.options import SchedulerOptions

TOKENIZER_FILE = "ice_text.model"


async def _main(loop_: PoolLoop) -> None:
    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        running.add_signal_handler(sig, loop_.stop)
    await loop_.run()


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s scheduler %(levelname)s %(message)s")
    settings = SchedulerOptions.from_args(args)
    config = GLMConfig.for_checkpoint(settings.checkpoint)
    tokenizer_path = Path(settings.tokenizer) if settings.tokenizer else Path(settings.checkpoint) / TOKENIZER_FILE
    if not tokenizer_path.exists():
        raise ValueError(f"no tokenizer: {tokenizer_path} does not exist; pass --tokenizer PATH to ice_text.model")
    tokenizer = GLMTokenizer.from_file(tokenizer_path)
    options = settings.loop_options(config.max_sequence_length)
    provider = setup_tracing("glm-scheduler", otlp_endpoint=settings.otlp_endpoint,
                             attributes={"glm.pool": options.pool_id})
    metrics = endpoint = None
    if settings.metrics_port:
        registry = new_registry()
        metrics = SchedulerMetrics(registry, model=options.model, pool=options.pool_id)
        endpoint = serve_metrics(registry, settings.metrics_port, settings.metrics_host)
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
