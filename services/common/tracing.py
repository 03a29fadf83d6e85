"""OpenTelemetry set-up shared by the services, and W3C context over gRPC metadata.

Nothing is exported unless an exporter is configured: ``setup_tracing`` returns
a provider whose spans go nowhere without ``otlp_endpoint`` (OTLP over gRPC,
batched) or an explicit ``exporter`` (tests pass an ``InMemorySpanExporter``).
The provider is not installed globally; callers keep the tracer they are given.

``LayerSampler`` decides which forwards record per-layer spans: a deterministic
ratio over the forward counter, so every rank of a pool (which runs the same
forwards in the same order) samples the same forwards.
"""

from __future__ import annotations

import math
from typing import Iterable

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter


def setup_tracing(service_name: str, *, otlp_endpoint: str | None = None,
                  exporter: SpanExporter | None = None, attributes: dict | None = None,
                  export_delay_ms: int = 1000) -> TracerProvider:
    """A provider for ``service_name`` (``service.name`` resource attribute).

    ``otlp_endpoint`` (``host:port``) adds a batched OTLP/gRPC exporter, flushed
    every ``export_delay_ms``; ``exporter`` is added with a synchronous processor.
    """
    resource = Resource.create({"service.name": service_name, **(attributes or {})})
    provider = TracerProvider(resource=resource)
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint if "://" in otlp_endpoint else f"http://{otlp_endpoint}"
        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://")),
            schedule_delay_millis=export_delay_ms))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def context_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The caller's trace context from gRPC invocation metadata (``traceparent``...)."""
    carrier = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            continue  # binary headers never carry W3C context
        carrier[key.lower()] = value
    return propagate.extract(carrier)


def context_from_traceparent(traceparent: str, tracestate: str = "") -> otel_context.Context:
    """The context a W3C ``traceparent`` string names (an empty context when it is blank)."""
    carrier = {"traceparent": traceparent} if traceparent else {}
    if traceparent and tracestate:
        carrier["tracestate"] = tracestate
    return propagate.extract(carrier)


def metadata_from_context(ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    """gRPC metadata carrying ``ctx`` (default: the current context)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return sorted(carrier.items())


class LayerSampler:
    """Forward ``k`` (0-based) is sampled iff ``floor((k+1)*r) > floor(k*r)``: exactly
    a fraction ``r`` of forwards, spread evenly, identical on every rank."""

    def __init__(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"layer trace ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        self.count = 0

    def next(self) -> bool:
        k, self.count = self.count, self.count + 1
        return math.floor((k + 1) * self.ratio) > math.floor(k * self.ratio)
