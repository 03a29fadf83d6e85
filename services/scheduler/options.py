"""``SchedulerOptions``: the settings of ``glm scheduler``, declared once (flags, ``GLM_``
variables, validation, argv; see ``services.common.options``).

``loop_options`` turns them into the loop's ``LoopOptions`` once the model's
``max_sequence_length`` is known (the token limits default to it).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from services.common import redis_keys as keys
from services.common.options import Options, non_negative_int, option, positive_int
from services.scheduler.loop import LoopOptions
from services.scheduler.ops import MODES, Limits
from services.worker.client import read_token

MAX_PORT = 65535


def _addresses(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


@dataclass(frozen=True, kw_only=True)
class SchedulerOptions(Options):
    """``glm scheduler``: one pool's scheduler, from the Redis queue to its workers."""

    redis_url: str = option("redis://127.0.0.1:6379/0", help="Redis URL of the queue")
    model: str = option(help="the model's name, as clients use it (reads glm:queue:{model})")
    checkpoint: str = option(help="checkpoint folder (only config.json and ice_text.model are read)")
    tokenizer: str | None = option(None, help="ice_text.model (default: the one beside the checkpoint)")
    workers: tuple[str, ...] = option(parse=_addresses, render=",".join,
                                      help="comma-separated rank addresses, rank 0 first")
    pool_id: str | None = option(None, help="consumer name in the queue's group (default: host-pid)")
    mode: str = option("continuous", choices=MODES,
                       help="batching: continuous (iteration-level), static, or one request at a time")
    max_batch_size: int = option(32, type=positive_int, help="rows of one batch at most")
    max_input_tokens: int | None = option(None, type=positive_int,
                                          help="context + sop (default: max_sequence_length/2)")
    max_total_tokens: int | None = option(None, type=positive_int,
                                          help="input + new (default: max_sequence_length)")
    max_prefill_tokens: int = option(4096, type=positive_int,
                                     help="token budget of one step: paged workers, one per running row plus the "
                                          "prompts admitted; dense, padded rows x width of one prefill (a single "
                                          "request always passes)")
    kv_watermark: float = option(0.01, type=float,
                                 help="paged workers: share of the KV blocks admission leaves free for the running "
                                      "rows to grow into")
    max_waiting_tokens: int = option(20, type=positive_int,
                                     help="decode steps after which waiting requests are prefilled anyway")
    waiting_served_ratio: float = option(0.3, type=float,
                                         help="waiting requests per running one that justify pausing "
                                              "decodes for a prefill")
    shard_timeout_s: float = option(60.0, type=float, help="deadline of every shard call")
    warmup_timeout_s: float = option(600.0, type=float, help="deadline of the workers' warmup")
    claim_idle_ms: int | None = option(None, type=positive_int,
                                       help="pending entries idle this long belong to a dead pool "
                                            "(default: redis_keys.CLAIM_IDLE_MS)")
    idle_block_ms: int = option(200, type=positive_int, help="XREADGROUP BLOCK while idle")
    drain_timeout_s: float = option(30.0, type=float, help="on SIGTERM: finish running requests")
    result_ttl_s: int = option(keys.RESULT_TTL_S, type=positive_int,
                               help="keep a finished request's events and idempotency record this long "
                                    "(seconds; memory = rate x this x ~5 KB, ~15 KB with logprobs: "
                                    "see docs/deploy.md)")
    shard_token_file: str | None = option(None, help="file holding the pool's shard token, which every call to "
                                                     "a rank but health must carry (default: the shard-token "
                                                     "file beside the ranks' unix sockets)")
    metrics_port: int = option(0, type=non_negative_int,
                               help="serve this process's Prometheus metrics (text format) on this port; 0 = off")
    metrics_host: str = option("127.0.0.1", help="address of the metrics endpoint(s) (default: loopback "
                                                   "only; 0.0.0.0 where Prometheus scrapes)")
    otlp_endpoint: str | None = option(None, help="export traces over OTLP/gRPC to host:port (default: none; "
                                                  "under glm serve: every process)")

    def __post_init__(self) -> None:
        if not self.workers:
            raise ValueError("--workers: no rank address given")
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: choose from {', '.join(MODES)}")
        for name in ("shard_timeout_s", "warmup_timeout_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.waiting_served_ratio < 0:
            raise ValueError(f"--waiting-served-ratio must be >= 0, got {self.waiting_served_ratio}")
        if not 0 <= self.metrics_port <= MAX_PORT:
            raise ValueError(f"--metrics-port {self.metrics_port}: not a port (0-{MAX_PORT})")

    def argv(self) -> list[str]:
        """``glm`` arguments: ``["scheduler", ...]``, every setting a flag."""
        return ["scheduler", *self.to_argv()]

    def limits(self, max_sequence_length: int) -> Limits:
        total = self.max_total_tokens or max_sequence_length
        if total > max_sequence_length:
            raise ValueError(f"--max-total-tokens {total} exceeds max_sequence_length {max_sequence_length}")
        input_tokens = self.max_input_tokens or total // 2
        if not input_tokens < total:
            raise ValueError(f"--max-input-tokens {input_tokens} must be < --max-total-tokens {total}")
        return Limits(max_batch_size=self.max_batch_size, max_input_tokens=input_tokens, max_total_tokens=total,
                      max_prefill_tokens=self.max_prefill_tokens, max_waiting_tokens=self.max_waiting_tokens,
                      waiting_served_ratio=self.waiting_served_ratio, kv_watermark=self.kv_watermark, mode=self.mode)

    def loop_options(self, max_sequence_length: int) -> LoopOptions:
        """The loop's options for a model of ``max_sequence_length`` tokens."""
        return LoopOptions(
            redis_url=self.redis_url, model=self.model, workers=self.workers,
            pool_id=self.pool_id or f"{socket.gethostname()}-{os.getpid()}",
            limits=self.limits(max_sequence_length), idle_block_ms=self.idle_block_ms,
            shard_timeout_s=self.shard_timeout_s, warmup_timeout_s=self.warmup_timeout_s,
            claim_idle_ms=self.claim_idle_ms or keys.CLAIM_IDLE_MS, drain_timeout_s=self.drain_timeout_s,
            result_ttl_s=self.result_ttl_s,
            shard_token=read_token(self.shard_token_file) if self.shard_token_file else None)
