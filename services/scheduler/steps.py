"""One step's shard calls, for ``services.scheduler.loop.PoolLoop`` (a mixin of it).

``ShardSteps._step`` asks the core (``services.scheduler.policy.Scheduler``) for the step's
plan, publishes its events, sends its FilterBatch, then the forward calls: over paged workers
one ``Decode`` carrying the admitted phases (``admit``; a ``Prefill`` when nothing runs), over
dense workers a ``Prefill`` of the admitted phases and a ``Decode`` of every batch. Each call
runs inside a step span linked to the request spans it serves; the time the loop waits on
it counts as the workers' (``counters["shard_ms"]``); the events of the step before go out
while it runs (``Flusher.behind``). A refusal of the admitted phases (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED) is the core's ``prefill_refused``; any other failure fails the pool.

Steps sent ahead (paged): right after a Decode that admits nothing, and again at the next
step while the one sent ahead runs, the loop sends the following Decode of the same batch
before the reply (``DecodeRequest.ahead``, numbered by ``sent``: the ranks run it after
the one before) when the core says it is the step the plan would choose anyway
(``services.scheduler.ahead``). The workers then go from one step to the next without
waiting on the scheduler: its reply handling, publishing and the next poll run while they
compute. The step sent ahead is the loop's next step (``ahead``); its reply is handled like
any Decode's, and when the core says no the next step is planned after the reply.

The mixin uses the loop's ``core``, ``counters``, ``metrics``, ``flusher``, ``spans``,
``tracer``, ``options``, ``steps``, ``sent``, ``ahead``, ``shard_until``, ``after_step`` and
``_publish``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.scheduler.ahead import Rows
from services.scheduler.ops import PrefillOp
from services.scheduler.shard_pb import ahead_pb, batch_pb, cached_pb, failed_rows, generations, view_of
from services.worker.client import ShardCallError, ShardClient

log = logging.getLogger("glm.scheduler")
REQUEST_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass
class Sent:
    """A forward call in flight: its task, its step span, the phases it admits, the batch its
    reply names, the rows it decodes (None: a step sent ahead, counted from its reply) and,
    when a step may be sent ahead of its reply, its rows once it has run (``RunAhead``)."""

    call: asyncio.Future
    span: trace.Span
    op: PrefillOp | None
    batch_id: int
    decoding: int | None
    rows: Rows | None = None
    sent_at: float = field(default_factory=time.perf_counter)
    done_at: float = 0.0                 # when the reply came (the event loop's callback)

    def __post_init__(self) -> None:
        self.call.add_done_callback(self._done)

    def _done(self, _call) -> None:
        self.done_at = time.perf_counter()


class ShardSteps:
    """The step methods of ``PoolLoop`` (see the module docstring)."""

    def _step_span(self, name: str, request_ids, attributes: dict):
        """``_start_step_span`` as the current span, ended on exit."""
        return trace.use_span(self._start_step_span(name, request_ids, attributes), end_on_exit=True)

    async def _step(self, client: ShardClient) -> None:
        """One step: the Decode sent ahead while the last one ran, else the plan's calls; then,
        paged, the next Decode sent ahead when the core allows it (``RunAhead.ahead``), and
        the reply."""
        core = self.core
        sent, self.ahead = self.ahead, None
        if sent is None:
            preempted = core.preempted
            plan = core.plan(time.time())
            if core.preempted > preempted:
                n = core.preempted - preempted
                log.info("pool %s: KV pool full: %d row(s) preempted, to be recomputed", self.options.pool_id, n)
                self.counters["preempted"] += n
                self.metrics.preempted.inc(n)
            await self._publish(plan)
            if plan.filter:
                reply = await self._timed(client.filter_batch(plan.filter.batch_id, list(plan.filter.keep)))
                core.filtered(view_of(reply))
            if not core.paged:
                await self._split_step(client, plan.prefill)
                await self._stepped()
                return
            sent = self._send_mixed(client, plan.prefill)
        if sent is not None and sent.rows is not None:
            self.ahead = self._send_ahead(client, sent)
        self.flusher.behind()              # the events so far go out while the workers compute
        if sent is not None:
            await self._receive(sent)
        await self._stepped()

    async def _stepped(self) -> None:
        self.steps += 1
        if self.after_step is not None:
            await self.after_step(self.steps)

    def _send_mixed(self, client: ShardClient, op: PrefillOp | None) -> "Sent | None":
        """Paged workers: the running rows and the phases admitted now in one Decode (one
        forward): a prefill never pauses the running batch. None: nothing to run."""
        core = self.core
        batches = core.decode_batches()
        if not batches and op is None:
            return None
        ids = core.request_ids_of(batches) + (list(op.request_ids) if op else [])
        rows = sum(v.rows for v in batches)
        admitted = len(op.requests) if op else 0
        span = self._start_step_span("scheduler.decode" if batches else "scheduler.prefill", ids, {
            "glm.batch_id": batches[0].id if batches else op.batch_id, "glm.batch_size": rows + admitted,
            "glm.admitted": admitted, "glm.tokens": rows + (op.tokens if op else 0)})
        self.sent += 1
        with trace.use_span(span):
            if batches:
                call = client.decode([cached_pb(v) for v in batches], admit=batch_pb(op) if op else None,
                                     step=self.sent)
            else:                          # nothing running: the admitted phases' prefill
                call = client.prefill(batch_pb(op))
            call = asyncio.ensure_future(call)
        ahead_from = core.rows_after(batches) if batches and op is None else None
        return Sent(call, span, op, batches[0].id if batches else op.batch_id, rows, ahead_from)

    def _send_ahead(self, client: ShardClient, sent: "Sent") -> "Sent | None":
        """The next Decode of ``sent``'s batch, sent before its reply, when the core allows it."""
        rows = self.core.ahead(sent.rows, time.time())
        if rows is None:
            return None
        span = self._start_step_span("scheduler.decode", self.core.row_request_ids(sent.rows), {
            "glm.batch_id": sent.batch_id, "glm.batch_size": len(sent.rows), "glm.admitted": 0,
            "glm.tokens": len(sent.rows), "glm.ahead": True})
        self.sent += 1
        self.counters["ahead_steps"] += 1
        with trace.use_span(span):
            call = asyncio.ensure_future(client.decode(ahead_pb(sent.batch_id), step=self.sent, ahead=True))
        return Sent(call, span, None, sent.batch_id, None, rows)

    async def _receive(self, sent: "Sent") -> None:
        """The reply of ``sent``: the core's ``decoded`` (a refusal of its admitted phases is
        the core's ``prefill_refused``; any other failure fails the pool)."""
        core, op = self.core, sent.op
        try:
            reply = await self._timed_sent(sent)
        except ShardCallError as exc:
            refused = op is not None and await self._refused(op, exc, ("Decode", "Prefill"))
            if not refused:
                sent.span.record_exception(exc)
                sent.span.set_status(trace.StatusCode.ERROR, str(exc))
                raise
            return
        finally:
            sent.span.end()
        if op is not None:
            self._count_prefill(op)       # steps that admitted (alone or with running rows)
            self._count_prompt(op)
        rows = len(reply.generations) if sent.decoding is None else sent.decoding
        if rows:
            self._count_decode(rows)
        self.metrics.generated.inc(len(reply.generations))
        await self._publish(core.decoded(generations(reply), view_of(reply), failed_rows(reply), admitted=op))

    def _start_step_span(self, name: str, request_ids, attributes: dict) -> trace.Span:
        """A step span linked to the request spans it serves; the child of the request span
        when it serves exactly one, else the root of its own trace."""
        spans = [self.spans[r] for r in request_ids if r in self.spans]
        parent = trace.set_span_in_context(spans[0]) if len(spans) == 1 else otel_context.Context()
        return self.tracer.start_span(name, context=parent, links=[trace.Link(s.get_span_context()) for s in spans],
                                      attributes=attributes)

    async def _split_step(self, client: ShardClient, op: PrefillOp | None) -> None:
        """Dense workers: a Prefill of the admitted phases, then a Decode of every batch."""
        core = self.core
        if op:
            with self._step_span("scheduler.prefill", op.request_ids, {
                    "glm.batch_id": op.batch_id, "glm.batch_size": len(op.requests), "glm.tokens": op.tokens}):
                try:
                    reply = await self._timed(client.prefill(batch_pb(op)))
                except ShardCallError as exc:
                    if not await self._refused(op, exc, ("Prefill",)):
                        raise
                    reply = None
            self._count_prefill(op)
            if reply is not None:
                self._count_prompt(op)
                self.metrics.generated.inc(len(reply.generations))
                await self._publish(core.prefilled(op, generations(reply), view_of(reply), failed_rows(reply)))
        batches = core.decode_batches()
        if batches:
            with self._step_span("scheduler.decode", core.request_ids_of(batches), {
                    "glm.batch_id": batches[0].id, "glm.batch_size": sum(v.rows for v in batches)}):
                call = asyncio.ensure_future(client.decode([cached_pb(v) for v in batches]))
                self.flusher.behind()      # the events so far go out while the workers decode
                reply = await self._timed(call)
            self._count_decode(sum(v.rows for v in batches))
            self.metrics.generated.inc(len(reply.generations))
            await self._publish(core.decoded(generations(reply), view_of(reply), failed_rows(reply)))
        if not batches:
            self.flusher.behind()           # no Decode to publish behind

    async def _refused(self, op: PrefillOp, exc: ShardCallError, methods: tuple[str, ...]) -> bool:
        """Hand the core a refusal of ``op``'s phases by a call of ``methods``; False when ``exc``
        is no such refusal (the caller re-raises: the pool fails)."""
        if exc.code not in REQUEST_ERRORS or exc.method not in methods:
            return False
        log.warning("pool %s: admission refused: %s", self.options.pool_id, exc)
        await self._publish(self.core.prefill_refused(op, exc.code.name, exc.details, exc.refused_request_id))
        return True

    def _count_prefill(self, op: PrefillOp) -> None:
        self.counters["prefill_steps"] += 1
        self.counters["prefill_rows"] += len(op.requests)

    def _count_prompt(self, op: PrefillOp) -> None:
        self.metrics.prompt.inc(sum(len(r.input_ids) + 1 + len(r.generated_ids) for r in op.requests))

    def _count_decode(self, rows: int) -> None:
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += rows
        self.metrics.decode_steps.inc()
        self.metrics.decode_rows.inc(rows)

    async def _timed(self, call):
        """``await call``, its time counted as the workers' (``counters["shard_ms"]``)."""
        started = time.perf_counter()
        try:
            return await call
        finally:
            self._count_shard_time(started, time.perf_counter())

    async def _timed_sent(self, sent: "Sent"):
        """``await sent.call``; the workers' time is from its sending to its reply, less what
        overlaps the call before it (a step sent ahead is in flight beside that one)."""
        try:
            return await sent.call
        finally:
            self._count_shard_time(sent.sent_at, sent.done_at or time.perf_counter())

    def _count_shard_time(self, started: float, ended: float) -> None:
        self.counters["shard_ms"] += max(0.0, ended - max(started, self.shard_until)) * 1000.0
        self.shard_until = max(self.shard_until, ended)
