"""The all-in-one stack of ``glm serve``: Redis, worker pools, their schedulers and a
gateway, each a real local process (DESIGN §2 "The all-in-one mode").

``LocalStack`` starts the pieces in dependency order, watches them, and stops
them in reverse order. Tests use it to run the real system on loopback.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common import redis_keys as keys
from services.common.local_redis import LocalRedis, start_local_redis
from services.common.metrics import MetricsEndpoint, serve_metrics
from services.common.metrics_hub import MetricsHub
from services.common.net import free_port

ROOT = Path(__file__).resolve().parents[1]


class StackError(RuntimeError):
    pass


@dataclass
class StackOptions:
    checkpoint: str
    model_name: str
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str | None = None
    tp: int = 1
    pools: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    quant: str | None = None
    kv_memory_gib: float | None = None
    mode: str = "continuous"
    max_batch_size: int = 32
    gateway_args: tuple[str, ...] = ()
    scheduler_args: tuple[str, ...] = ()
    workdir: str | None = None
    tokenizer: str | None = None
    otlp_endpoint: str | None = None       # every service exports traces here (OTLP/gRPC)
    layer_trace_ratio: float = 0.0         # fraction of forwards the workers trace per layer
    metrics_port: int = 0                  # every process's metrics on this one port (on host); 0 = off


def glm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", *args]


@dataclass
class LocalStack:
    options: StackOptions
    redis: LocalRedis | None = None
    redis_url: str = ""
    pools: list = field(default_factory=list)           # services.worker.pool.PoolHandle
    schedulers: list[subprocess.Popen] = field(default_factory=list)
    gateway: subprocess.Popen | None = None
    logs: dict[int, Path] = field(default_factory=dict)   # pid -> log file
    address: str = ""
    pool_ids: list[str] = field(default_factory=list)
    metrics_targets: dict[str, str] = field(default_factory=dict)   # process -> its own metrics URL
    metrics: MetricsEndpoint | None = None                            # the one port (MetricsHub)

    def start(self, ready_timeout_s: float = 180.0) -> "LocalStack":
        from services.worker.pool import start_pool    # the pool launcher needs no torch itself

        o = self.options
        try:
            if o.redis_url:
                self.redis_url = o.redis_url
            else:
                self.redis = start_local_redis()
                self.redis_url = self.redis.url
            for index in range(o.pools):
                self.start_pool_and_scheduler(index, start_pool)
            self.start_gateway()
            if o.metrics_port:
                hub = MetricsHub(lambda: self.metrics_targets)
                self.metrics = serve_metrics(hub.registry(), o.metrics_port, o.host)
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        folder = Path(self.options.workdir or "/tmp")
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"glm-{name}-{int(time.time() * 1000)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        self.logs[proc.pid] = log
        return proc

    def start_pool_and_scheduler(self, index: int, start_pool=None) -> None:
        if start_pool is None:
            from services.worker.pool import start_pool
        o = self.options
        ranks = [self._metrics_port(f"worker-{index}-{rank}") for rank in range(o.tp)] if o.metrics_port else None
        pool = start_pool(o.checkpoint, o.tp, dtype=o.dtype, device=o.device, quant=o.quant,
                          kv_memory_gib=o.kv_memory_gib, otlp_endpoint=o.otlp_endpoint,
                          layer_trace_ratio=o.layer_trace_ratio, model_name=o.model_name, metrics_ports=ranks)
        self.pools.append(pool)
        pool_id = f"{o.model_name}-pool-{index}-{pool.pids[0]}"
        self.pool_ids.append(pool_id)
        cmd = glm_command(
            "scheduler", "--redis-url", self.redis_url, "--model", o.model_name, "--checkpoint", o.checkpoint,
            "--workers", ",".join(pool.addresses), "--pool-id", pool_id,
            "--mode", o.mode, "--max-batch-size", str(o.max_batch_size), *self._tracing_args(),
            *self._metrics_args(f"scheduler-{index}"), *o.scheduler_args)
        self.schedulers.append(self._spawn(f"scheduler-{index}", cmd))

    def _metrics_port(self, process: str) -> int:
        """A loopback port for ``process``'s own endpoint, scraped by the hub."""
        port = free_port()
        self.metrics_targets[process] = f"http://127.0.0.1:{port}/metrics"
        return port

    def _metrics_args(self, process: str) -> list[str]:
        if not self.options.metrics_port:
            return []
        return ["--metrics-port", str(self._metrics_port(process)), "--metrics-host", "127.0.0.1"]

    def _tracing_args(self) -> list[str]:
        return ["--otlp-endpoint", self.options.otlp_endpoint] if self.options.otlp_endpoint else []

    def start_gateway(self) -> None:
        o = self.options
        cmd = glm_command("gateway", "--host", o.host, "--port", str(o.port), "--redis-url", self.redis_url,
                          "--model", f"{o.model_name}={o.checkpoint}", *self._tracing_args(),
                          *self._metrics_args("gateway"), *o.gateway_args)
        self.gateway = self._spawn("gateway", cmd)
        self.address = f"{'127.0.0.1' if o.host in ('0.0.0.0', '::') else o.host}:{o.port}"

    def wait_ready(self, timeout_s: float) -> None:
        """Until the gateway serves and every scheduler has warmed up (its heartbeat is up)."""
        import redis
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        try:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    with grpc.insecure_channel(self.address) as channel:
                        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    pools_up = all(client.exists(keys.pool(p)) for p in self.pool_ids)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING and pools_up:
                        return
                except (grpc.RpcError, redis.RedisError):
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        raise StackError(f"the stack at {self.address} was not ready within {timeout_s:.0f} s")

    def check_alive(self) -> None:
        """Raise StackError naming the first process that died."""
        for i, proc in enumerate(self.schedulers):
            if proc.poll() is not None:
                raise StackError(f"scheduler {i} exited with code {proc.returncode}: {self._tail(proc)}")
        for i, pool in enumerate(self.pools):
            if pool.dead_ranks():
                raise StackError(f"pool {i} lost rank(s) {pool.dead_ranks()}")
        if self.gateway is not None and self.gateway.poll() is not None:
            raise StackError(f"the gateway exited with code {self.gateway.returncode}: {self._tail(self.gateway)}")

    def _tail(self, proc: subprocess.Popen, lines: int = 5) -> str:
        log = self.logs.get(proc.pid)
        if log is None or not log.exists():
            return ""
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])

    def stop(self, grace_s: float = 5.0) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        procs = ([self.gateway] if self.gateway else []) + self.schedulers
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pool in self.pools:
            pool.stop()
        if self.redis is not None:
            self.redis.stop()
