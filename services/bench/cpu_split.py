"""Where a local stack's CPU went during a run (``glm bench serve`` without ``--address``):
each process's user + system time, its threads included (``/proc/<pid>/stat``), over the
run's wall time, in % of one core. On a machine whose cores the worker shares with the
gateway, the scheduler, Redis and the load generator, their share is CPU the worker's
threads did not get (docs/benchmarks.md, "Against vLLM (CPU)")."""

from __future__ import annotations

import os
import time


def cpu_seconds(pid: int) -> float | None:
    """User + system seconds of ``pid`` so far (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSplit:
    """``start`` notes every named process's CPU time; ``report`` gives each name's share
    since then (a name may cover several processes: the ranks of a pool)."""

    def __init__(self, processes: dict[str, list[int]]) -> None:
        self.processes = {name: list(pids) for name, pids in processes.items() if pids}
        self._start: dict[int, float] = {}
        self._started_at = 0.0

    def start(self) -> None:
        self._start = {pid: t for pids in self.processes.values() for pid in pids
                       if (t := cpu_seconds(pid)) is not None}
        self._started_at = time.monotonic()

    def report(self) -> dict[str, float]:
        """{name: % of one core} over the time since ``start``."""
        wall = time.monotonic() - self._started_at
        out = {}
        for name, pids in self.processes.items():
            used = 0.0
            for pid in pids:
                now = cpu_seconds(pid)
                if now is not None and pid in self._start:
                    used += now - self._start[pid]
            out[name] = 100.0 * used / wall if wall > 0 else 0.0
        return out


def format_cpu(split: dict[str, float]) -> str:
    return "CPU (% of one core): " + ", ".join(f"{name} {share:.0f}" for name, share in split.items())
