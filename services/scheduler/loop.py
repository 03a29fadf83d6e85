"""One pool's asyncio loop (``docs/architecture.md``, "Scheduler"): Redis and the
workers around the pure core (``policy.Scheduler``, used through its public methods).

Per step: the held requests' cancel keys (one MGET) and admission (XREADGROUP only
as far as the budget reaches, a short BLOCK when idle), in one round trip; then the
step's shard calls (``services.scheduler.steps``: FilterBatch; over paged workers one
Decode that also admits the new phases, over dense ones a Prefill then a Decode of the
running + new batches). The step's events (and the previous step's)
wait in the outbox; one flusher task publishes them, in one script call, while
the next Decode runs (``outbox.Flusher``), so the workers do not wait on Redis;
when there is no next Decode they are published at once. Over paged workers the next
Decode is often sent ahead, before the reply of the one running (``steps``: the workers
never wait on this loop), so the poll and the events run while they compute. The cancel
keys are read before the step is planned, so once a request's flag was read no step is
sent with it: the next plan ends it (``PoolLoop.cancel_marks`` records both step numbers);
only a step sent ahead before the read still runs with it. Between steps,
on timers: XAUTOCLAIM a dead pool's entries and resume them from their events,
the heartbeat hash, a Health call while idle.

Leases: a separate task re-claims the held entries every ``refresh_s`` whatever a
step takes (the shard calls are asynchronous gRPC: the event loop runs it during a
Decode), so another pool takes an entry only once its lease expired unrefreshed,
and only that counts as a delivery toward the dead-letter limit. A pool that finds
an entry taken (by the refresh, or the publish script, which writes only for
entries still pending under this pool) drops the request and publishes nothing
more for it: exactly one final event per stream.

Redis failures (``queue.transient``) never end the loop: events wait in order in
an ``Outbox``, retried with capped exponential backoff, while the running
requests keep decoding; no new entry is read meanwhile; on recovery the group is
re-created if the server lost it and this pool's pending entries are re-read.

A worker failure (any shard error but a request the workers reject) fails the
pool loudly: ``PoolFailure`` is raised, nothing is acked, the entries stay
pending for another pool. Every shard call has a deadline, so it never hangs. A
refused Prefill names the request at fault by its id
(``ShardCallError.refused_request_id``), never in words.

Tracing: one ``scheduler.request`` span per request (parent: the gateway's
``traceparent``), one ``scheduler.prefill`` / ``scheduler.decode`` span per step
linked to every request span it serves; shard calls carry the step span. A step
that serves exactly one request is also that request's *child*, so a request
served alone is one trace from the caller to the layers; a step that serves
several is the root of its own trace (it belongs to none of them more than to
the others) and the links tie it to each.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.common import redis_keys as keys
from services.common.metrics import new_registry
from services.common.tracing import context_from_traceparent
from services.scheduler.metrics import MALFORMED, SchedulerMetrics
from services.scheduler.outbox import Backoff, Flusher, Outbox
from services.scheduler.policy import Limits, Scheduler, StepOutput
from services.scheduler.queue import REDIS_ERRORS, Entry, PoolQueue, lost_group, transient
from services.scheduler.request import Cancellation
from services.scheduler.shard_pb import PoolFailure
from services.scheduler.steps import ShardSteps
from services.worker.client import ShardCallError, ShardClient

log = logging.getLogger("glm.scheduler")


@dataclass(frozen=True)
class CancelMark:
    """A cancelled request, in step numbers (``PoolLoop.sent`` counts the steps sent).

    ``seen_before_step``: steps sent when the loop read the request's cancel flag;
    ``left_in_step``: steps sent when it ended. The protocol guarantees they are equal:
    no step is sent with a request after its flag was read (a step sent ahead before
    the read still runs with it: its token is the last one)."""

    request_id: str
    seen_before_step: int
    left_in_step: int


@dataclass(frozen=True)
class LoopOptions:
    """What one pool's loop runs with; ``glm scheduler`` builds it from its
    ``SchedulerOptions`` (services/scheduler/options.py), tests build it directly."""

    redis_url: str
    model: str
    workers: tuple[str, ...]
    pool_id: str
    limits: Limits = field(default_factory=Limits)
    idle_block_ms: int = 200              # XREADGROUP BLOCK while the pool is idle
    shard_timeout_s: float = 60.0         # deadline of every shard call
    warmup_timeout_s: float = 600.0
    claim_idle_ms: int = keys.CLAIM_IDLE_MS
    heartbeat_s: float = 5.0
    health_every_s: float = 5.0           # Health while idle
    drain_timeout_s: float = 30.0         # on stop: finish running requests this long at most
    lag_every_s: float = 1.0              # the queue-depth gauge's XINFO GROUPS (with metrics on)
    result_ttl_s: int = keys.RESULT_TTL_S  # a finished request's events and record are kept this long
    redis_timeout_s: float = 5.0          # connect and read timeout of every Redis call
    backoff_s: float = 0.05               # first retry after a Redis failure; doubles up to backoff_max_s
    backoff_max_s: float = 2.0
    shard_token: str | None = None        # the pool's shard token (None: the one beside unix sockets)

    @property
    def refresh_s(self) -> float:
        return self.claim_idle_ms / 4000.0

    @property
    def claim_every_s(self) -> float:
        return self.claim_idle_ms / 2000.0


class PoolLoop(ShardSteps):
    """One pool's scheduler process: serves the model's queue on its workers until stopped.

    ``after_step``, when given, is awaited after every step with the number of steps
    done: a way to act at a step boundary (the tests set cancel keys there)."""

    def __init__(self, options: LoopOptions, *, decode, max_sequence_length: int,
                 tracer: trace.Tracer | None = None, metrics: SchedulerMetrics | None = None,
                 after_step: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.options = options
        self.poll_lag = metrics is not None       # the queue depth costs a Redis call: only when exported
        self.metrics = metrics or SchedulerMetrics(new_registry(process_metrics=False), model=options.model,
                                                   pool=options.pool_id)
        self.decode = decode
        self.max_sequence_length = max_sequence_length
        self.tracer = tracer or trace.NoOpTracer()
        self.stopping = asyncio.Event()
        self.core: Scheduler | None = None
        self.spans: dict[str, trace.Span] = {}
        self.raw: dict[str, str] = {}             # request id -> its queue document (for the dead letter)
        self.steps = 0                            # steps done
        self.sent = 0                             # forward calls sent (they number the Decodes)
        self.ahead = None                         # the Decode sent ahead, in flight (steps.Sent)
        # steps and rows sent, and the time the shard calls took out of the busy time (from a
        # busy period's first step to its last step's end): in the heartbeat, for glm bench
        self.counters = dict.fromkeys(("decode_steps", "decode_rows", "prefill_steps", "prefill_rows",
                                       "preempted", "ahead_steps", "shard_ms", "busy_ms"), 0)
        self.shard_until = 0.0                    # the last shard call's end (steps._count_shard_time)
        self._last_step_end: float | None = None
        self.after_step = after_step
        self.cancel_marks: collections.deque[CancelMark] = collections.deque(maxlen=1024)   # the latest ones
        self._cancel_seen: dict[str, int] = {}    # request id -> steps sent when its cancel flag was read
        self.taken: set[str] = set()              # held requests whose entry another pool holds now
        self.taken_count = 0                      # requests dropped so (for the tests)
        self.redis_failures = 0                   # Redis failures ridden through (for the tests)
        self.backoff = Backoff(options.backoff_s, options.backoff_max_s)
        self._recovering = False                  # a Redis call failed: recover before reading new work
        self._need_group = False                  # the server lost the consumer group
        self._held_back: list[Entry] = []         # entries taken but not added yet (Redis failed meanwhile)
        self.flusher: Flusher | None = None       # publishes the outbox (behind a Decode or at once)

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        o = self.options
        redis = aioredis.from_url(o.redis_url, socket_connect_timeout=o.redis_timeout_s,
                                  socket_timeout=o.redis_timeout_s + o.idle_block_ms / 1000.0,
                                  retry=Retry(NoBackoff(), 0))
        client = ShardClient(list(o.workers), timeout_s=o.shard_timeout_s, token=o.shard_token)
        self.queue = PoolQueue(redis, o.model, o.pool_id, claim_idle_ms=o.claim_idle_ms, result_ttl_s=o.result_ttl_s)
        self.outbox = Outbox(self.queue)
        self.flusher = Flusher(self.outbox, self.taken, failed=self._redisfailed_rows,
                               recovering=lambda: self._recovering)
        refresher = None
        try:
            try:
                warm = await client.warmup(o.limits.max_batch_size, o.limits.max_input_tokens,
                                           o.limits.max_total_tokens, timeout_s=o.warmup_timeout_s)
            except ShardCallError as exc:
                raise PoolFailure(f"warmup failed: {exc}") from None
            await client.clear_cache()            # this scheduler owns the workers' cache from now on
            self.core = Scheduler(o.limits, warm.max_batch_total_tokens, block_size=warm.kv_block_size,
                                  max_sequence_length=self.max_sequence_length, decode=self.decode)
            self.metrics.kv_capacity.set(warm.max_batch_total_tokens)
            log.info("pool %s: model %s, KV capacity %d tokens, mode %s", o.pool_id, o.model,
                     warm.max_batch_total_tokens, o.limits.mode)
            while await self._redis(self.queue.ensure_group, default=False) is False:
                if self.stopping.is_set():
                    return
                await asyncio.sleep(self.backoff.delay_s)
            refresher = asyncio.ensure_future(self._refresh_leases())
            await self._serve(client)
        except ShardCallError as exc:
            log.error("pool %s: worker failure, stopping: %s", o.pool_id, exc)
            raise PoolFailure(f"worker failure: {exc}") from None
        finally:
            if refresher is not None:
                refresher.cancel()
            if self.ahead is not None:                # a Decode sent ahead, its reply never read
                self.ahead.call.cancel()
                self.ahead.span.end()
            self.flusher.cancel()
            for span in self.spans.values():
                span.set_status(trace.StatusCode.ERROR, "pool stopped")
                span.end()
            await client.close()
            try:
                await self.queue.leave()
            except Exception:          # Redis gone: the heartbeat expires by itself
                pass
            await redis.aclose()

    # -- Redis failures and leases -----------------------------------------------------------
    @property
    def degraded(self) -> bool:
        """Redis failed and the pool has not caught up yet (its outbox included): no new
        work is read."""
        return self._recovering

    async def _redis(self, call, *args, default=None):
        """``await call(*args)``; a transient Redis failure returns ``default`` (and starts the
        backoff; while it runs, nothing is tried)."""
        if self.backoff.failing and not self.backoff.ready:
            return default
        try:
            result = await call(*args)
        except REDIS_ERRORS as exc:
            if not transient(exc):
                raise
            self._redisfailed_rows(exc)
            return default
        return result

    def _redisfailed_rows(self, exc: BaseException) -> None:
        self.redis_failures += 1
        self.queue.failed()
        if not self.backoff.failing:
            log.warning("pool %s: Redis failed (%s: %s); retrying with backoff, running requests go on",
                        self.options.pool_id, type(exc).__name__, exc)
        self.backoff.failed()
        self._recovering = True
        self._need_group = self._need_group or lost_group(exc)

    async def _recover(self) -> None:
        """After a Redis failure: the group (when the server lost it), the outbox, the
        entries still pending under this pool; then new work again."""
        if not self._recovering or not self.backoff.ready:
            return
        await self.flusher.wait()
        try:
            if self._need_group:
                await self.queue.ensure_group()
                self._need_group = False
            await self.outbox.flush(self.taken)
            own = await self.queue.read_own(len(self.core.request_ids()) + self.options.limits.max_batch_size)
        except REDIS_ERRORS as exc:
            if not transient(exc):
                raise
            self._redisfailed_rows(exc)
            return
        log.warning("pool %s: Redis is back after %d failed tries", self.options.pool_id, self.backoff.failures)
        self.backoff.ok()
        self._recovering = False
        entries, self._held_back = self._held_back + own, []
        for entry in entries:
            await self._add(entry)

    async def _refresh_leases(self) -> None:
        """Every ``refresh_s``, whatever a step takes: re-claim the held entries, note
        the ones another pool took."""
        while True:
            await asyncio.sleep(self.options.refresh_s)
            held = {}
            for rid in self.core.request_ids():
                state = self.core.state(rid)
                if state is not None and state.tag:
                    held[state.tag] = rid
            if not held:
                continue
            try:
                taken = await self.queue.refresh(list(held))
            except REDIS_ERRORS as exc:
                log.warning("pool %s: lease refresh failed: %s", self.options.pool_id, exc)
                self.queue.failed()
                continue
            self.taken |= {held[tag] for tag in taken if tag in held}

    def _drop_taken(self) -> None:
        """Stop generating the requests another pool holds now: each leaves at the next
        plan, and ``_publish`` drops whatever they emit."""
        for rid in list(self.taken):
            state = self.core.state(rid)
            if state is None:
                self.taken.discard(rid)
            elif self.core.cancel(rid, Cancellation.TAKEN):
                log.warning("pool %s: request %s is held by another pool now: stopped generating it",
                            self.options.pool_id, rid)

    async def _serve(self, client: ShardClient) -> None:
        o, core = self.options, self.core
        last = {"claim": 0.0, "heartbeat": 0.0, "health": time.monotonic(), "lag": 0.0}
        drain_until = None
        was_idle = True
        while True:
            now = time.monotonic()
            snapshot = core.snapshot()
            self.metrics.observe(snapshot)
            if self.poll_lag and now - last["lag"] >= o.lag_every_s:
                last["lag"] = now
                depth = await self._redis(self.queue.lag)
                if depth is not None:
                    self.metrics.queue_depth.set(depth)
            idle = core.idle and self.ahead is None
            if self.stopping.is_set():
                drain_until = drain_until or now + o.drain_timeout_s
                if (idle and not self.outbox) or now > drain_until:
                    return
            went_idle = idle and not was_idle
            was_idle = idle
            if now - last["heartbeat"] >= o.heartbeat_s or went_idle:
                last["heartbeat"] = now
                await self._redis(self.queue.heartbeat, {
                    "model": o.model, "capacity": core.capacity, "mode": o.limits.mode.value,
                    "running": snapshot.running, "waiting": snapshot.waiting, **self.counters})
            await self._recover()
            if idle:
                await self.flusher.now()        # else the next Decode's flusher publishes it
            self._drop_taken()
            if drain_until is None and not self.degraded and now - last["claim"] >= o.claim_every_s:
                last["claim"] = now
                await self._claim()
            room = 0 if drain_until is not None or self.degraded else core.room()
            for entry in await self._poll(room, o.idle_block_ms if idle else None):
                await self._add(entry)
            if core.idle and self.ahead is None:
                self._last_step_end = None
                if now - last["health"] >= o.health_every_s:
                    last["health"] = now
                    await client.health(timeout_s=o.shard_timeout_s)
                if not room:
                    await asyncio.sleep(o.idle_block_ms / 1000.0)
                continue
            last["health"] = now
            started = time.perf_counter()
            if self._last_step_end is not None:
                self.counters["busy_ms"] += (started - self._last_step_end) * 1000.0
            await self._step(client)
            self._last_step_end = time.perf_counter()
            self.counters["busy_ms"] += (self._last_step_end - started) * 1000.0

    # -- requests in ------------------------------------------------------------------------
    async def _poll(self, room: int, block_ms: int | None) -> list[Entry]:
        """Read the held requests' cancel flags and, with ``room``, new entries, in one round
        trip (``PoolQueue.poll``); mark the cancelled requests (the next step's plan ends
        them) and return the entries."""
        ids = self.core.request_ids()
        flags, entries = await self._redis(self.queue.poll, ids, room, block_ms, default=([], []))
        for rid, flag in zip(ids, flags):
            if flag and self.core.cancel(rid):
                self._cancel_seen[rid] = self.sent
                log.info("pool %s: request %s cancelled by its caller (%d steps sent)",
                         self.options.pool_id, rid, self.sent)
        return entries

    async def _claim(self) -> None:
        room = self.core.room()
        if not room:
            return
        for entry in await self._redis(self.queue.claim_idle, room, default=[]):
            log.warning("pool %s: claimed %s (delivery %d)", self.options.pool_id, entry.entry_id,
                        entry.deliveries)
            if entry.request is not None:
                self.metrics.resumed.inc()
            await self._add(entry)

    async def _add(self, entry: Entry) -> None:
        if entry.request is None:
            log.error("pool %s: dead-lettering entry %s: %s", self.options.pool_id, entry.entry_id, entry.problem)
            if await self._redis(self.queue.drop_malformed, entry, default=False) is False:
                self._held_back.append(entry)
                return
            self.metrics.failure(MALFORMED)
            return
        req = entry.request
        if self.core.state(req.id) is not None:
            return                  # this pool holds it already (it claimed its own entry): keep its span
        events = await self._redis(self.queue.events, req.id) if entry.deliveries > 1 or entry.pending else []
        if events is None:            # Redis failed: add it once it is back
            self._held_back.append(entry)
            return
        reject = ""
        if entry.deliveries > keys.MAX_DELIVERIES:
            reject = f"delivered {entry.deliveries} times without ending (a pool failed each time)"
        parent = context_from_traceparent(req.traceparent)
        span = self.tracer.start_span("scheduler.request", context=parent, kind=SpanKind.CONSUMER, attributes={
            "glm.request_id": req.id, "glm.pool": self.options.pool_id, "glm.deliveries": entry.deliveries,
            "glm.prompt_tokens": len(req.prompt_ids), "glm.resumed_events": len(events)})
        self.spans[req.id] = span
        self.raw[req.id] = entry.raw
        out = self.core.add(req, time.time(), tag=entry.entry_id, events=events, reject=reject)
        await self._publish(out)

    async def _publish(self, out: StepOutput) -> None:
        """Queue the output's events and ends in the outbox (dropping those of requests
        another pool holds now); the loop publishes them (``Flusher``)."""
        events = [(rid, e) for rid, e in out.events if rid not in self.taken]
        ended = [o for o in out.ended if o.request_id not in self.taken]
        tags = {}
        for rid, _event in events:
            state = self.core.state(rid)
            if state is not None and state.tag:
                tags[rid] = state.tag
        raw = {o.request_id: self.raw.get(o.request_id, "") for o in ended if o.dead}
        self.outbox.put(events, ended, raw, tags)
        self.metrics.published(events, ended, time.monotonic())
        for outcome in out.ended:
            lost = outcome.request_id in self.taken
            if lost:
                self.taken.discard(outcome.request_id)
                self.taken_count += 1
            seen = self._cancel_seen.pop(outcome.request_id, None)
            if seen is not None and not lost:
                self.cancel_marks.append(CancelMark(outcome.request_id, seen, self.sent))
            self.raw.pop(outcome.request_id, None)
            span = self.spans.pop(outcome.request_id, None)
            if span is not None:
                if lost:
                    span.set_status(trace.StatusCode.ERROR, "another pool holds its entry now")
                elif outcome.code:
                    span.set_status(trace.StatusCode.ERROR, f"{outcome.code}: {outcome.message}")
                span.end()
