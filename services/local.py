"""The all-in-one stack of ``glm serve``: Redis, worker pools, their schedulers and a
gateway, each a real local process (docs/architecture.md, "Processes"). Each is
launched from its options object (``services.local_options``) rendered as flags, with no
``GLM_`` variable inherited: a setting reaches a child only by a flag.

``LocalStack`` starts the pieces in dependency order, watches them, and stops
them in reverse order. Tests use it to run the real system on loopback.

Supervision: a scheduler that exits while its pool's ranks live is started again
(``check_alive``), after 1, 2, 4... s, at most ``MAX_SCHEDULER_RESTARTS`` times
(then the stack fails loudly: its workers are broken or it keeps failing), each
time as a new consumer (``-r<n>`` pool id), so the entries it held are taken over
after the claim idle time like a dead pool's and a request that keeps killing its
scheduler reaches the dead-letter limit. A rank that dies fails the stack.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common import redis_keys as keys
from services.common.env import child_environ
from services.common.local_redis import LocalRedis, start_local_redis
from services.common.metrics import MetricsEndpoint, serve_metrics
from services.common.metrics_hub import MetricsHub
from services.common.net import free_port
from services.local_options import ServeOptions

ROOT = Path(__file__).resolve().parents[1]
MAX_SCHEDULER_RESTARTS = 5
log = logging.getLogger("glm.serve")


class StackError(RuntimeError):
    """A process of the stack died or the stack was not ready in time."""


def glm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", *args]


@dataclass
class LocalStack:
    """The running processes of one stack, started from its ``ServeOptions``."""

    options: ServeOptions
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
    restarts: list[int] = field(default_factory=list)                 # per scheduler: restarts so far
    restart_at: dict[int, float] = field(default_factory=dict)        # scheduler -> when to restart it

    def start(self, ready_timeout_s: float = 180.0) -> "LocalStack":
        from services.worker.pool import launch_pool    # the pool launcher needs no torch itself

        if not self.options.port:       # 0: a free port, chosen now, so the stack knows its address
            self.options = dataclasses.replace(self.options, port=free_port())
        if not self.options.http_port:
            self.options = dataclasses.replace(self.options, http_port=free_port())
        o = self.options
        try:
            if o.redis_url:
                self.redis_url = o.redis_url
            else:
                self.redis = start_local_redis()
                self.redis_url = self.redis.url
            for index in range(o.pools):
                self.start_pool_and_scheduler(index, launch_pool)
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
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                    env=child_environ())
        self.logs[proc.pid] = log
        return proc

    def start_pool_and_scheduler(self, index: int, launch_pool=None) -> None:
        if launch_pool is None:
            from services.worker.pool import launch_pool
        o = self.options
        ranks = tuple(self._metrics_port(f"worker-{index}-{rank}") for rank in range(o.tp)) if o.metrics_port else None
        # Unix socket paths are limited to ~107 bytes: keep the folder short.
        folder = tempfile.mkdtemp(prefix="glm-pool-", dir="/tmp")
        pool = launch_pool(o.pool(folder), metrics_ports=ranks, own_workdir=True, ready_timeout_s=120.0)
        self.pools.append(pool)
        pool_id = f"{o.model_name}-pool-{index}-{pool.pids[0]}"
        self.pool_ids.append(pool_id)
        self.restarts.append(0)
        cmd = glm_command(*self.scheduler_argv(index, tuple(pool.addresses), pool_id))
        self.schedulers.append(self._spawn(f"scheduler-{index}", cmd))

    def _supervise_scheduler(self, index: int) -> None:
        """Scheduler ``index`` exited: start it again after its backoff (a new consumer),
        or raise StackError once it has used its restarts."""
        proc = self.schedulers[index]
        if self.restarts[index] >= MAX_SCHEDULER_RESTARTS or self.pools[index].dead_ranks():
            raise StackError(f"scheduler {index} exited with code {proc.returncode} "
                             f"({self.restarts[index]} restarts): {self._tail(proc)}")
        now = time.monotonic()
        due = self.restart_at.setdefault(index, now + 2.0 ** self.restarts[index])
        if now < due:
            return
        del self.restart_at[index]
        self.restarts[index] += 1
        pool_id = f"{self.options.model_name}-pool-{index}-{self.pools[index].pids[0]}-r{self.restarts[index]}"
        log.warning("scheduler %d exited with code %s: %s; starting it again as %s", index, proc.returncode,
                    self._tail(proc), pool_id)
        self.pool_ids[index] = pool_id
        cmd = glm_command(*self.scheduler_argv(index, tuple(self.pools[index].addresses), pool_id))
        self.schedulers[index] = self._spawn(f"scheduler-{index}", cmd)

    def scheduler_argv(self, index: int, workers: tuple[str, ...], pool_id: str) -> list[str]:
        """``glm`` arguments of pool ``index``'s scheduler."""
        o = self.options
        port = self._metrics_port(f"scheduler-{index}") if o.metrics_port else 0
        scheduler = o.scheduler(redis_url=self.redis_url, workers=workers, pool_id=pool_id, metrics_port=port)
        return [*scheduler.argv(), *o.scheduler_args]

    def gateway_argv(self) -> list[str]:
        """``glm`` arguments of the gateway."""
        o = self.options
        port = self._metrics_port("gateway") if o.metrics_port else 0
        return [*o.gateway(redis_url=self.redis_url, metrics_port=port).argv(), *o.gateway_args]

    def _metrics_port(self, process: str) -> int:
        """A loopback port for ``process``'s own endpoint, scraped by the hub."""
        port = free_port()
        self.metrics_targets[process] = f"http://127.0.0.1:{port}/metrics"
        return port

    def _tracing_args(self) -> list[str]:
        """What every service of the stack is told about tracing."""
        endpoint = self.options.otlp_endpoint
        return ["--otlp-endpoint", endpoint] if endpoint else []

    def start_gateway(self) -> None:
        o = self.options
        self.gateway = self._spawn("gateway", glm_command(*self.gateway_argv()))
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
        """Raise StackError naming the first process that died (a scheduler is restarted
        first, see the module docstring)."""
        for i, proc in enumerate(self.schedulers):
            if proc.poll() is not None:
                self._supervise_scheduler(i)
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
            pool.stop(grace_s=grace_s)
        if self.redis is not None:
            self.redis.stop()
