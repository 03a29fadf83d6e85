"""The ``glm.v1.TextGeneration`` servicer: validate, enqueue, relay, cancel.

A call is validated and tokenized (``validation.admit``), enqueued once per
request id (``Broker.submit``; a retry with the same id re-attaches), then its
event stream is relayed from the first event. When the call ends before the
request does (the caller went away, its deadline passed), a done-callback on
the call sets the request's cancel key so the pool drops it within one step;
the callback fires however the handler was left, even when the caller vanished
while the handler was suspended outside our code. Every call runs in a ``gateway.generate`` span whose W3C
context comes from the caller's metadata and travels in the queued request.

Tenants: the caller's ``request_id`` is namespaced by its tenant (its API key's digest,
``auth.tenant_of``) before it names anything in Redis, so idempotency holds per tenant
and no tenant can reach another's request; replies carry the caller's own id.

Capacity: at most ``max_calls`` generation calls run at once (``CallLimit``); one more
is refused at once with RESOURCE_EXHAUSTED, before any Redis command, so the gateway's
Redis connections (sized from the same number, ``broker.pool_size``) never run out and
overload never reads as Redis being down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import AsyncIterator

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from model.prompt import prepare_text_ids
from services.common import redis_keys as keys
from services.common.errors import InvalidArgument, ResourceExhausted, ServiceError, abort_code, one_line
from services.common.messages import EVENT_TOKENS, Event
from services.common.tracing import context_from_metadata, metadata_from_context
from services.gateway.auth import bearer_key, tenant_of
from services.gateway.broker import Broker, Submitted, cancel_quietly
from services.gateway.catalog import Catalog
from services.gateway.metrics import OK, Call, GatewayMetrics, outcome_of
from services.gateway.relay import Relay, Samples
from services.gateway.validation import Admission, admit, request_id_of
from services.proto_gen.glm.v1 import generation_pb2 as pb
from services.proto_gen.glm.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("glm.gateway")


def _deadline(context) -> float | None:
    """The caller's deadline on the ``time.monotonic()`` clock (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class CallLimit:
    """The generation calls running now, at most ``limit``: ``slot()`` holds one for the
    length of a call, or raises RESOURCE_EXHAUSTED at once when all are taken."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the concurrent call limit must be >= 1, got {limit}")
        self.limit = limit
        self.active = 0

    @contextmanager
    def slot(self):
        if self.active >= self.limit:
            raise ResourceExhausted(f"gateway at its limit of {self.limit} concurrent calls; "
                                    "retry later or use another gateway")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class TextGenerationService(pb_grpc.TextGenerationServicer):
    """The ``glm.v1.TextGeneration`` servicer: validates, enqueues and relays a generation;
    answers ``Tokenize``, ``ListModels`` and ``ModelInfo`` from the catalog.

    ``keyed``: the gateway requires API keys, so each key is a tenant; else every caller
    is ``anonymous``."""

    def __init__(self, catalog: Catalog, broker: Broker, tracer: trace.Tracer,
                 metrics: GatewayMetrics, *, max_calls: int, keyed: bool = False) -> None:
        self.catalog = catalog
        self.broker = broker
        self.tracer = tracer
        self.metrics = metrics
        self.calls = CallLimit(max_calls)
        self.keyed = keyed
        self._background: set[asyncio.Task] = set()
        # Calls whose request may outlive them: added once enqueued, left when the call
        # ends with the request finished or its cancel key on the way (see ``drain``).
        self._owed: dict[Relay, str] = {}

    # ---- generation ------------------------------------------------------------------
    # A call left without a result or a ServiceError was abandoned by its caller
    # (asyncio.CancelledError / GeneratorExit): its outcome stays ``cancelled``.
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        span, call = self._span(context), self.metrics.call()
        outcome = "cancelled"
        try:
            with self.calls.slot():
                admission, relay = await self._submit(request, context, span, call)
                async for index, event in self._events(admission, _deadline(context)):
                    if relay.accept(index, event) and event.type == EVENT_TOKENS:
                        call.token()
                response = relay.response()
            outcome = OK
            return response
        except ServiceError as exc:
            outcome = outcome_of(abort_code(exc))
            await self._abort(context, span, exc)
        except Exception:
            outcome = "internal"
            raise
        finally:
            call.finish(outcome)
            span.end()

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context) -> AsyncIterator[pb.GenerateStreamResponse]:
        span, call = self._span(context), self.metrics.call()
        outcome = "cancelled"
        try:
            with self.calls.slot():
                admission, relay = await self._submit(request, context, span, call)
                async for index, event in self._events(admission, _deadline(context)):
                    if relay.accept(index, event) and (message := relay.stream_message(index, event)) is not None:
                        if event.type == EVENT_TOKENS:
                            call.token()
                        yield message
            outcome = OK
        except ServiceError as exc:
            outcome = outcome_of(abort_code(exc))
            await self._abort(context, span, exc)
        except Exception:
            outcome = "internal"
            raise
        finally:
            call.finish(outcome)
            span.end()

    def _span(self, context) -> trace.Span:
        parent = context_from_metadata(context.invocation_metadata())
        return self.tracer.start_span("gateway.generate", context=parent, kind=SpanKind.SERVER)

    async def _events(self, admission: Admission, deadline: float | None) -> AsyncIterator[tuple[int, Event]]:
        """``(sample, event)`` of every sample of the call as they come, until each has ended
        (one request: its events in order; several: merged, each sample's in order)."""
        ids = [q.id for q in admission.samples]
        if len(ids) == 1:
            async for event in self.broker.events(ids[0], deadline):
                yield 0, event
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def read(index: int, request_id: str) -> None:
            try:
                async for event in self.broker.events(request_id, deadline):
                    await merged.put((index, event))
            except BaseException as exc:  # noqa: BLE001 - handed to the call, which raises it
                await merged.put((index, exc))

        readers = [asyncio.ensure_future(read(i, rid)) for i, rid in enumerate(ids)]
        try:
            open_ = len(ids)
            while open_:
                index, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                if item.terminal:
                    open_ -= 1
                yield index, item
        finally:
            for reader in readers:
                reader.cancel()

    async def _submit(self, request, context, span, call: Call) -> tuple[Admission, "Samples"]:
        served = self.catalog.get(request.model)
        call.model = served.name
        caller_id = request_id_of(request)
        tenant = tenant_of(bearer_key(context.invocation_metadata())) if self.keyed else keys.ANONYMOUS
        admission = admit(request, served, keys.namespaced(tenant, caller_id))
        traceparent = dict(metadata_from_context(trace.set_span_in_context(span))).get("traceparent", "")
        remaining = context.time_remaining()
        now = time.time()
        samples = tuple(replace(q, traceparent=traceparent, created_at=now,
                                deadline=now + remaining if remaining is not None else 0.0)
                        for q in admission.samples)
        submitted: list[Submitted] = await self.broker.submit_all(samples, admission.fingerprints)
        queued = samples[0]
        span.set_attributes({"glm.request_id": queued.id, "glm.model": served.name,
                             "glm.prompt_tokens": len(queued.prompt_ids),
                             "glm.max_new_tokens": queued.max_new_tokens, "glm.n": len(samples),
                             "glm.num_beams": queued.beam.num_beams if queued.beam else 1,
                             "glm.tenant": tenant, "glm.reattached": all(s.attached for s in submitted)})
        relays = [Relay(caller_id, served.name, served.tokenizer, logprobs=admission.logprobs,
                        prompt_tokens=len(q.prompt_ids), seed=q.sampling.seed) for q in samples]
        for q, relay in zip(samples, relays):
            self._cancel_if_abandoned(context, q.id, relay)
        return replace(admission, queued=queued, samples=samples), Samples(relays)

    def _cancel_if_abandoned(self, context, request_id: str, relay: Relay) -> None:
        """When the call ends before the request did (the caller went away, its
        deadline passed, Redis failed, the server stopped), set the cancel key so
        the pool drops the request within one step."""
        loop = asyncio.get_running_loop()
        self._owed[relay] = request_id

        def on_done(_context) -> None:
            if relay.ended:
                self._owed.pop(relay, None)
            else:
                loop.call_soon_threadsafe(self._cancel, relay)

        context.add_done_callback(on_done)

    def _cancel(self, relay: Relay) -> None:
        request_id = self._owed.pop(relay, None)
        if request_id is None or relay.ended:     # written already (drain), or finished
            return
        log.info("request %s: the call ended first; cancelling the generation", request_id)
        task = asyncio.ensure_future(cancel_quietly(self.broker, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """At shutdown, once the server has stopped (every call ended or was cancelled):
        write the cancel key of every request whose call ended first, including those
        whose done-callback has not run yet, and wait until they are written."""
        for relay in list(self._owed):
            self._cancel(relay)
        if self._background:
            await asyncio.wait(list(self._background), timeout=30)

    async def _abort(self, context, span, exc: ServiceError) -> None:
        span.set_status(Status(StatusCode.ERROR, one_line(exc)))
        await context.abort(abort_code(exc), one_line(exc))

    # ---- model info --------------------------------------------------------------------
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            served = self.catalog.get(request.model)
            if not request.prompt:
                raise InvalidArgument("prompt: empty")
            ids = prepare_text_ids(served.tokenizer.tokenize(request.prompt))
        except ServiceError as exc:
            await context.abort(abort_code(exc), one_line(exc))
        return pb.TokenizeResponse(token_ids=ids,
                                   pieces=[served.tokenizer.id_to_piece(i) for i in ids])

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[served.spec() for served in self.catalog])

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelSpec:
        try:
            return self.catalog.get(request.model).spec()
        except ServiceError as exc:
            await context.abort(abort_code(exc), one_line(exc))
