"""What a benchmark run cost Redis and how full the pool's forwards were, read from the
stack's own private Redis (``glm bench serve`` without ``--address``).

``RedisLoad.start`` resets the server's statistics (``CONFIG RESETSTAT``) and notes
the pools' step counters; ``RedisLoad.report`` reads ``INFO commandstats`` (every
command the server ran, those a Lua script ran included, each under its own name)
and the counters again, once the pools are idle. Commands per generated token are
split by command; rows per forward is the mean size of the pools' decode batches
(``decode_rows / decode_steps`` of their heartbeats, ``services/scheduler/loop.py``), and
the workers' share of the pools' busy time is ``shard_ms / busy_ms`` (the rest is the
scheduler between two shard calls: the workers wait). The workers' own tokens/s are the
tokens their calls made (a row of a Prefill or a Decode makes one) over the time the
scheduler spent in those calls (gRPC included), at the run's own batch sizes: the
stack's tokens/s over it is what the whole stack keeps of the workers' speed.
The server is private to the stack, so every command counted is the stack's own
(the gateway's, the schedulers'), but for this module's reset and read, left out.
"""

from __future__ import annotations

import time

import redis

from services.common import redis_keys as keys

COUNTERS = ("decode_steps", "decode_rows", "prefill_steps", "prefill_rows", "preempted", "ahead_steps", "shard_ms",
            "busy_ms")
_OWN = ("config|resetstat", "config", "info")   # what this module sends between the two reads


def command_counts(client: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls} (subcommands as ``config|resetstat``)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def pool_counters(client: redis.Redis) -> tuple[dict[str, int], bool]:
    """The step counters summed over the pools' heartbeats, and whether every pool is idle."""
    total = dict.fromkeys(COUNTERS, 0.0)
    idle = True
    for name in client.scan_iter(match=keys.pool_pattern(), count=256):
        beat = {k.decode(): v.decode() for k, v in client.hgetall(name).items()}
        for counter in COUNTERS:
            total[counter] += float(beat.get(counter, 0))
        idle = idle and int(float(beat.get("running", 0))) == 0 and int(float(beat.get("waiting", 0))) == 0
    return total, idle


def per_token(counts: dict[str, int], tokens: int) -> dict:
    """Commands per generated token, in all and by command (most frequent first)."""
    counts = {k: v for k, v in counts.items() if k not in _OWN and v}
    total = sum(counts.values())
    return {"commands": total, "tokens": tokens,
            "per_token": total / tokens if tokens else None,
            "by_command": {k: v / tokens if tokens else None
                           for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}


class RedisLoad:
    """Counts one run's Redis commands and the pools' batch sizes (module docstring)."""

    def __init__(self, url: str, settle_s: float = 3.0) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.settle_s = settle_s            # how long to wait for the pools' idle heartbeat
        self.before: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def start(self) -> None:
        self.before, _idle = self._idle_counters()
        self.client.config_resetstat()

    def _idle_counters(self) -> tuple[dict[str, int], bool]:
        deadline = time.monotonic() + self.settle_s
        counters, idle = pool_counters(self.client)
        while not idle and time.monotonic() < deadline:
            time.sleep(0.05)
            counters, idle = pool_counters(self.client)
        return counters, idle

    def report(self, tokens: int, elapsed_s: float | None = None) -> dict:
        """The run's figures; ``elapsed_s``: its wall time on the client, for the stack's
        tokens/s against the workers' own (tokens generated ÷ time in shard calls)."""
        counts = command_counts(self.client)
        after, idle = self._idle_counters()
        steps = {k: after[k] - self.before[k] for k in COUNTERS}
        out = per_token(counts, tokens)
        out["steps"] = steps
        out["rows_per_forward"] = steps["decode_rows"] / steps["decode_steps"] if steps["decode_steps"] else None
        out["prefill_rows_per_call"] = (steps["prefill_rows"] / steps["prefill_steps"]
                                        if steps["prefill_steps"] else None)
        # the workers' share of the pools' busy time (the rest: the scheduler between calls)
        out["workers_busy"] = steps["shard_ms"] / steps["busy_ms"] if steps["busy_ms"] > 0 else None
        made = steps["decode_rows"] + steps["prefill_rows"]       # one token per row and call
        out["workers_tok_s"] = made / (steps["shard_ms"] / 1000.0) if steps["shard_ms"] > 0 else None
        out["stack_vs_workers"] = (tokens / elapsed_s / out["workers_tok_s"]
                                   if elapsed_s and out["workers_tok_s"] else None)
        out["pools_idle"] = idle            # False: the counters may miss the last steps
        return out

    def close(self) -> None:
        self.client.close()


def format_line(mode: str, load: dict) -> str:
    """One line of the table: commands per token (the top few by name) and rows per forward."""
    if load.get("per_token") is None:
        return f"{mode}: Redis: no tokens generated"
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(load["by_command"].items())[:5])
    rows = load.get("rows_per_forward")
    rows_text = "-" if rows is None else f"{rows:.1f}"
    busy = load.get("workers_busy")
    busy_text = "-" if busy is None else f"{busy * 100:.0f} %"
    ratio = load.get("stack_vs_workers")
    ratio_text = "" if ratio is None else (f"; stack tokens/s x{ratio:.2f} the workers' own "
                                           f"({load['workers_tok_s']:.0f} tokens/s in their calls)")
    return (f"{mode}: Redis {load['per_token']:.2f} commands/token ({top}); "
            f"rows per forward {rows_text} over {load['steps']['decode_steps']:.0f} decode steps "
            f"({load['steps'].get('ahead_steps', 0):.0f} sent ahead), "
            f"{load['steps']['prefill_steps']:.0f} prefills, {load['steps'].get('preempted', 0):.0f} rows preempted; "
            f"workers busy {busy_text} of the pools' busy time"
            f"{ratio_text}")
