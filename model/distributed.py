"""Process groups for tensor parallelism, and running a function on N local ranks.

NCCL on CUDA, gloo on CPU. ``run_local_ranks`` starts one real process per
rank (spawned, so no state leaks from the parent), hands each a
``ParallelContext`` and returns every rank's result, or raises ``RankError``
with the first rank's failure as one line — also when a rank dies without a word.
A ``tcp://HOST:PORT`` rendezvous binds exactly ``HOST`` (loopback for local ranks).
"""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.parallel import ParallelContext


class RankError(RuntimeError):
    """A rank failed; the message names the rank and the problem."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_group(rank: int, world_size: int, init_method: str, *, backend: str = "gloo",
               timeout_s: float = 300.0) -> ParallelContext:
    """Join the default process group and return this rank's context.

    A ``tcp://HOST:PORT`` rendezvous listens on exactly ``HOST`` (``rendezvous_store``);
    other init methods (``env://``, ``file://``) are torch's own."""
    if world_size == 1:
        return ParallelContext()
    timeout = datetime.timedelta(seconds=timeout_s)
    address = urlsplit(init_method)
    if address.scheme == "tcp":
        store = rendezvous_store(address.hostname or "127.0.0.1", address.port or 0, rank, world_size, timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout)
    return ParallelContext(rank=rank, world_size=world_size, group=dist.group.WORLD)


def rendezvous_store(host: str, port: int, rank: int, world_size: int,
                     timeout: datetime.timedelta) -> dist.TCPStore:
    """The ``TCPStore`` of a ``tcp://host:port`` rendezvous. Rank 0 serves it on a socket
    it binds itself to ``host`` only: torch's own server (``init_method="tcp://..."``)
    listens on every interface whatever the host. The other ranks connect to it."""
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise OSError(exc.errno, f"rendezvous tcp://{host}:{port}: cannot listen: {exc.strerror}") from None
    # The store owns the descriptor from here on (and closes it).
    return dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=listener.detach())


def _rank_main(rank: int, world_size: int, init_method: str, backend: str, timeout_s: float,
               threads: int, fn: Callable, args: tuple, results) -> None:
    try:
        torch.set_num_threads(threads)
        ctx = init_group(rank, world_size, init_method, backend=backend, timeout_s=timeout_s)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        out = fn(ctx, *args)
        # Serialise here: a tensor put on a torch queue is shared through a file
        # descriptor that dies with this process, which may exit before the parent reads.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException as exc:  # reported to the parent as one line
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        message = str(exc) if isinstance(exc, ValueError) else detail
        results.put((rank, False, (type(exc).__name__, message)))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_local_ranks(fn: Callable[..., Any], world_size: int, *args, backend: str = "gloo",
                    timeout_s: float = 600.0) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``world_size`` spawned processes; results in rank order.

    ``fn`` must be importable (a module-level function). The first failure (an
    exception, or a process that exits without reporting) stops every rank.
    """
    if world_size == 1:
        return [fn(ParallelContext(), *args)]
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        spawn.Process(target=_rank_main, daemon=True,
                      args=(r, world_size, init_method, backend, timeout_s, threads, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(done) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode is not None]
                if dead:
                    # give a dying rank's report a moment to arrive before blaming it
                    try:
                        rank, ok, payload = results.get(timeout=1.0)
                    except queue_mod.Empty:
                        raise RankError(
                            f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result"
                        ) from None
                elif time.monotonic() > deadline:
                    raise RankError(f"ranks did not finish within {timeout_s:.0f} s") from None
                else:
                    continue
            if not ok:
                kind, message = payload
                raise RankError(message if kind in _PLAIN_ERRORS else f"rank {rank}: {message}")
            done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        return [done[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=5 if len(done) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join()


# Bad-input errors whose message is already a complete one-line explanation.
_PLAIN_ERRORS = {"ValueError", "CheckpointError", "PromptError"}
