"""Start every rank of a pool as its own process (``glm worker``), wait until all
answer Health, and stop them cleanly.

Each rank listens on a unix socket in the pool's folder (``rank-<r>.sock``) and
writes its output to ``rank-<r>.log`` there; the ranks meet through a
``tcp://127.0.0.1:<free port>`` rendezvous. ``glm serve`` uses this to run a
local pool; the tests use it to drive real processes.
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


class PoolError(RuntimeError):
    """A rank failed to start or died; the message carries the end of its log."""


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def start_pool(checkpoint: str | Path, tp: int, *, dtype: str = "float32", device: str = "cpu",
               quant: str | None = None, kv_memory_gib: float | None = None,
               collective_timeout_s: float = 60.0, otlp_endpoint: str | None = None,
               layer_trace_ratio: float = 0.0, threads: int | None = None,
               workdir: str | Path | None = None, ready_timeout_s: float = 120.0,
               wait: bool = True, model_name: str | None = None,
               metrics_ports: list[int] | None = None) -> PoolHandle:
    """Launch ``tp`` worker processes for ``checkpoint``; by default wait until all are ready.
    ``metrics_ports``: one per rank, served on 127.0.0.1 (default: no metrics)."""
    if metrics_ports is not None and len(metrics_ports) != tp:
        raise ValueError(f"metrics_ports: {len(metrics_ports)} ports for {tp} ranks")
    own = workdir is None
    # Unix socket paths are limited to ~107 bytes: keep the folder short.
    folder = Path(tempfile.mkdtemp(prefix="glm-pool-", dir="/tmp") if own else workdir)
    folder.mkdir(parents=True, exist_ok=True)
    dist_init = f"tcp://127.0.0.1:{_free_port()}"
    threads = threads or max(1, (os.cpu_count() or 1) // tp)
    handle = PoolHandle([], [], folder, own)
    try:
        for rank in range(tp):
            address = f"unix://{folder / f'rank-{rank}.sock'}"
            cmd = [sys.executable, "-m", "services.cli.main", "worker", "--checkpoint", str(checkpoint),
                   "--tp", str(tp), "--rank", str(rank), "--listen", address, "--dist-init", dist_init,
                   "--dtype", dtype, "--device", device, "--collective-timeout-s", str(collective_timeout_s),
                   "--layer-trace-ratio", str(layer_trace_ratio), "--threads", str(threads)]
            if quant:
                cmd += ["--quant", quant]
            if kv_memory_gib is not None:
                cmd += ["--kv-memory-gib", str(kv_memory_gib)]
            if otlp_endpoint:
                cmd += ["--otlp-endpoint", otlp_endpoint]
            if model_name:
                cmd += ["--model-name", model_name]
            if metrics_ports:
                cmd += ["--metrics-port", str(metrics_ports[rank]), "--metrics-host", "127.0.0.1"]
            log = folder / f"rank-{rank}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=Path(__file__).resolve().parents[2])
            handle.addresses.append(address)
            handle.processes.append(proc)
            handle.logs.append(log)
        if wait:
            handle.wait_ready(ready_timeout_s)
    except BaseException:
        handle.stop(grace_s=1.0)
        raise
    return handle
