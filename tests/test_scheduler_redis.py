"""The scheduler end to end with the real Redis and a real TP=1 worker pool (TP=2 for the
steps sent ahead of their replies): requests XADDed as the gateway would are served with
continuous batching and equal
``Generator`` (what ``glm generate --greedy`` runs); cancellation, several blanks,
stop texts, resuming a dead pool's half-done request from its events, poison
requests (dead letter + error event), a missing worker failing the pool, and the
spans (request spans under the caller's trace, step spans linked to them).

Every verdict is on events, spans or step numbers the loop records; the only
clock is ``HANG_S``, a bound on waiting for an event that only catches a hang."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model.config import GMASK_ID, MASK_ID
from model.generation import GenerationOptions, Generator
from model.prompt import prepare_text_ids
from model.runner import load_model
from model.sampling import SamplingParams
from model.tokenizer import GLMTokenizer
from services.common import redis_keys as keys
from services.common.messages import Event, QueuedRequest, Sampling
from services.common.tracing import setup_tracing
from services.scheduler.loop import LoopOptions, PoolFailure, PoolLoop
from services.scheduler.policy import Limits
from services.worker.client import ShardClient
from services.worker.pool import start_pool
from redis_harness import url

pytestmark = [pytest.mark.redis, pytest.mark.processes, pytest.mark.slow]
REDIS_URL = url(__name__)             # this module's own database (tests/redis_harness.py)
GREEDY = Sampling(temperature=0.0, seed=7)
HANG_S = 60.0                 # waits for an event give up after this: a hang, never a verdict on speed


@pytest.fixture(scope="module", autouse=True)
def _database(redis_db):
    """Flushed before and after the module; every test skipped when no Redis answers."""
    return redis_db


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=3)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return GLMTokenizer.from_file(f"{ckpt}/ice_text.model")


@pytest.fixture(scope="module")
def pool(ckpt):
    handle = start_pool(ckpt, 1, dtype="float32", kv_memory_gib=0.002)
    yield handle
    handle.stop()


def reference(model, tokenizer, ids, max_new):
    """``glm generate --greedy`` on these ids, every blank filled."""
    result = Generator(model).fill_blanks(list(ids), SamplingParams(greedy=True),
                                          GenerationOptions(max_new_tokens=max_new))
    out = list(result.output_ids)
    if out and out[-1] == tokenizer.eos_id:
        out = out[:-1]
    return ([b.token_ids for b in result.blanks], [tokenizer.decode(b.content_ids, strict=False) for b in result.blanks],
            tokenizer.decode(out, strict=False))


class Harness:
    """One scheduler (in this process) on a private model name; cleans its keys up."""

    def __init__(self, pool, tokenizer, **overrides) -> None:
        tag = uuid.uuid4().hex[:8]
        self.model = f"test-sched-{tag}"
        self.exporter = InMemorySpanExporter()
        self.provider = setup_tracing("glm-scheduler-test", exporter=self.exporter)
        limits = overrides.pop("limits", Limits(max_batch_size=4, max_input_tokens=64, max_total_tokens=128))
        options = LoopOptions(redis_url=REDIS_URL, model=self.model, workers=tuple(overrides.pop("workers", pool.addresses)),
                              pool_id=f"pool-{tag}", limits=limits, idle_block_ms=20, shard_timeout_s=30,
                              **overrides)
        self.loop = PoolLoop(options, decode=lambda ids: tokenizer.decode(ids, strict=False),
                             max_sequence_length=512, tracer=self.provider.get_tracer("test"))
        self.redis = aioredis.from_url(REDIS_URL)
        self.ids: list[str] = []
        self.task = None

    def request(self, ids, max_new=8, **kw) -> QueuedRequest:
        rid = f"{self.model}-{len(self.ids)}"
        self.ids.append(rid)
        return QueuedRequest(id=rid, model=self.model, prompt_ids=tuple(ids), sampling=kw.pop("sampling", GREEDY),
                             max_new_tokens=max_new, **kw)

    async def submit(self, req: QueuedRequest) -> str:
        return (await self.redis.xadd(keys.queue(self.model), {keys.FIELD: req.to_json()})).decode()

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.loop.run())

    async def events(self, rid: str, timeout_s: float = HANG_S) -> list[Event]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = await self.redis.xrange(keys.events(rid))
            events = [Event.from_json(f[b"d"]) for _, f in rows]
            if events and events[-1].terminal:
                return events
            if self.task is not None and self.task.done():
                self.task.result()
            await asyncio.sleep(0.02)
        raise AssertionError(f"no terminal event for {rid} within {timeout_s} s")

    async def wait_idle(self, entry_id: str, idle_ms: int) -> None:
        """Wait until Redis reports the pending entry idle for longer than ``idle_ms``: the
        condition under which XAUTOCLAIM hands it to another pool."""
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            rows = await self.redis.xpending_range(keys.queue(self.model), keys.GROUP, min=entry_id,
                                                   max=entry_id, count=1)
            if rows and rows[0]["time_since_delivered"] > idle_ms:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"entry {entry_id} never became idle for {idle_ms} ms")

    async def close(self) -> None:
        if self.task is not None:
            self.loop.stop()
            try:
                await asyncio.wait_for(self.task, 30)
            except PoolFailure:
                pass
        names = [keys.queue(self.model), keys.dead_letter(self.model)]
        for rid in self.ids:
            names += [keys.events(rid), keys.cancel(rid), keys.request(rid)]
        await self.redis.delete(*names)
        await self.redis.aclose()


def scenario(pool, tokenizer, body, **overrides):
    async def main():
        h = Harness(pool, tokenizer, **overrides)
        try:
            return await body(h)
        finally:
            await h.close()
    return asyncio.run(main())


def tokens_of(events: list[Event]) -> list[list[int]]:
    blanks: list[list[int]] = []
    for e in events:
        if e.type == "tokens":
            while len(blanks) <= e.blank:
                blanks.append([])
            blanks[e.blank] += list(e.token_ids)
    return blanks


def check_stream(events: list[Event]) -> None:
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].terminal and not any(e.terminal for e in events[:-1])


# -- the tests ------------------------------------------------------------------------------
def test_concurrent_greedy_requests_equal_generate(pool, model, tokenizer):
    prompts = [prepare_text_ids(tokenizer.tokenize("The capital of France is")),
               prepare_text_ids(tokenizer.tokenize("Hello [MASK] world, how are you")),
               [20100, 20200, 20300, 20400, 20500, 20600, 20700, GMASK_ID],
               prepare_text_ids(tokenizer.tokenize("我们"))]
    max_new = [12, 9, 14, 6]
    parent = setup_tracing("test-caller").get_tracer("test").start_span("gateway.generate")
    traceparent = "00-%032x-%016x-01" % (parent.get_span_context().trace_id, parent.get_span_context().span_id)

    async def body(h):
        reqs = [h.request(p, n, traceparent=traceparent) for p, n in zip(prompts, max_new)]
        for r in reqs:
            await h.submit(r)
        h.start()
        return reqs, [await h.events(r.id) for r in reqs], h.exporter

    reqs, streams, exporter = scenario(pool, tokenizer, body)
    for prompt, n, events in zip(prompts, max_new, streams):
        check_stream(events)
        want_ids, want_blanks, want_output = reference(model, tokenizer, prompt, n)
        assert tokens_of(events) == want_ids
        final = events[-1]
        assert list(final.blanks) == want_blanks and final.output_text == want_output
        assert "".join(e.text for e in events if e.type == "tokens") == final.text == "".join(want_blanks)
        assert final.generated_tokens == sum(map(len, want_ids)) and final.seed == 7
    spans = exporter.get_finished_spans()
    requests = {s.attributes["glm.request_id"]: s for s in spans if s.name == "scheduler.request"}
    assert set(requests) == {r.id for r in reqs}
    assert all(s.parent.span_id == parent.get_span_context().span_id for s in requests.values())
    decodes = [s for s in spans if s.name == "scheduler.decode"]
    assert max(s.attributes["glm.batch_size"] for s in decodes) >= 3           # batched, not one by one
    linked = {l.context.span_id for s in decodes for l in s.links}
    assert linked == {s.context.span_id for s in requests.values()}
    assert any(s.name == "scheduler.prefill" and len(s.links) >= 3 for s in spans)
    # the linking rule: a step serving one request is its child, one serving several is a root
    for step in (s for s in spans if s.name in ("scheduler.prefill", "scheduler.decode")):
        if len(step.links) == 1:
            assert step.parent.span_id == step.links[0].context.span_id
        else:
            assert step.parent is None and step.context.trace_id != parent.get_span_context().trace_id


@pytest.fixture(scope="module")
def pool_tp2(ckpt):
    handle = start_pool(ckpt, 2, dtype="float32", kv_memory_gib=0.002)
    yield handle
    handle.stop()


def test_steps_sent_ahead_over_two_ranks_equal_generate(pool_tp2, model, tokenizer):
    """Over a TP=2 pool most Decodes go out before the reply of the one running; both ranks
    run them in their order: every request gets ``Generator``'s tokens and the ranks' token
    digests agree."""
    prompts = [prepare_text_ids(tokenizer.tokenize("The capital of France is")),
               [20100, 20200, 20300, 20400, GMASK_ID], prepare_text_ids(tokenizer.tokenize("我们"))]
    max_new = [14, 11, 6]

    async def body(h):
        reqs = [h.request(p, n) for p, n in zip(prompts, max_new)]
        for r in reqs:
            await h.submit(r)
        h.start()
        streams = [await h.events(r.id) for r in reqs]
        async with ShardClient(pool_tp2.addresses, timeout_s=30) as client:
            health = await client.health()
        return streams, dict(h.loop.counters), health

    streams, counters, health = scenario(pool_tp2, tokenizer, body)
    for prompt, n, events in zip(prompts, max_new, streams):
        check_stream(events)
        assert tokens_of(events) == reference(model, tokenizer, prompt, n)[0]
    assert counters["ahead_steps"] >= 5 and counters["ahead_steps"] < counters["decode_steps"]
    assert health[0].token_digest == health[1].token_digest


def test_cancelled_request_leaves_within_a_step(pool, tokenizer):
    """The loop reads the cancel flags before it plans a step, so once it has read a
    request's flag no step runs with it: the next plan ends it. Counted in the loop's
    step numbers from the moment it read the flag (``CancelMark``), never in time."""
    async def body(h):
        long = h.request([20100, 20200, GMASK_ID], 120)
        other = h.request([20300, GMASK_ID], 120)

        async def cancel_after_the_first_step(steps_done: int) -> None:
            if steps_done == 1:                     # at a step boundary: the next flag read sees it
                await h.redis.set(keys.cancel(long.id), b"1", ex=60)

        h.loop.after_step = cancel_after_the_first_step
        await h.submit(long)
        await h.submit(other)
        h.start()
        events = await h.events(long.id)
        await h.redis.set(keys.cancel(other.id), b"1", ex=60)
        await h.events(other.id)
        return long.id, events, {m.request_id: m for m in h.loop.cancel_marks}

    rid, events, marks = scenario(pool, tokenizer, body)
    check_stream(events)
    assert events[-1].type == "final" and events[-1].finish_reason == "cancelled"
    assert marks[rid].seen_before_step == 1                  # read right after the step that set it
    assert marks[rid].left_in_step == marks[rid].seen_before_step
    # only the first step (its prefill and one decode) generated for it: 2 tokens, far from 120
    assert sum(len(e.token_ids) for e in events if e.type == "tokens") <= 2
    assert events[-1].generated_tokens <= 2


def test_multi_blank_request_filled_in_order(pool, model, tokenizer):
    prompt = [20100, MASK_ID, 20200, 20300, MASK_ID, 20400, 20002]

    async def body(h):
        req = h.request(prompt, 5)
        await h.submit(req)
        h.start()
        return await h.events(req.id)

    events = scenario(pool, tokenizer, body)
    check_stream(events)
    want_ids, want_blanks, want_output = reference(model, tokenizer, prompt, 5)
    assert len(want_ids) == 2 and tokens_of(events) == want_ids
    assert [e.blank for e in events if e.type == "blank"] == [0, 1]
    assert list(events[-1].blanks) == want_blanks and events[-1].output_text == want_output


def test_stop_sequence_ends_the_blank_before_it(pool, model, tokenizer):
    prompt = [20100, 20200, 20300, GMASK_ID]
    _, [full], _ = reference(model, tokenizer, prompt, 16)
    assert len(full) >= 6, full
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = full.index(stop)

    async def body(h):
        req = h.request(prompt, 16, stop=(stop,))
        await h.submit(req)
        h.start()
        return await h.events(req.id)

    events = scenario(pool, tokenizer, body)
    check_stream(events)
    final = events[-1]
    assert final.finish_reason == "stop" and final.stop_sequence == stop
    assert final.text == full[:cut] == "".join(e.text for e in events if e.type == "tokens")


def test_resume_continues_a_dead_pools_request(pool, model, tokenizer):
    prompt = [20100, 20200, 20300, 20400, GMASK_ID]

    async def body(h):
        whole = h.request(prompt, 14)
        await h.submit(whole)
        h.start()
        full = await h.events(whole.id)
        h.loop.stop()
        await asyncio.wait_for(h.task, 30)
        return full

    full = scenario(pool, tokenizer, body)
    assert len(full) >= 5
    published = full[: len(full) // 2]

    async def body2(h):
        req = h.request(prompt, 14)
        for e in published:                                  # what the dead pool had published
            await h.redis.xadd(keys.events(req.id), {keys.FIELD: e.to_json()})
        entry = await h.submit(req)
        await h.redis.xgroup_create(keys.queue(h.model), keys.GROUP, id="0", mkstream=True)
        await h.redis.xreadgroup(keys.GROUP, "dead-pool", {keys.queue(h.model): ">"}, count=1)
        await h.wait_idle(entry, 300)                        # the dead pool never refreshes it
        h.start()
        events = await h.events(req.id)
        pending = await h.redis.xpending(keys.queue(h.model), keys.GROUP)
        return events, pending

    events, pending = scenario(pool, tokenizer, body2, claim_idle_ms=300)
    assert events[len(published)].seq == len(published)
    assert [e.to_json() for e in events] == [e.to_json() for e in full]
    assert pending["pending"] == 0


def test_poison_requests_are_dead_lettered_with_an_error(pool, tokenizer):
    async def body(h):
        good = h.request([20100, 20200, GMASK_ID], 4)
        bad = h.request([200000, 20100, GMASK_ID], 4)             # outside the vocabulary: workers reject it
        good2 = h.request([20400, 20500, GMASK_ID], 4)
        again = h.request([20300, GMASK_ID], 4)                   # a pool died with it, too many times
        await h.redis.xgroup_create(keys.queue(h.model), keys.GROUP, id="0", mkstream=True)
        entry = await h.submit(again)
        await h.redis.xreadgroup(keys.GROUP, "dead-pool", {keys.queue(h.model): ">"}, count=1)
        for _ in range(keys.MAX_DELIVERIES):
            await h.redis.xclaim(keys.queue(h.model), keys.GROUP, "dead-pool", 0, [entry])
        for r in (good, bad, good2):
            await h.submit(r)
        await h.wait_idle(entry, 300)
        h.start()
        out = [await h.events(r.id) for r in (bad, good, good2, again)]
        dead = [json.loads(f[b"d"]) for _, f in await h.redis.xrange(keys.dead_letter(h.model))]
        pending = await h.redis.xpending(keys.queue(h.model), keys.GROUP)
        prefills = sorted((s for s in h.exporter.get_finished_spans() if s.name == "scheduler.prefill"),
                          key=lambda s: s.start_time)
        return out, dead, pending, (bad.id, again.id), [s.attributes["glm.batch_size"] for s in prefills]

    (bad, good, good2, again), dead, pending, ids, prefills = scenario(pool, tokenizer, body, claim_idle_ms=300)
    assert bad[-1].type == "error" and bad[-1].code == "INVALID_ARGUMENT" and "vocabulary" in bad[-1].message
    assert good[-1].type == "final" and good2[-1].type == "final"
    # the workers named the bad request (trailing metadata): the other two retried together,
    # not one by one as when a refusal names nobody
    assert prefills == [3, 2]
    assert again[-1].type == "error" and "delivered" in again[-1].message
    assert sorted(d["request_id"] for d in dead) == sorted(ids) and all(d["reason"] and d["request"] for d in dead)
    assert pending["pending"] == 0


def test_missing_worker_fails_the_pool_loudly(pool, tokenizer):
    """Warmup has a deadline, so a pool without its worker raises ``PoolFailure`` instead of
    waiting forever (``HANG_S`` only bounds a hang; the warmup deadline is 3 s)."""
    async def body(h):
        with pytest.raises(PoolFailure) as failure:
            await asyncio.wait_for(h.loop.run(), HANG_S)
        return str(failure.value)

    message = scenario(pool, tokenizer, body, workers=["unix:///tmp/glm-no-such-worker.sock"],
                       warmup_timeout_s=3.0)
    assert message.startswith("warmup failed: rank 0 Warmup: ")
    assert "UNAVAILABLE" in message or "DEADLINE_EXCEEDED" in message


BLOCK_BYTES = 16 * 2 * 2 * 64 * 4        # one 16-token block of glm-tiny (2 layers, hidden 64) in fp32


@pytest.fixture(scope="module")
def small_pool(ckpt):
    """A pool whose paged KV holds 9 blocks (144 tokens): four requests outgrow it."""
    handle = start_pool(ckpt, 1, dtype="float32", kv_memory_gib=9 * BLOCK_BYTES / 2**30)
    yield handle
    handle.stop()


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=23)])
def test_preempted_requests_end_with_the_uninterrupted_tokens(small_pool, model, tokenizer, sampling):
    """Four requests that together outgrow the pool's blocks: the scheduler preempts the newest
    rows (their blocks are freed), resumes them later from what they generated, and every
    request ends with exactly ``glm generate``'s tokens (greedy, and seeded sampling)."""
    prompts = [[20100 + 7 * i + j for j in range(12 + 3 * i)] + [GMASK_ID] for i in range(4)]
    max_new = 40

    async def body(h):
        reqs = [h.request(p, max_new, sampling=sampling) for p in prompts]
        for r in reqs:
            await h.submit(r)
        h.start()
        return [await h.events(r.id) for r in reqs], h.loop.core.preempted

    streams, preempted = scenario(small_pool, tokenizer, body,
                                  limits=Limits(max_batch_size=4, max_input_tokens=64, max_total_tokens=128))
    assert preempted >= 1
    params = SamplingParams(greedy=True) if sampling.greedy else SamplingParams(
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed)
    for prompt, events in zip(prompts, streams):
        check_stream(events)
        want = Generator(model).fill_blanks(list(prompt), params, GenerationOptions(max_new_tokens=max_new))
        assert tokens_of(events) == [b.token_ids for b in want.blanks]
