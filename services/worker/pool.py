"""Start every rank of a pool as its own process (``glm worker``), wait until all
answer Health, and stop them cleanly.

Each rank listens on a unix socket in the pool's folder (``rank-<r>.sock``) and
writes its output to ``rank-<r>.log`` there; the ranks meet through a
``tcp://127.0.0.1:<port>`` rendezvous, bound to loopback only. Each socket is mode
0600 and a folder the pool creates is 0700; unless given one, the pool writes a new
shard token (``<folder>/shard-token``, 0600) that every rank requires and that
``ShardClient`` reads from beside the sockets. ``glm serve`` uses this to run a local
pool, ``glm pool`` to run and supervise one (the Kubernetes pool's worker
container); the tests use it to drive real processes. What each rank is run with is
``services.worker.options.PoolOptions``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.proto_gen.glm.v1 import shard_pb2_grpc
from services.common.env import child_environ
from services.worker.client import write_token
from services.worker.options import PoolOptions, RankOptions


class PoolError(RuntimeError):
    """A rank failed to start or died; the message carries the end of its log."""


@dataclass
class PoolHandle:
    """The running ranks of one pool: their addresses, processes and logs."""

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

    def wait_ready(self, timeout_s: float = 120.0, stop: threading.Event | None = None) -> None:
        """Block until every rank answers Health (or ``stop`` is set); PoolError if one dies
        or time runs out."""
        deadline = time.monotonic() + timeout_s
        pending = set(range(len(self.addresses)))
        while pending and not (stop is not None and stop.is_set()):
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


def start_pool(checkpoint: str | Path, tp: int, *, workdir: str | Path | None = None,
               ready_timeout_s: float = 120.0, wait: bool = True, model_name: str | None = None,
               metrics_ports: list[int] | None = None, metrics_host: str = "127.0.0.1",
               dist_port: int | None = None, rank_logs: bool = True, **rank) -> PoolHandle:
    """Launch ``tp`` worker processes for ``checkpoint``; by default wait until all are ready.
    ``rank``: the ``RankOptions`` fields (``dtype=``, ``kv_memory_gib=``, ...);
    ``workdir``: the folder of the sockets (default: a new one, removed by ``stop``);
    ``dist_port``: the rendezvous port on 127.0.0.1 (default: a free one);
    ``metrics_ports``: one per rank, served on ``metrics_host`` (default: no metrics);
    ``rank_logs=False``: the ranks write to this process's stdout/stderr, not ``rank-<r>.log``."""
    own = workdir is None
    # Unix socket paths are limited to ~107 bytes: keep the folder short.
    folder = Path(tempfile.mkdtemp(prefix="glm-pool-", dir="/tmp") if own else workdir)
    options = PoolOptions(checkpoint=str(checkpoint), tp=tp, socket_dir=str(folder), dist_port=dist_port or 0,
                          ranks=RankOptions(**rank), model_name=model_name, metrics_host=metrics_host)
    return launch_pool(options, metrics_ports=tuple(metrics_ports) if metrics_ports is not None else None,
                       own_workdir=own, rank_logs=rank_logs, wait=wait, ready_timeout_s=ready_timeout_s)


def launch_pool(options: PoolOptions, *, metrics_ports: tuple[int, ...] | None = None, own_workdir: bool = False,
                rank_logs: bool = True, wait: bool = True, ready_timeout_s: float | None = None) -> PoolHandle:
    """Start the ranks of ``options`` (stale sockets in its folder are removed first), each as
    ``glm worker`` with its ``WorkerOptions`` rendered as flags and no ``GLM_`` variable
    inherited. ``metrics_ports``: each rank's own port (default: ``options.metrics_port + r``);
    ``ready_timeout_s`` (default: ``options.ready_timeout_s``) applies with ``wait``."""
    folder = Path(options.socket_dir)
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)   # the sockets' folder: this user only
    if options.shard_token_file is None:
        write_token(options.token_file)          # a new token for this launch, mode 0600
    handle = PoolHandle([], [], folder, own_workdir)
    environ = child_environ()
    try:
        for worker in options.workers(metrics_ports):
            (folder / f"rank-{worker.rank}.sock").unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "services.cli.main", *worker.argv()]
            cwd = Path(__file__).resolve().parents[2]
            if rank_logs:
                log = folder / f"rank-{worker.rank}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=cwd, env=environ)
                handle.logs.append(log)
            else:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=cwd, env=environ)
            handle.addresses.append(worker.listen)
            handle.processes.append(proc)
        if wait:
            handle.wait_ready(options.ready_timeout_s if ready_timeout_s is None else ready_timeout_s)
    except BaseException:
        handle.stop(grace_s=1.0)
        raise
    return handle
