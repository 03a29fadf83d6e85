"""The gateway's tenants and capacity, against the real Redis (this module's own database,
tests/redis_harness.py) and real gRPC servers on loopback, with the scripted fake pool of
tests/gateway_harness.py.

Tenants: the same ``request_id`` from two API keys is two requests, idempotency holds per
tenant, and ids that once spelled other requests' keys (``V:cancel``, ``x:events``...) are
requests of their own (the real scheduler and pool: tests/test_tenants.py). Capacity: calls
above ``--max-concurrent-calls`` get RESOURCE_EXHAUSTED at once, health stays SERVING, a
freed slot admits the next call, and more streams than redis-py's default pool of 100 are
all served. Every wait is for an event, bounded by ``HANG_S`` (only a hang reaches it).
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_harness import HANG_S, FakePool, LoopThread, RunningGateway, internal_id, options, wait_for
from redis_harness import url
from services.client import AsyncGLMClient, GLMClient, GLMError
from services.common import redis_keys as keys
from services.common.messages import EVENT_FINAL, EVENT_TOKENS, Event, QueuedRequest
from services.gateway.broker import pool_size

pytestmark = [pytest.mark.redis]
Code = grpc.StatusCode
CALL_S = HANG_S
REDIS_URL = url(__name__)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model.tiny import init_tiny  # torch: only the test process, never the gateway's code

    directory = tmp_path_factory.mktemp("gateway") / "tiny"
    init_tiny(directory, preset="glm-tiny")
    return directory


@pytest.fixture(scope="module")
def rdb(redis_db):
    return redis_db.client


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def start(loop, checkpoint, rdb):
    """``start(**options)`` -> a running gateway on this module's database; stopped after."""
    running = []

    def _start(**overrides) -> RunningGateway:
        gateway = RunningGateway(loop, options(checkpoint, redis_url=REDIS_URL, **overrides))
        running.append(gateway)
        return gateway

    yield _start
    for gateway in running:
        gateway.stop()


@pytest.fixture
def pools():
    started = []

    def _pool(model, script) -> FakePool:
        pool = FakePool(model, script, redis_url=REDIS_URL)
        started.append(pool)
        return pool

    yield _pool
    for pool in started:
        pool.close()


def call_code(fn):
    with pytest.raises(GLMError) as info:
        fn()
    return info.value


def health_status(address, service="") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_S).status


# ---- tenants ------------------------------------------------------------------------------

def echo_script(queued: QueuedRequest):
    """A generation whose text is the prompt's first token id: tells requests apart."""
    text = str(queued.prompt_ids[0])
    return [Event(EVENT_TOKENS, 0, token_ids=(20005,), text=text),
            Event(EVENT_FINAL, 1, finish_reason="stop", text=text, blanks=(text,),
                  seed=queued.sampling.seed)]


def test_tenants_keep_their_request_ids_apart(start, pools, rdb):
    """The same request_id from two API keys is two requests; each tenant's idempotency
    holds on its own; a reply names the caller's id, never the namespaced one."""
    gateway = start(api_keys=("key-a", "key-b"))
    pool = pools(gateway.model, echo_script)
    rid = f"shared-{gateway.model}"
    with GLMClient(gateway.address, api_key="key-a", timeout=CALL_S) as a, \
            GLMClient(gateway.address, api_key="key-b", timeout=CALL_S) as b:
        first = a.generate(prompt_token_ids=[20010, 150001], request_id=rid)
        other = b.generate(prompt_token_ids=[20011, 150001], request_id=rid)   # not ALREADY_EXISTS
        same = b.generate(prompt_token_ids=[20010, 150001], request_id=rid + "-2")
        a_again = a.generate(prompt_token_ids=[20010, 150001], request_id=rid)  # re-attaches
        b_again = b.generate(prompt_token_ids=[20011, 150001], request_id=rid)
        for client, ids in ((a, [20011, 150001]), (b, [20010, 150001])):
            error = call_code(lambda: client.generate(prompt_token_ids=ids, request_id=rid))
            assert error.code == Code.ALREADY_EXISTS and repr(rid) in error.details
            assert "/" not in error.details                              # the caller's own id
    assert (first.text, other.text, same.text) == ("20010", "20011", "20010")
    assert a_again == first and b_again == other
    assert first.request_id == other.request_id == rid
    seen = [q.id for q in pool.seen]
    assert seen == [internal_id(rid, "key-a"), internal_id(rid, "key-b"), internal_id(rid + "-2", "key-b")]
    for key in ("key-a", "key-b"):
        assert rdb.exists(keys.request(internal_id(rid, key)), keys.events(internal_id(rid, key))) == 2
    assert not rdb.exists(keys.request(rid), keys.events(rid), keys.request(internal_id(rid)))


def test_an_id_never_spells_another_requests_key(start, pools, rdb):
    """Ids that spelled other requests' keys when ids went into keys as they were: each is a
    request of its own, and no key of one is a key of another."""
    gateway = start()
    pool = pools(gateway.model, echo_script)
    ids = ["V", "V:cancel", "V:events", "x:events", "x", "y" * 128, "V:events:cancel"]
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        streams = [list(client.generate_stream(prompt_token_ids=[20010 + i, 150001], request_id=rid))
                   for i, rid in enumerate(ids)]
    assert [m[-1].finish_reason for m in streams] == ["stop"] * len(ids)
    assert [m[0].text for m in streams] == [str(20010 + i) for i in range(len(ids))]
    assert {m.request_id for s in streams for m in s} == set(ids)
    assert len(pool.seen) == len(ids)
    owned = {}
    for rid in ids:
        for key in (keys.request(internal_id(rid)), keys.events(internal_id(rid))):
            assert key not in owned, (key, rid, owned.get(key))
            owned[key] = rid
    assert {k for k in owned if rdb.exists(k)} == set(owned)
    ours = {internal_id(rid) for rid in ids}
    in_redis = {k.decode() for k in rdb.scan_iter("glm:req:*")}
    assert {k for k in in_redis if unquote(k.split(":")[2]) in ours} == set(owned)   # nothing else
    assert {rdb.type(k).decode() for k in owned if k.endswith(":events")} == {"stream"}
    assert not any(rdb.exists(keys.cancel(internal_id(rid))) for rid in ids)


# ---- capacity ------------------------------------------------------------------------------

async def _held_streams(client, ids):
    """Streams opened for ``ids`` and left waiting for their events (tasks)."""
    async def stream(rid):
        return [m async for m in client.generate_stream("Say [MASK]", request_id=rid)]
    return [asyncio.ensure_future(stream(rid)) for rid in ids]


async def _until(predicate):
    end = asyncio.get_running_loop().time() + HANG_S
    while not predicate():
        assert asyncio.get_running_loop().time() < end, "not within HANG_S: a hang"
        await asyncio.sleep(0.02)


def _finish(rdb, rid) -> None:
    """Write the final event of ``rid``'s request, as its pool would."""
    rdb.xadd(keys.events(internal_id(rid)), {keys.FIELD: Event(EVENT_FINAL, 0, finish_reason="length").to_json()})


def test_calls_above_the_limit_are_resource_exhausted_and_health_stays_serving(start, rdb):
    gateway = start(max_concurrent_calls=4)   # no pool: the streams wait for events we write
    queue = keys.queue(gateway.model)
    heartbeat = keys.pool(f"cap-{gateway.model}")             # a live pool, as far as health can tell
    rdb.hset(heartbeat, mapping={"model": gateway.model})
    rdb.expire(heartbeat, 600)
    assert wait_for(lambda: health_status(gateway.address, "glm.v1.TextGeneration") ==
                    health_pb2.HealthCheckResponse.SERVING)
    ids = [f"cap-{i}-{gateway.model}" for i in range(4)]
    assert gateway.gateway._broker.redis.connection_pool.max_connections == pool_size(4)

    async def main():
        async with AsyncGLMClient(gateway.address, timeout=CALL_S) as client:
            held = await _held_streams(client, ids)
            await _until(lambda: rdb.xlen(queue) == 4)      # all four admitted and enqueued
            refused = []
            for call in (lambda: client.generate("Say [MASK]", request_id="cap-5"),
                         lambda: _drain(client.generate_stream("Say [MASK]", request_id="cap-5"))):
                with pytest.raises(GLMError) as info:
                    await call()
                refused.append(info.value)
            statuses = [health_status(gateway.address, s) for s in ("", "glm.v1.TextGeneration")]
            _finish(rdb, ids[0])
            first = await held[0]                           # its call has ended: a slot is free
            _finish(rdb, "cap-6")
            accepted = await client.generate("Say [MASK]", request_id="cap-6")
            for rid in ids[1:]:
                _finish(rdb, rid)
            rest = [await task for task in held[1:]]
            return refused, statuses, first, accepted, rest

    refused, statuses, first, accepted, rest = asyncio.run(main())
    for error in refused:
        assert error.code == Code.RESOURCE_EXHAUSTED
        assert error.details.startswith("gateway at its limit of 4 concurrent calls"), error.details
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert not rdb.exists(keys.request(internal_id("cap-5")))   # refused before any Redis command
    assert first[-1].finish_reason == "length" and accepted.finish_reason == "length"
    assert [r[-1].finish_reason for r in rest] == ["length"] * 3


async def _drain(stream):
    return [m async for m in stream]


def test_more_calls_than_a_fixed_pool_of_100_all_succeed(start, rdb):
    """128 streams waiting on blocking XREADs at once: every one is served, health stays
    SERVING (the Redis pool is sized from the limit, not redis-py's default of 100)."""
    gateway = start(max_concurrent_calls=128)
    queue = keys.queue(gateway.model)
    ids = [f"many-{i}-{gateway.model}" for i in range(128)]

    async def main():
        async with AsyncGLMClient(gateway.address, timeout=CALL_S) as client:
            held = await _held_streams(client, ids)
            await _until(lambda: rdb.xlen(queue) == len(ids) or any(t.done() for t in held))
            status = health_status(gateway.address)
            for rid in ids:
                _finish(rdb, rid)
            return status, await asyncio.gather(*held, return_exceptions=True)

    status, results = asyncio.run(main())
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(r[-1].finish_reason == "length" for r in results)
    assert status == health_pb2.HealthCheckResponse.SERVING
