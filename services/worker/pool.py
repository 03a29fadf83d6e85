"""Start every rank of a pool as its own process (``glm worker``), wait until all
answer Health, and stop them cleanly.

Each rank listens on a unix socket in the pool's folder (``rank-<r>.sock``) and
writes its output to ``rank-<r>.log`` there; the ranks meet through a
``tcp://127.0.0.1:<port>`` rendezvous. ``glm serve`` uses this to run a local
pool, ``glm pool`` to run and supervise one (the Kubernetes pool's worker
container); the tests use it to drive real processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.proto_gen.glm.v1 import shard_pb2_grpc
from services.common.net import free_port


class PoolError(RuntimeError):
    """A rank failed to start or died; the message carries the end of its log."""


@dataclass
class PoolHandle:
    addresses: list[str]
    processes: list[subprocess.Popen]
    workdir: Path
    own_workdir: bool = True
    logs: list[Path] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def dead_ranks(self) -> list[int]:
        return [r for r, p in enumerate(self.processes) if p.poll() is not None]

    def log_tail(self, rank: int, lines: int = 20) -> str:
        if rank >= len(self.logs):   # rank_logs=False: the ranks wrote to our stdout/stderr
            return ""
        try:
            return "\n".join(self.logs[rank].read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until every rank answers Health; PoolError if one dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        pending = set(range(len(self.addresses)))
        while pending:
            dead = self.dead_ranks()
            if dead:
                r = dead[0]
                raise PoolError(f"rank {r} exited with code {self.processes[r].returncode} while starting:\n"
                                f"{self.log_tail(r)}")
            for r in sorted(pending):
                if _healthy(self.addresses[r]):
                    pending.discard(r)
            if pending and time.monotonic() > deadline:
                raise PoolError(f"rank(s) {sorted(pending)} not ready after {timeout_s:.0f} s:\n"
                                f"{self.log_tail(min(pending))}")
            if pending:
                time.sleep(0.2)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every rank, SIGKILL what is left after ``grace_s``; remove the folder."""
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.processes:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PoolHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _healthy(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            shard_pb2_grpc.ShardServiceStub(channel).Health(pb.HealthRequest(), timeout=1.0)
        return True
    except grpc.RpcError:
        return False


@dataclass(frozen=True)
class PoolSpec:
    """What the ranks of one pool share: the ``glm worker`` flags of every rank but its own
    (``--rank``, ``--listen``, ``--metrics-port``). Rank ``r`` listens on
    ``<folder>/rank-<r>.sock`` and serves its metrics on ``metrics_ports[r]``."""

    checkpoint: str
    tp: int
    folder: Path
    dist_port: int
    dtype: str = "float32"
    device: str = "cpu"
    quant: str | None = None
    quant_group_size: int | None = None
    kv_memory_gib: float | None = None
    collective_timeout_s: float = 60.0
    otlp_endpoint: str | None = None
    layer_trace_ratio: float = 0.0
    threads: int | None = None
    model_name: str | None = None
    metrics_ports: tuple[int, ...] | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.metrics_ports is not None and len(self.metrics_ports) != self.tp:
            raise ValueError(f"metrics_ports: {len(self.metrics_ports)} ports for {self.tp} ranks")

    def address(self, rank: int) -> str:
        return f"unix://{self.folder / f'rank-{rank}.sock'}"

    def worker_argv(self, rank: int) -> list[str]:
        """``glm`` arguments of rank ``rank`` (``["worker", ...]``). Every setting is passed as a
        flag, so the ``GLM_*`` variables the ranks inherit cannot change it."""
        threads = self.threads or max(1, (os.cpu_count() or 1) // self.tp)
        metrics_port = self.metrics_ports[rank] if self.metrics_ports else 0
        argv = ["worker", "--checkpoint", str(self.checkpoint), "--tp", str(self.tp), "--rank", str(rank),
                "--listen", self.address(rank), "--dist-init", f"tcp://127.0.0.1:{self.dist_port}",
                "--dtype", self.dtype, "--device", self.device, "--quant", self.quant or "none",
                "--collective-timeout-s", str(self.collective_timeout_s),
                "--layer-trace-ratio", str(self.layer_trace_ratio), "--threads", str(threads),
                "--metrics-port", str(metrics_port), "--metrics-host", self.metrics_host]
        if self.quant_group_size is not None:
            argv += ["--quant-group-size", str(self.quant_group_size)]
        if self.kv_memory_gib is not None:
            argv += ["--kv-memory-gib", str(self.kv_memory_gib)]
        if self.otlp_endpoint:
            argv += ["--otlp-endpoint", self.otlp_endpoint]
        if self.model_name:
            argv += ["--model-name", self.model_name]
        return argv


def start_pool(checkpoint: str | Path, tp: int, *, dtype: str = "float32", device: str = "cpu",
               quant: str | None = None, quant_group_size: int | None = None,
               kv_memory_gib: float | None = None, collective_timeout_s: float = 60.0,
               otlp_endpoint: str | None = None, layer_trace_ratio: float = 0.0, threads: int | None = None,
               workdir: str | Path | None = None, ready_timeout_s: float = 120.0,
               wait: bool = True, model_name: str | None = None,
               metrics_ports: list[int] | None = None, metrics_host: str = "127.0.0.1",
               dist_port: int | None = None, rank_logs: bool = True) -> PoolHandle:
    """Launch ``tp`` worker processes for ``checkpoint``; by default wait until all are ready.
    ``workdir``: the folder of the sockets (default: a new one, removed by ``stop``);
    ``dist_port``: the rendezvous port on 127.0.0.1 (default: a free one);
    ``metrics_ports``: one per rank, served on ``metrics_host`` (default: no metrics);
    ``rank_logs=False``: the ranks write to this process's stdout/stderr, not ``rank-<r>.log``."""
    own = workdir is None
    # Unix socket paths are limited to ~107 bytes: keep the folder short.
    folder = Path(tempfile.mkdtemp(prefix="glm-pool-", dir="/tmp") if own else workdir)
    spec = PoolSpec(
        checkpoint=str(checkpoint), tp=tp, folder=folder, dist_port=dist_port or free_port(), dtype=dtype,
        device=device, quant=quant, quant_group_size=quant_group_size, kv_memory_gib=kv_memory_gib,
        collective_timeout_s=collective_timeout_s, otlp_endpoint=otlp_endpoint,
        layer_trace_ratio=layer_trace_ratio, threads=threads, model_name=model_name,
        metrics_ports=tuple(metrics_ports) if metrics_ports is not None else None, metrics_host=metrics_host)
    return launch_pool(spec, own_workdir=own, rank_logs=rank_logs, wait=wait, ready_timeout_s=ready_timeout_s)


def launch_pool(spec: PoolSpec, *, own_workdir: bool = False, rank_logs: bool = True, wait: bool = True,
                ready_timeout_s: float = 120.0) -> PoolHandle:
    """Start the ranks of ``spec`` (stale sockets in its folder are removed first)."""
    spec.folder.mkdir(parents=True, exist_ok=True)
    handle = PoolHandle([], [], spec.folder, own_workdir)
    try:
        for rank in range(spec.tp):
            (spec.folder / f"rank-{rank}.sock").unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "services.cli.main", *spec.worker_argv(rank)]
            cwd = Path(__file__).resolve().parents[2]
            if rank_logs:
                log = spec.folder / f"rank-{rank}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=cwd)
                handle.logs.append(log)
            else:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=cwd)
            handle.addresses.append(spec.address(rank))
            handle.processes.append(proc)
        if wait:
            handle.wait_ready(ready_timeout_s)
    except BaseException:
        handle.stop(grace_s=1.0)
        raise
    return handle
