"""Real worker processes: a TP=2 pool over gloo, driven over gRPC with ``ShardClient``.

Tokens equal ``Generator`` (what ``glm generate`` runs) per request through joins
and leaves, the ranks provably apply the same tokens, Warmup's capacity follows
``--kv-memory-gib`` and an over-capacity Prefill is refused, malformed calls get
INVALID_ARGUMENT, per-layer spans of every layer of every rank arrive over OTLP
joined to the caller's trace, and a killed or stuck rank fails the pool: a dead
peer is noticed (UNAVAILABLE, not a deadline waited out), a stuck one is declared
broken by the collective timeout, never before it. Pools start once per module.
Waits are for events, bounded by ``HANG_S``, which only a hang reaches."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from model.runner import load_model
from services.common.tracing import setup_tracing
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.client import ShardCallError, ShardClient
from services.worker.kv_budget import GIB
from services.worker.pool import start_pool
from tests.worker_cases import PROMPTS, SAMPLED, Tokens, mixed_batch, reference, request

pytestmark = [pytest.mark.processes, pytest.mark.slow]
KV_GIB = 0.002
HANG_S = 60.0
COLLECTIVE_TIMEOUT_S = 4.0
NUM_LAYERS = 2


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans, self.lock = [], threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                rank = next(a.value.int_value for a in rs.resource.attributes if a.key == "glm.rank")
                for ss in rs.scope_spans:
                    self.spans.extend((rank, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    rec = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rec.endpoint = f"127.0.0.1:{port}"
    yield rec
    server.stop(0)


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=11)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


@pytest.fixture(scope="module")
def pool(ckpt, receiver):
    handle = start_pool(ckpt, 2, dtype="float32", kv_memory_gib=KV_GIB, layer_trace_ratio=1.0, otlp_endpoint=receiver.endpoint)
    asyncio.run(_warmup(handle.addresses))
    yield handle
    handle.stop()


async def _warmup(addresses):
    async with ShardClient(addresses, timeout_s=60) as c:
        return await c.warmup(2, 16, 48)


def drive(addresses, scenario, timeout_s: float = 60.0):
    async def main():
        async with ShardClient(addresses, timeout_s=timeout_s) as client:
            return await scenario(client)
    return asyncio.run(main())


def test_info_and_warmup_capacity(pool):
    info = drive(pool.addresses, lambda c: c.call_all("Info", pb.InfoRequest()))
    assert [i.rank for i in info] == [0, 1] and {i.tp_size for i in info} == {2}
    assert info[0].config.num_layers == NUM_LAYERS and info[0].dtype == "float32"
    assert info[0].quantization == "none" and info[0].device == "cpu"
    per_token = 2 * NUM_LAYERS * (64 // 2) * 4
    assert info[0].kv_bytes_per_token == per_token
    warm = asyncio.run(_warmup(pool.addresses))
    blocks = int(KV_GIB * GIB) // (per_token * warm.kv_block_size)            # the paged pool, whole blocks
    assert warm.kv_block_size == 16 and warm.kv_blocks == blocks
    assert warm.max_batch_total_tokens == blocks * 16 == info[0].max_batch_total_tokens


def test_mixed_batch_equals_generate_and_ranks_agree(pool, model):
    batch = mixed_batch(1)

    async def scenario(c):
        tokens, digests = Tokens(), []
        replies = await c.call_all("Prefill", pb.PrefillRequest(batch=batch))
        assert replies[1].generations == [] and replies[0].batch == replies[1].batch
        cached = tokens.add(replies[0])
        while cached is not None:
            replies = await c.call_all("Decode", pb.DecodeRequest(batches=[cached]))
            assert replies[1].generations == [] and replies[0].batch == replies[1].batch
            cached = tokens.add(replies[0])
        digests = [h.token_digest for h in await c.health()]
        return tokens, digests

    tokens, digests = drive(pool.addresses, scenario)
    for req in batch.requests:
        assert tokens.ids[req.id] == reference(model, req), req.id
    assert digests[0] == digests[1]


def test_requests_join_and_leave_between_steps(pool, model):
    a = pb.Batch(id=10, requests=[request(11, PROMPTS["mask"], 8), request(12, PROMPTS["long_gmask"], 8),
                                  request(13, PROMPTS["gmask"], 8, **SAMPLED)])
    b = pb.Batch(id=20, requests=[request(21, PROMPTS["mid_mask"], 6), request(22, PROMPTS["gmask"], 7)])

    async def scenario(c):
        tokens = Tokens()
        running = tokens.add(await c.prefill(a))
        running = tokens.add(await c.decode([running]))
        new = tokens.add(await c.prefill(b))
        running = tokens.add(await c.decode([running, new]))
        assert list(running.request_ids) == [11, 12, 13, 21, 22]
        running = (await c.filter_batch(running.id, [11, 13, 21, 22])).batch
        while running.size:
            reply = await c.decode([running])
            running = tokens.add(reply)
            if running is None:
                break
        health = await c.health()
        return tokens, health

    tokens, health = drive(pool.addresses, scenario)
    for req in [*a.requests, *b.requests]:
        want, got = reference(model, req), tokens.ids[req.id]
        assert got == (want[:3] if req.id == 12 else want), req.id      # 12 left after 3 tokens
    assert health[0].token_digest == health[1].token_digest and health[0].cached_batches == 0


def test_steps_sent_ahead_run_in_their_order_and_skip_an_emptied_batch(pool, model):
    """A Decode sent ahead (step 2) that reaches the ranks before the one it follows (step 1)
    waits for it; the following ones chain on the batch each returns, the rows that finished
    leave, and the one after the last row finished gets an empty reply. Every request gets
    the tokens of ``Generator``."""
    a = pb.Batch(id=30, requests=[request(31, PROMPTS["mask"], 3), request(32, PROMPTS["gmask"], 5),
                                  request(33, PROMPTS["mid_mask"], 4, **SAMPLED)])

    async def scenario(c):
        tokens = Tokens()
        await c.clear_cache()                                  # a new caller numbers its steps from 1
        running = tokens.add(await c.prefill(a))
        ahead = asyncio.ensure_future(c.decode([pb.CachedBatch(id=running.id)], step=2, ahead=True))
        await asyncio.sleep(0.3)                               # on the ranks first, it waits there
        assert not ahead.done()
        replies = [await c.decode([running], step=1)]
        step = 2
        while True:
            following = asyncio.ensure_future(c.decode([pb.CachedBatch(id=running.id)], step=step + 1, ahead=True))
            replies.append(await ahead)
            ahead, step = following, step + 1
            if not replies[-1].HasField("batch"):
                break
        replies.append(await ahead)
        for reply in replies:
            tokens.add(reply)
        refused = None
        try:
            await c.decode([pb.CachedBatch(id=running.id)], step=step + 2, ahead=True, admit=a)
        except ShardCallError as exc:
            refused = exc
        return tokens, replies, refused, await c.health()

    tokens, replies, refused, health = drive(pool.addresses, scenario)
    for req in a.requests:
        assert tokens.ids[req.id] == reference(model, req), req.id
    assert [len(r.generations) for r in replies] == [3, 3, 2, 1, 0]     # rows leave at 3, 4 and 5 tokens
    assert not replies[-1].HasField("batch") and not replies[-2].HasField("batch") and replies[-1].total_ns
    assert refused is not None and refused.code == grpc.StatusCode.INVALID_ARGUMENT and "ahead" in refused.details
    assert health[0].token_digest == health[1].token_digest and health[0].cached_batches == 0


def test_over_capacity_prefill_is_refused(pool):
    def long(i):                                                        # 300 tokens + sop: 19 blocks
        return [20000 + (i + j) % 300 for j in range(299)] + [150001]    # distinct: no prompt shared

    big = pb.Batch(id=30, requests=[request(i, long(i), 8) for i in range(31, 51)])   # 380 blocks > 262

    async def scenario(c):
        with pytest.raises(ShardCallError) as err:
            await c.prefill(big)
        health = await c.health()                       # the pool still serves
        return err.value, health

    err, health = drive(pool.addresses, scenario)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the step needs 380 blocks" in err.details
    assert all(h.cached_batches == 0 for h in health)


@pytest.mark.parametrize("method, req, message", [
    ("Decode", pb.DecodeRequest(batches=[pb.CachedBatch(id=999)]), "unknown batch id 999"),
    ("FilterBatch", pb.FilterBatchRequest(batch_id=999), "unknown batch id 999"),
    ("Prefill", pb.PrefillRequest(batch=pb.Batch(id=40)), "empty batch"),
    ("Prefill", pb.PrefillRequest(batch=pb.Batch(id=40, requests=[request(41, [20100, 20200])])), "no mask id"),
    ("Prefill", pb.PrefillRequest(batch=pb.Batch(id=40, requests=[request(41, [200000, 150001])])),
     "outside the vocabulary"),
    ("Prefill", pb.PrefillRequest(batch=pb.Batch(id=40, requests=[request(41, [20100] * 600 + [150001])])),
     "too long"),
    ("Prefill", pb.PrefillRequest(batch=pb.Batch(id=40, requests=[request(41, PROMPTS["gmask"], top_p=2.0)])),
     "top_p"),
])
def test_malformed_calls_get_invalid_argument(pool, method, req, message):
    async def scenario(c):
        with pytest.raises(ShardCallError) as err:
            await c.call(method, req)
        await c.health()
        return err.value

    err = drive(pool.addresses, scenario)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and message in err.details


def test_layer_spans_of_every_rank_join_the_callers_trace(pool, receiver):
    tracer = setup_tracing("test-caller").get_tracer("test")

    async def scenario(c):
        with tracer.start_as_current_span("scheduler.prefill") as span:
            reply = await c.prefill(pb.Batch(id=50, requests=[request(51, PROMPTS["mask"], 2)]))
            await c.decode([reply.batch])
        return span.get_span_context().trace_id

    trace_id = drive(pool.addresses, scenario).to_bytes(16, "big")
    deadline = time.monotonic() + HANG_S      # the batch exporters send when they will: wait for it
    while True:
        with receiver.lock:
            spans = [(r, s) for r, s in receiver.spans if s.trace_id == trace_id]
        forwards = {(r, s.name): s for r, s in spans if s.name in ("worker.prefill", "worker.decode")}
        layers = [(r, s) for r, s in spans if s.name == "worker.layer"]
        if len(forwards) == 4 and len(layers) == 4 * NUM_LAYERS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(forwards) == [(r, n) for r in (0, 1) for n in ("worker.decode", "worker.prefill")]
    for rank in (0, 1):
        for name in ("worker.prefill", "worker.decode"):
            parent = forwards[(rank, name)]
            children = [s for r, s in layers if r == rank and s.parent_span_id == parent.span_id]
            layer_ids = sorted(next(a.value.int_value for a in s.attributes if a.key == "glm.layer")
                               for s in children)
            assert layer_ids == list(range(NUM_LAYERS)), (rank, name)
            assert all(parent.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano
                       <= parent.end_time_unix_nano for s in children)


def doomed_pool(ckpt):
    handle = start_pool(ckpt, 2, dtype="float32", kv_memory_gib=KV_GIB, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    asyncio.run(_warmup(handle.addresses))
    return handle


async def _rank0_broken(addresses, since: float, bound_s: float) -> ShardCallError:
    """Poll rank 0's Health until it reports itself broken (UNAVAILABLE); ``bound_s``
    after ``since`` only bounds a hang. A Health call that is merely slow (its own
    deadline passed on a busy machine) is not an answer: poll again."""
    async with ShardClient(addresses[:1], timeout_s=10.0) as rank0:
        while True:
            try:
                await rank0.health()
            except ShardCallError as exc:
                if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    return exc
            assert time.monotonic() - since < bound_s, "rank 0 never reported its failed peer"
            await asyncio.sleep(0.1)


def test_killed_rank_fails_the_pool_in_bounded_time(ckpt):
    pool = doomed_pool(ckpt)
    try:
        async def scenario(c):
            running = (await c.prefill(pb.Batch(id=60, requests=[request(61, PROMPTS["mask"], 40)]))).batch
            os.kill(pool.processes[1].pid, signal.SIGKILL)
            pool.processes[1].wait(timeout=HANG_S)
            t0 = time.monotonic()
            with pytest.raises(ShardCallError) as dead:
                await c.decode([running], timeout_s=HANG_S)
            # A rank that had already been sent the step fails in its collective, then stays broken.
            async with ShardClient(pool.addresses[:1], timeout_s=30.0) as rank0:
                with pytest.raises(ShardCallError) as failed:
                    await rank0.decode([running])
            assert failed.value.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE), failed.value
            assert "Connection closed by peer" in failed.value.details
            broken = await _rank0_broken(pool.addresses, t0, HANG_S)
            return dead.value, broken

        dead, broken = drive(pool.addresses, scenario)
        # UNAVAILABLE from rank 1, not DEADLINE_EXCEEDED: the dead peer is noticed, not
        # waited out; and rank 0's collective failed on the closed connection ("Connection
        # closed by peer" above), not on its timeout. No clock is read.
        assert dead.code == grpc.StatusCode.UNAVAILABLE and dead.rank == 1
        assert broken.code == grpc.StatusCode.UNAVAILABLE and "broken" in broken.details
        assert pool.dead_ranks() == [1] and pool.processes[0].poll() is None
    finally:
        pool.stop(grace_s=1.0)


def test_stuck_rank_hits_the_deadline_then_the_collective_timeout(ckpt):
    pool = doomed_pool(ckpt)
    try:
        async def scenario(c):
            running = (await c.prefill(pb.Batch(id=60, requests=[request(61, PROMPTS["mask"], 40)]))).batch
            os.kill(pool.processes[1].pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(ShardCallError) as err:
                await c.decode([running], timeout_s=2.0)
            broken = await _rank0_broken(pool.addresses, t0, COLLECTIVE_TIMEOUT_S + HANG_S)
            return err.value, broken, time.monotonic() - t0

        err, broken, broken_s = drive(pool.addresses, scenario)
        # The caller's deadline is honoured (its code says so). Rank 0 waits out the whole
        # collective timeout before it declares itself broken: it entered the collective
        # after t0, so a busy machine can only make broken_s longer; the upper bound only
        # catches a hang.
        assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert broken.code == grpc.StatusCode.UNAVAILABLE and "Timed out" in broken.details
        assert COLLECTIVE_TIMEOUT_S - 1 < broken_s < COLLECTIVE_TIMEOUT_S + HANG_S
    finally:
        os.kill(pool.processes[1].pid, signal.SIGCONT)
        pool.stop(grace_s=1.0)
