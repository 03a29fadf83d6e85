"""``glm pool``: launch the ``tp`` ranks of one pool (``glm worker --rank R`` each) and keep
them as one unit: wait until every rank answers Health, then supervise.

- SIGTERM/SIGINT: stop every rank (SIGTERM, SIGKILL after ``--stop-grace-s``), exit 0.
- A rank exits on its own: its peers would wait in a collective, so stop them and exit
  non-zero (the rank's status; 128 + N for a rank killed by signal N, e.g. 137).
- A rank is not ready within ``--ready-timeout-s``: stop them all, exit 1.

This is the Kubernetes pool's worker container; ``services.worker.pool`` does the launching,
each rank from its ``PoolOptions.worker(rank)``.
"""

from __future__ import annotations

import logging
import signal
import threading

from services.worker.options import PoolOptions
from services.worker.pool import PoolError, PoolHandle, launch_pool

POLL_S = 0.2
log = logging.getLogger("glm.pool")


def _exit_code(returncode: int) -> int:
    """The pool's status for a rank that exited on its own: never 0."""
    if returncode < 0:
        return 128 - returncode          # killed by signal N: 128 + N, as a shell reports it
    return returncode or 1


def _ignore_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _supervise(handle: PoolHandle, stop: threading.Event) -> int | None:
    """Block until a rank exits (its index) or a stop is asked for (None)."""
    while not stop.is_set():
        dead = handle.dead_ranks()
        if dead:
            return dead[0]
        stop.wait(POLL_S)
    return None


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pool %(levelname)s %(message)s")
    spec = PoolOptions.from_args(args)
    # The handler only records the signal: an exception raised from a handler can land inside
    # code that catches it (a log call swallowed one, and the pool never stopped).
    stop, signals = threading.Event(), []

    def on_signal(signum, frame) -> None:
        signals.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    handle, rank = None, None
    try:
        handle = launch_pool(spec, rank_logs=False, wait=False)
        log.info("started %d rank(s): pids %s", spec.tp, " ".join(map(str, handle.pids)))
        handle.wait_ready(spec.ready_timeout_s, stop=stop)
        if not stop.is_set():
            log.info("all %d rank(s) ready: %s", spec.tp, ",".join(handle.addresses))
            rank = _supervise(handle, stop)
    except PoolError as exc:
        if not stop.is_set():
            _ignore_signals()
            log.error("%s", exc)
            dead = handle.dead_ranks() if handle is not None else []
            if dead:
                log.error("rank %d exited with status %d; stopping the pool", dead[0],
                          handle.processes[dead[0]].returncode)
            if handle is not None:
                handle.stop(grace_s=spec.stop_grace_s)
            # a rank that died while the pool was starting reports like one that died later
            return _exit_code(handle.processes[dead[0]].returncode) if dead else 1
    _ignore_signals()                    # one stop is enough; a second signal must not interrupt it
    if stop.is_set():
        log.info("%s: stopping %d rank(s)", signals[0], spec.tp)
        if handle is not None:
            handle.stop(grace_s=spec.stop_grace_s)
        return 0
    code = _exit_code(handle.processes[rank].returncode)
    log.error("rank %d exited with status %d; stopping the pool", rank, handle.processes[rank].returncode)
    handle.stop(grace_s=spec.stop_grace_s)
    return code
