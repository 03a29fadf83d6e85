"""Redis as a dependency that fails, and leases that survive slow steps, against a real
TP=1 worker pool and private ``redis-server`` processes (killed, restarted, filled up
here, never the machine's Redis):

* Redis killed (SIGKILL) under a running request and restarted from its append-only
  file: the request completes, its events have no gap and no duplicate and equal
  ``glm generate --greedy``, the pool decoded on while Redis was down and still runs;
* a restart that lost everything (NOGROUP): the pool re-creates the group and serves;
  a caller waiting on a lost request's events gets UNAVAILABLE, never a hang;
* maxmemory reached: new requests are refused with RESOURCE_EXHAUSTED naming it, the
  running one finishes, nothing dies; with room again, new ones are served;
* a step stalled (the rank SIGSTOPped) for longer than the claim idle time: the lease
  task keeps the entry fresh, a rival pool's XAUTOCLAIM gets nothing, one final event;
* a pool whose claim was taken (a rival's forced XCLAIM) stops generating that request
  and publishes nothing more for it; its batch neighbour finishes.

Verdicts on events, step numbers and status codes; the clocks are ``HANG_S`` (a bound
that only turns a hang into a failure) and, in the stalled-step test, the stall itself
(it must outlast the claim idle time to be a test at all)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from model.config import GMASK_ID
from model.generation import GenerationOptions, Generator
from model.runner import load_model
from model.sampling import SamplingParams
from model.tokenizer import GLMTokenizer
from services.common import redis_keys as keys
from services.common.errors import ResourceExhausted, Unavailable
from services.common.local_redis import LocalRedisError, find_redis_server
from services.common.messages import Event, QueuedRequest, Sampling
from services.common.net import free_port
from services.gateway.broker import Broker, connect, pool_size
from services.scheduler.loop import LoopOptions, PoolLoop
from services.scheduler.policy import Limits
from services.worker.pool import start_pool

pytestmark = [pytest.mark.redis, pytest.mark.processes, pytest.mark.slow]
HANG_S = 60.0
GREEDY = Sampling(temperature=0.0, seed=7)
PROMPT = (20100, 20200, 20300, 20400, GMASK_ID)
MAX_NEW = 40


class PrivateRedis:
    """A ``redis-server`` of this test alone, on its own port and folder: ``kill`` is
    SIGKILL, ``start(fresh=True)`` comes back without any data."""

    def __init__(self, folder: Path, *, persist: bool) -> None:
        self.folder, self.persist = folder, persist
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, fresh: bool = False) -> None:
        if fresh:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log"),
               "--maxmemory-policy", "noeviction"]
        cmd += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    async def ready(self) -> None:
        client = aioredis.from_url(self.url, socket_connect_timeout=1)
        try:
            deadline = time.monotonic() + HANG_S
            while time.monotonic() < deadline:
                try:
                    if await client.ping():
                        return
                except Exception:
                    await asyncio.sleep(0.05)
            raise AssertionError(f"redis-server on {self.port} did not come up")
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def redis_binary():
    try:
        return find_redis_server()
    except LocalRedisError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def private_redis(redis_binary, tmp_path):
    servers = []

    def make(persist: bool = False) -> PrivateRedis:
        server = PrivateRedis(tmp_path / f"redis-{len(servers)}", persist=persist)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=3)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return GLMTokenizer.from_file(f"{ckpt}/ice_text.model")


@pytest.fixture(scope="module")
def expected(ckpt):
    """The greedy tokens of ``PROMPT`` (what ``glm generate --greedy`` gives)."""
    result = Generator(load_model(ckpt)).fill_blanks(list(PROMPT), SamplingParams(greedy=True),
                                                     GenerationOptions(max_new_tokens=MAX_NEW))
    [blank] = result.blanks
    assert len(blank.token_ids) >= 12, "the reference must run long enough to be cut"
    return list(blank.token_ids)


@pytest.fixture(scope="module")
def pool(ckpt):
    handle = start_pool(ckpt, 1, dtype="float32", kv_memory_gib=0.002)
    yield handle
    handle.stop()


class Harness:
    """One pool loop (in this process) on a private Redis, and a gateway's broker."""

    def __init__(self, server: PrivateRedis, pool, tokenizer, **overrides) -> None:
        tag = uuid.uuid4().hex[:8]
        self.server = server
        self.model = f"faults-{tag}"
        options = LoopOptions(redis_url=server.url, model=self.model, workers=tuple(pool.addresses),
                              pool_id=f"pool-{tag}", idle_block_ms=20, shard_timeout_s=HANG_S,
                              limits=Limits(max_batch_size=4, max_input_tokens=64, max_total_tokens=128),
                              **overrides)
        self.loop = PoolLoop(options, decode=lambda ids: tokenizer.decode(ids, strict=False),
                             max_sequence_length=512)
        self.redis = aioredis.from_url(server.url, socket_connect_timeout=2, socket_timeout=5)
        self.broker = Broker(connect(server.url, max_connections=pool_size(8)), max_queue_depth=100)
        self.count = 0
        self.task = None

    def request(self, max_new: int = MAX_NEW) -> QueuedRequest:
        self.count += 1
        return QueuedRequest(id=f"{self.model}-{self.count}", model=self.model, prompt_ids=PROMPT,
                             sampling=GREEDY, max_new_tokens=max_new)

    async def submit(self, req: QueuedRequest) -> str:
        return (await self.broker.submit(req, fingerprint=req.id)).entry_id

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.loop.run())

    async def read(self, rid: str) -> list[Event]:
        return [Event.from_json(f[b"d"]) for _, f in await self.redis.xrange(keys.events(rid))]

    async def events(self, rid: str) -> list[Event]:
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if self.task is not None and self.task.done():
                self.task.result()
                raise AssertionError("the pool loop ended")
            try:
                events = await self.read(rid)
            except Exception:                   # Redis restarting under the test
                events = []
            if events and events[-1].terminal:
                return events
            await asyncio.sleep(0.02)
        raise AssertionError(f"no terminal event for {rid} within {HANG_S} s")

    async def until(self, predicate) -> None:
        deadline = time.monotonic() + HANG_S
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition never reached")
            if self.task is not None and self.task.done():
                self.task.result()
                raise AssertionError("the pool loop ended")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.task is not None:
            self.loop.stop()
            await asyncio.wait_for(self.task, HANG_S)
        await self.redis.aclose()
        await self.broker.close()


def run(server, pool, tokenizer, body, **overrides):
    async def main():
        h = Harness(server, pool, tokenizer, **overrides)
        try:
            return await body(h)
        finally:
            await h.close()
    return asyncio.run(main())


def check_stream(events: list[Event]) -> None:
    assert [e.seq for e in events] == list(range(len(events)))          # no gap, no duplicate
    assert events[-1].terminal and not any(e.terminal for e in events[:-1])


def tokens(events: list[Event]) -> list[int]:
    return [t for e in events if e.type == "tokens" for t in e.token_ids]


# -- Redis fails ------------------------------------------------------------------------------
def test_redis_restart_under_a_running_request(private_redis, pool, tokenizer, expected):
    server = private_redis(persist=True)

    async def body(h):
        marks = {}

        async def fault(steps: int) -> None:
            if steps == 2:                      # killed between two steps, mid-request
                server.kill()
                marks["killed"] = steps
            elif "killed" in marks and "back" not in marks and steps >= marks["killed"] + 3:
                marks["decoded_while_down"] = steps - marks["killed"]
                server.start()                  # the same port and append-only file
                await server.ready()
                marks["back"] = steps

        await server.ready()
        req = h.request()
        await h.submit(req)
        h.loop.after_step = fault
        h.start()
        events = await h.events(req.id)
        again = h.request(8)                    # the pool still serves
        await asyncio.wait_for(_submit_until_up(h, again), HANG_S)   # a stale gateway connection: UNAVAILABLE once
        return events, await h.events(again.id), marks, h.loop.redis_failures, h.task.done()

    events, again, marks, failures, ended = run(server, pool, tokenizer, body)
    check_stream(events)
    assert events[-1].type == "final" and tokens(events) == expected
    assert marks["decoded_while_down"] >= 3 and failures >= 1
    check_stream(again)
    assert again[-1].type == "final" and not ended


def test_restart_that_lost_the_data(private_redis, pool, tokenizer):
    """A server back empty (NOGROUP for the pool): the group is re-created and new
    requests served; a caller waiting on a request the restart lost gets UNAVAILABLE."""
    server = private_redis(persist=False)

    async def body(h):
        await server.ready()
        h.start()
        first = h.request(4)
        await h.submit(first)
        await h.events(first.id)
        # a request no pool takes (another model's queue): its caller waits on its events
        lost = QueuedRequest(id=f"{h.model}-lost", model=f"{h.model}-nobody", prompt_ids=PROMPT,
                             sampling=GREEDY, max_new_tokens=4)
        await h.broker.submit(lost, fingerprint="x")
        waiting = asyncio.ensure_future(_drain(h.broker.events(lost.id)))
        server.kill()
        server.start(fresh=True)
        await server.ready()
        second = h.request(4)
        await asyncio.wait_for(_submit_until_up(h, second), HANG_S)
        served = await h.events(second.id)
        with pytest.raises(Unavailable) as gone:
            await asyncio.wait_for(waiting, HANG_S)
        return served, str(gone.value), h.loop.redis_failures

    served, gone, failures = run(server, pool, tokenizer, body)
    check_stream(served)
    assert served[-1].type == "final" and failures >= 1
    assert "gone from Redis" in gone


async def _drain(events) -> list[Event]:
    return [e async for e in events]


async def _submit_until_up(h, req) -> None:
    while True:
        try:
            await h.submit(req)
            return
        except Unavailable:
            await asyncio.sleep(0.05)


def test_maxmemory_refuses_new_work_and_lets_running_requests_finish(private_redis, pool, tokenizer,
                                                                     expected):
    server = private_redis(persist=False)

    async def body(h):
        refused = {}

        async def fill_up(steps: int) -> None:
            if steps == 2 and not refused:
                used = int((await h.redis.info("memory"))["used_memory"])
                await h.redis.config_set("maxmemory", max(1, used // 2))
                try:
                    await h.submit(h.request(4))
                except ResourceExhausted as exc:
                    refused["message"] = str(exc)
                refused["at"] = steps

        await server.ready()
        running = h.request()
        await h.submit(running)
        h.loop.after_step = fill_up
        h.start()
        events = await h.events(running.id)
        await h.redis.config_set("maxmemory", 0)
        later = h.request(4)
        await h.submit(later)
        return events, refused, await h.events(later.id), h.task.done()

    events, refused, later, ended = run(server, pool, tokenizer, body)
    assert "maxmemory" in refused["message"]
    check_stream(events)
    assert events[-1].type == "final" and tokens(events) == expected
    check_stream(later)
    assert later[-1].type == "final" and not ended


# -- leases -----------------------------------------------------------------------------------
def test_a_stalled_step_keeps_its_lease(private_redis, pool, tokenizer, expected):
    """The rank is SIGSTOPped with a Decode in flight for three claim idle times; a rival
    pool's XAUTOCLAIM (what a second pool runs) finds nothing idle, and the request ends
    once, from this pool, with every token. In step numbers: when the rival claims, a step
    sent is still unanswered, and no step completed but the one already sent ahead when the
    rank stopped (it may have run before the signal landed)."""
    server = private_redis(persist=False)
    claim_idle_ms = 1000
    rank = pool.processes[0].pid

    async def body(h):
        seen = {}

        async def rival() -> None:
            try:
                seen["steps_before"] = h.loop.steps
                await asyncio.sleep(3 * claim_idle_ms / 1000)     # the stall: longer than the lease
                reply = await h.redis.xautoclaim(keys.queue(h.model), keys.GROUP, "rival", claim_idle_ms,
                                                 start_id="0-0", count=10)
                seen["claimed"] = list(reply[1])
                seen["steps_after"], seen["sent_after"] = h.loop.steps, h.loop.sent
            finally:
                os.kill(rank, signal.SIGCONT)

        async def stall(steps: int) -> None:
            if steps == 2 and "task" not in seen:
                os.kill(rank, signal.SIGSTOP)
                seen["sent_at_stop"] = h.loop.sent
                seen["task"] = asyncio.ensure_future(rival())

        await server.ready()
        req = h.request()
        await h.submit(req)
        h.loop.after_step = stall
        h.start()
        events = await h.events(req.id)
        await seen["task"]
        return events, seen, h.loop.taken_count

    try:
        events, seen, taken = run(server, pool, tokenizer, body, claim_idle_ms=claim_idle_ms)
    finally:
        os.kill(rank, signal.SIGCONT)
    assert seen["claimed"] == [] and seen["steps_before"] == 2
    assert seen["steps_after"] <= seen["sent_at_stop"] and seen["sent_after"] > seen["steps_after"]
    check_stream(events)
    assert [e.type for e in events].count("final") == 1 and tokens(events) == expected and taken == 0


def test_a_pool_that_lost_its_claim_stops_generating(private_redis, pool, tokenizer):
    server = private_redis(persist=False)

    async def body(h):
        taken = {}

        async def take_over(steps: int) -> None:
            if steps == 2 and not taken:
                await h.redis.xclaim(keys.queue(h.model), keys.GROUP, "rival", 0, [taken_entry["id"]])
                taken["published"] = len(await h.read(victim.id))

        await server.ready()
        victim, neighbour = h.request(), h.request(12)
        taken_entry = {"id": await h.submit(victim)}
        await h.submit(neighbour)
        h.loop.after_step = take_over
        h.start()
        done = await h.events(neighbour.id)
        await h.until(lambda: h.loop.taken_count == 1)
        pending = await h.redis.xpending_range(keys.queue(h.model), keys.GROUP, min="-", max="+", count=10)
        return taken, await h.read(victim.id), done, pending, h.loop.core.request_ids()

    taken, victim, neighbour, pending, held = run(server, pool, tokenizer, body)
    assert len(victim) == taken["published"] and not any(e.terminal for e in victim)
    assert [(p["consumer"], p["times_delivered"]) for p in pending] == [(b"rival", 2)]
    check_stream(neighbour)
    assert neighbour[-1].type == "final" and held == []
