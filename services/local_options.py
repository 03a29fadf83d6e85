"""``ServeOptions``: the settings of ``glm serve`` (the all-in-one stack of ``services.local``),
declared once (see ``services.common.options``).

They compose the ranks' ``RankOptions`` and add what the stack itself decides. Each child
process is launched from an options object built here (``pool``, ``scheduler``,
``gateway``), never by re-listing flags; every flag names in ``to`` the children that use
it, and tests/test_options.py checks that each one arrives there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common import redis_keys as keys
from services.common.options import Options, compose, non_negative_int, option, positive_int
from services.gateway.options import MAX_CONCURRENT_CALLS, GatewayOptions
from services.scheduler.options import SchedulerOptions
from services.scheduler.ops import MODES
from services.worker.options import PoolOptions, RankOptions

LOOPBACK = "127.0.0.1"
MAX_PORT = 65535


@dataclass(frozen=True, kw_only=True)
class ServeOptions(Options):
    """``glm serve``: gateway + scheduler(s) + worker pool(s) (+ a private Redis) as local
    processes. ``workdir`` (the logs' folder), ``model_dir`` (the folder whose config.json and
    ice_text.model the scheduler and gateway read; the checkpoint unless the ranks draw dummy
    weights) and ``gateway_args``/``scheduler_args`` (extra flags, the last word) are settings
    of a program using the stack, not flags."""

    host: str = option(LOOPBACK, to=("gateway",), help="the gateway's listen address")
    port: int = option(50051, type=non_negative_int, to=("gateway",),
                       help="the gateway's port (0 = a free port, chosen at start and printed)")
    http_port: int = option(0, type=non_negative_int, to=("gateway",),
                            help="the OpenAI-compatible HTTP API (/v1/completions, /v1/models, /health) "
                                 "on --host at this port (0 = a free port, chosen at start and printed)")
    redis_url: str | None = option(None, to=("scheduler", "gateway"),
                                   help="Redis URL of the queue (default: start a private one)")
    checkpoint: str | None = option(None, to=("worker", "scheduler", "gateway"),
                                    help="checkpoint folder (default: the demo model, created on first use)")
    tokenizer: str | None = option(None, to=("scheduler", "gateway"),
                                   help="ice_text.model (default: the one beside the checkpoint)")
    model_name: str | None = option(None, to=("worker", "scheduler", "gateway"),
                                    help="the model's name, as clients use it (default: glm-demo, or the "
                                         "checkpoint folder's name)")
    cache_dir: str | None = option(None, help="where the demo model lives (default: ~/.cache/glm)")
    tp: int = option(1, type=positive_int, to=("worker",),
                     help="tensor-parallel size: ranks per pool (one GPU each on cuda)")
    pools: int = option(1, type=positive_int, help="pools sharing the queue (one scheduler each)")
    ranks: RankOptions = compose(RankOptions)
    mode: str = option("continuous", choices=MODES, to=("scheduler",),
                       help="batching: continuous (iteration-level), static, or one request at a time")
    max_batch_size: int = option(32, type=positive_int, to=("scheduler",), help="rows of one batch at most")
    max_prefill_tokens: int = option(4096, type=positive_int, to=("scheduler",),
                                     help="token budget of one step: paged workers, one per running row plus the "
                                          "prompts admitted; dense, padded rows x width of one prefill (a single "
                                          "request always passes)")
    result_ttl_s: int = option(keys.RESULT_TTL_S, type=positive_int, to=("scheduler",),
                               help="keep a finished request's events and idempotency record this long "
                                    "(seconds; see docs/deploy.md)")
    max_concurrent_calls: int = option(MAX_CONCURRENT_CALLS, type=positive_int, to=("gateway",),
                                       help="Generate/GenerateStream calls served at once; one more gets RESOURCE_EXHAUSTED "
                                            "at once (the gateway's Redis pool is sized from it)")
    no_demo_call: bool = option(False, help="do not make the example client call")
    metrics_port: int = option(0, type=non_negative_int, env="GLM_SERVE_METRICS_PORT",
                               help="serve the Prometheus metrics of every process (gateway, schedulers, "
                                    "ranks) on this one port, on --host; 0 = off")
    workdir: str | None = None
    model_dir: str | None = None      # what the scheduler and gateway read (default: the checkpoint)
    gateway_args: tuple[str, ...] = ()
    scheduler_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= MAX_PORT:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: not a port (0-{MAX_PORT})")
        if self.tp < 1 or self.pools < 1:
            raise ValueError(f"--tp {self.tp} and --pools {self.pools} must be >= 1")
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.ranks.load_format == "dummy":
            self.ranks.check_checkpoint(self.checkpoint)

    @property
    def otlp_endpoint(self) -> str | None:
        return self.ranks.otlp_endpoint

    @property
    def layer_trace_ratio(self) -> float:
        return self.ranks.layer_trace_ratio

    def demo_folder(self, home: Path) -> Path:
        return Path(self.cache_dir) if self.cache_dir else home / ".cache" / "glm"

    @property
    def dummy(self) -> bool:
        return self.ranks.load_format == "dummy"

    def _served(self) -> tuple[str, str]:
        """(the folder the scheduler and gateway read, the model's name)."""
        folder = self.model_dir or self.checkpoint
        if not folder or not self.model_name:
            raise ValueError("the stack needs its checkpoint (or model folder) and model name resolved first")
        return folder, self.model_name

    def pool(self, socket_dir: str) -> PoolOptions:
        """The options of each pool: its ranks run on loopback, sockets in ``socket_dir``."""
        _, name = self._served()
        return PoolOptions(checkpoint=self.checkpoint, tp=self.tp, socket_dir=socket_dir, ranks=self.ranks,
                           model_name=name, metrics_host=LOOPBACK)

    def scheduler(self, *, redis_url: str, workers: tuple[str, ...], pool_id: str,
                  metrics_port: int = 0) -> SchedulerOptions:
        """The options of one pool's scheduler (its metrics on loopback, for the hub)."""
        checkpoint, name = self._served()
        return SchedulerOptions(redis_url=redis_url, model=name, checkpoint=checkpoint, tokenizer=self.tokenizer,
                                workers=workers, pool_id=pool_id, mode=self.mode,
                                max_batch_size=self.max_batch_size, max_prefill_tokens=self.max_prefill_tokens,
                                result_ttl_s=self.result_ttl_s,
                                otlp_endpoint=self.ranks.otlp_endpoint,
                                metrics_port=metrics_port, metrics_host=LOOPBACK)

    def gateway(self, *, redis_url: str, metrics_port: int = 0) -> GatewayOptions:
        """The options of the gateway (its metrics on loopback, for the hub)."""
        checkpoint, name = self._served()
        return GatewayOptions(models=((name, checkpoint),), tokenizer=self.tokenizer, host=self.host,
                              port=self.port, http_port=self.http_port, redis_url=redis_url, max_concurrent_calls=self.max_concurrent_calls,
                              otlp_endpoint=self.ranks.otlp_endpoint,
                              metrics_port=metrics_port, metrics_host=LOOPBACK)
