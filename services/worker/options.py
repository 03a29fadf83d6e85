"""The options of the worker processes, each declared once (see ``services.common.options``).

- ``RankOptions``: how every rank of a pool runs (dtype, device, quantization, KV memory,
  collectives, tracing, threads); ``glm worker``, ``glm pool`` and ``glm serve`` all take them.
- ``WorkerOptions`` (``glm worker``): one rank, a ``RankOptions`` plus who it is in its pool.
- ``PoolOptions`` (``glm pool``): the ranks of one pool; ``worker(rank)`` is the
  ``WorkerOptions`` of each rank it starts, rendered with ``argv()``.

Torch-free: ``glm pool`` and ``glm serve`` import this without loading the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from model.config import LOAD_FORMATS, PRESETS, check_model_source
from services.common.net import free_port
from services.common.options import Options, compose, non_negative_int, option, positive_int

TOKEN_FILE = "shard-token"             # beside the ranks' sockets (services.worker.client)
TOKEN_HELP = ("file holding the pool's shard token, which every call to a rank but Health must carry "
              "(glm worker: needed for a non-loopback TCP --listen; glm pool default: a new one in "
              "<socket-dir>/shard-token, mode 0600)")

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
QUANTS = ("none", "int8", "int4")
MAX_PORT = 65535


def _no_none(text: str | None) -> str | None:
    return None if text in (None, "none") else text


def _none_text(value: str | None) -> str:
    return value or "none"


@dataclass(frozen=True, kw_only=True)
class RankOptions(Options):
    """What every rank of a pool is run with (the same for all its ranks)."""

    dtype: str = option("auto", choices=DTYPES, to=("worker",),
                        help="dtype of the weights and activations (auto: float16 on CUDA; on a CPU "
                             "bfloat16 where it is native (AVX512_BF16/AMX), else float32)")
    device: str = option("cpu", choices=DEVICES, to=("worker",),
                         help="where each rank runs (cuda: the rank's own GPU, rank %% GPUs; NCCL on cuda, "
                              "gloo on cpu)")
    quant: str | None = option(None, choices=QUANTS, parse=_no_none, render=_none_text, to=("worker",),
                               help="weight-only quantization at load (a pre-quantized checkpoint loads as it is)")
    quant_group_size: int | None = option(None, type=positive_int, to=("worker",),
                                          help="group-wise scales every N input columns (default: the "
                                               "official per-row scales)")
    kv_memory_gib: float | None = option(None, type=float, to=("worker",),
                                         help="KV-cache memory per rank (default: measured)")
    kv_block_size: int = option(16, type=positive_int, to=("worker",),
                                help="tokens per block of the paged KV pool (docs/worker.md, \"Paged KV\")")
    collective_timeout_s: float = option(60.0, type=float, to=("worker",),
                                         help="a collective waiting longer than this fails the rank")
    otlp_endpoint: str | None = option(None, to=("worker", "scheduler", "gateway"),
                                       help="export traces over OTLP/gRPC to host:port (default: none; "
                                            "under glm serve: every process)")
    layer_trace_ratio: float = option(0.0, type=float, to=("worker",),
                                      help="fraction of forwards that record a span per layer (0-1)")
    threads: int | None = option(None, type=positive_int, to=("worker",),
                                 help="torch CPU threads per rank (default: CPUs / tp in a pool)")
    prompt_cache: bool = option(True, to=("worker",),
                                help="keep the KV of recent contexts: a request with the same one skips its "
                                     "prefill (--no-prompt-cache: prefill every request)")
    cuda_graphs: bool = option(True, to=("worker",),
                               help="on cuda, capture the decode forward as CUDA graphs at bucketed batch "
                                    "sizes at Warmup (--no-cuda-graphs: decode eagerly; no effect on cpu)")
    load_format: str = option("auto", choices=LOAD_FORMATS, to=("worker",),
                              help="where the weights come from: auto = the checkpoint; dummy = random "
                                   "weights for --preset drawn in memory (quantized in place), no checkpoint")
    preset: str | None = option(None, choices=tuple(PRESETS), to=("worker",),
                                help="the model shape of --load-format dummy (default: glm-small, the demo's)")
    num_layers: int | None = option(None, type=positive_int, to=("worker",),
                                    help="--load-format dummy: keep only the first N layers of the preset "
                                         "(same width)")

    def __post_init__(self) -> None:
        if self.kv_memory_gib is not None and self.kv_memory_gib <= 0:
            raise ValueError(f"--kv-memory-gib must be > 0, got {self.kv_memory_gib}")
        if not 0.0 <= self.layer_trace_ratio <= 1.0:
            raise ValueError(f"--layer-trace-ratio must be in [0, 1], got {self.layer_trace_ratio}")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"--collective-timeout-s must be > 0, got {self.collective_timeout_s}")
        for name, allowed in (("dtype", DTYPES), ("device", DEVICES), ("quant", QUANTS),
                              ("load_format", LOAD_FORMATS)):
            value = getattr(self, name) or "none"
            if value not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: choose from {', '.join(allowed)}")
        check_model_source(self.load_format, None, self.preset, self.num_layers)

    def check_checkpoint(self, checkpoint: str | None) -> None:
        """ValueError unless exactly one source of weights is named: a checkpoint, or dummy."""
        check_model_source(self.load_format, checkpoint, self.preset, self.num_layers)
        if self.load_format == "auto" and not checkpoint:
            raise ValueError("--checkpoint DIR is required (or --load-format dummy --preset NAME)")


def _check_port(flag: str, port: int) -> None:
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"{flag} {port}: not a port (0-{MAX_PORT})")


@dataclass(frozen=True, kw_only=True)
class WorkerOptions(RankOptions):
    """``glm worker``: one tensor-parallel rank of a pool, serving the shard protocol."""

    checkpoint: str | None = option(None, help="checkpoint folder (official layout; none with --load-format dummy)")
    tp: int = option(type=positive_int, help="tensor-parallel size: ranks per pool (one GPU each on cuda)")
    rank: int = option(type=non_negative_int, help="this process's rank")
    listen: str = option(help="unix:///path/to.sock or host:port")
    dist_init: str = option(help="tcp://HOST:PORT rendezvous, the same for every rank")
    model_name: str | None = option(None, help="the model's name, as clients use it (default: the "
                                               "checkpoint folder's name)")
    metrics_port: int = option(0, type=non_negative_int,
                               help="serve this process's Prometheus metrics (text format) on this port; 0 = off")
    metrics_host: str = option("127.0.0.1", help="address of the metrics endpoint(s) (default: loopback "
                                                   "only; 0.0.0.0 where Prometheus scrapes)")
    shard_token_file: str | None = option(None, help=TOKEN_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"--rank {self.rank} is outside --tp {self.tp}")
        self.check_checkpoint(self.checkpoint)
        _check_port("--metrics-port", self.metrics_port)

    def argv(self) -> list[str]:
        """``glm`` arguments of this rank: ``["worker", ...]``, every setting a flag."""
        return ["worker", *self.to_argv()]


@dataclass(frozen=True, kw_only=True)
class PoolOptions(Options):
    """``glm pool``: the ``tp`` ranks of one pool, launched and supervised as one unit. Rank
    ``r`` listens on ``<socket_dir>/rank-<r>.sock`` and serves its metrics on ``metrics_port + r``;
    every rank requires the pool's shard token (``token_file``)."""

    checkpoint: str | None = option(None, help="checkpoint folder (official layout; none with --load-format dummy)")
    tp: int = option(type=positive_int, help="tensor-parallel size: ranks per pool (one GPU each on cuda)")
    socket_dir: str = option(help="rank r listens on unix://DIR/rank-<r>.sock")
    dist_port: int = option(0, type=non_negative_int,
                            help="the ranks' rendezvous, tcp://127.0.0.1:PORT (0 = a free port)")
    ranks: RankOptions = compose(RankOptions)
    model_name: str | None = option(None, help="the model's name, as clients use it (default: the "
                                               "checkpoint folder's name)")
    metrics_port: int = option(0, type=non_negative_int, env="GLM_POOL_METRICS_PORT",
                               help="rank r serves Prometheus metrics on PORT + r; 0 = off")
    metrics_host: str = option("127.0.0.1", help="address of the metrics endpoint(s) (default: loopback "
                                                   "only; 0.0.0.0 where Prometheus scrapes)")
    shard_token_file: str | None = option(None, help=TOKEN_HELP)
    ready_timeout_s: float = option(1800.0, type=float,
                                    help="every rank answers Health within this, or the pool stops (non-zero)")
    stop_grace_s: float = option(10.0, type=float,
                                 help="on stop, SIGTERM the ranks and SIGKILL those still running after this")

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        self.ranks.check_checkpoint(self.checkpoint)
        _check_port("--dist-port", self.dist_port)
        if self.metrics_port and self.metrics_port + self.tp - 1 > MAX_PORT:
            raise ValueError(f"--metrics-port {self.metrics_port}: rank {self.tp - 1} would get a port "
                             f"above {MAX_PORT}")
        for name in ("ready_timeout_s", "stop_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")

    def address(self, rank: int) -> str:
        return f"unix://{os.path.join(self.socket_dir, f'rank-{rank}.sock')}"

    @property
    def token_file(self) -> str:
        """The file of the ranks' shard token (``launch_pool`` writes it when not given)."""
        return self.shard_token_file or os.path.join(self.socket_dir, TOKEN_FILE)

    def worker(self, rank: int, *, dist_port: int, metrics_port: int | None = None) -> WorkerOptions:
        """The options of rank ``rank`` (``metrics_port``: its own port, when the launcher
        chose one; otherwise ``metrics_port + rank``, or off)."""
        if metrics_port is None:
            metrics_port = self.metrics_port + rank if self.metrics_port else 0
        ranks = {f: getattr(self.ranks, f) for f in self.ranks.__dataclass_fields__}
        ranks["threads"] = self.ranks.threads or max(1, (os.cpu_count() or 1) // self.tp)
        return WorkerOptions(**ranks, checkpoint=self.checkpoint, tp=self.tp, rank=rank,
                             listen=self.address(rank), dist_init=f"tcp://127.0.0.1:{dist_port}",
                             model_name=self.model_name, metrics_port=metrics_port,
                             metrics_host=self.metrics_host, shard_token_file=self.token_file)

    def workers(self, metrics_ports: tuple[int, ...] | None = None) -> list[WorkerOptions]:
        """Every rank's options, meeting on ``dist_port`` (a free port when it is 0)."""
        if metrics_ports is not None and len(metrics_ports) != self.tp:
            raise ValueError(f"metrics_ports: {len(metrics_ports)} ports for {self.tp} ranks")
        dist_port = self.dist_port or free_port()
        return [self.worker(r, dist_port=dist_port, metrics_port=metrics_ports[r] if metrics_ports else None)
                for r in range(self.tp)]
