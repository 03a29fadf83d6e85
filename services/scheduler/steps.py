"""One step's shard calls, for ``services.scheduler.loop.PoolLoop`` (a mixin of it).

``ShardSteps._step`` asks the core (``services.scheduler.policy.Scheduler``) for the step's
plan, publishes its events, sends its FilterBatch, then the forward calls: over paged workers
one ``Decode`` carrying the admitted phases (``admit``; a ``Prefill`` when nothing runs), over
dense workers a ``Prefill`` of the admitted phases and a ``Decode`` of every batch. Each call
runs inside a step span linked to the request spans it serves; its time counts as the
workers' (``counters["shard_ms"]``); the events of the step before go out while it runs
(``Flusher.behind``). A refusal of the admitted phases (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)
is the core's ``prefill_refused``; any other failure fails the pool.

The mixin uses the loop's ``core``, ``counters``, ``metrics``, ``flusher``, ``spans``,
``tracer``, ``options``, ``steps``, ``after_step`` and ``_publish``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.scheduler.ops import PrefillOp
from services.scheduler.shard_pb import batch_pb, cached_pb, failed_rows, generations, view_of
from services.worker.client import ShardCallError, ShardClient

log = logging.getLogger("glm.scheduler")
REQUEST_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ShardSteps:
    """The step methods of ``PoolLoop`` (see the module docstring)."""

    def _step_span(self, name: str, request_ids, attributes: dict):
        """A step span linked to the request spans it serves; the child of the
        request span when it serves exactly one, else the root of its own trace."""
        spans = [self.spans[r] for r in request_ids if r in self.spans]
        parent = trace.set_span_in_context(spans[0]) if len(spans) == 1 else otel_context.Context()
        return self.tracer.start_as_current_span(
            name, context=parent, links=[trace.Link(s.get_span_context()) for s in spans],
            attributes=attributes)

    async def _step(self, client: ShardClient) -> None:
        core = self.core
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
        if core.paged:
            await self._mixed_step(client, plan.prefill)
        else:
            await self._split_step(client, plan.prefill)
        self.steps += 1
        if self.after_step is not None:
            await self.after_step(self.steps)

    async def _mixed_step(self, client: ShardClient, op: PrefillOp | None) -> None:
        """Paged workers: the running rows and the phases admitted now in one Decode (one
        forward): a prefill never pauses the running batch."""
        core = self.core
        batches = core.decode_batches()
        if not batches and op is None:
            self.flusher.behind()
            return
        ids = core.request_ids_of(batches) + (list(op.request_ids) if op else [])
        rows = sum(v.rows for v in batches)
        admitted = len(op.requests) if op else 0
        with self._step_span("scheduler.decode" if batches else "scheduler.prefill", ids, {
                "glm.batch_id": batches[0].id if batches else op.batch_id, "glm.batch_size": rows + admitted,
                "glm.admitted": admitted, "glm.tokens": rows + (op.tokens if op else 0)}):
            if batches:
                call = client.decode([cached_pb(v) for v in batches], admit=batch_pb(op) if op else None)
            else:                          # nothing running: the admitted phases' prefill
                call = client.prefill(batch_pb(op))
            call = asyncio.ensure_future(call)
            self.flusher.behind()          # the events so far go out while the workers compute
            try:
                reply = await self._timed(call)
            except ShardCallError as exc:
                if op is None or not await self._refused(op, exc, ("Decode", "Prefill")):
                    raise
                return
        if op is not None:
            self._count_prefill(op)       # steps that admitted (alone or with running rows)
            self._count_prompt(op)
        if batches:
            self._count_decode(rows)
        self.metrics.generated.inc(len(reply.generations))
        await self._publish(core.decoded(generations(reply), view_of(reply), failed_rows(reply), admitted=op))

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
            self.counters["shard_ms"] += (time.perf_counter() - started) * 1000.0
