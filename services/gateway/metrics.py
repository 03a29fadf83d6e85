"""The gateway's metrics (docs/deploy.md §8): calls by outcome, time to first token.

One ``Call`` per Generate/GenerateStream call: it starts the clock when the call
arrives, learns the model once the catalog has resolved it, and records the
first token and the outcome exactly once, however the handler is left.
"""

from __future__ import annotations

import time

import grpc
from prometheus_client import Counter, Histogram

from services.common.metrics import WAIT_BUCKETS

OK = "ok"
UNKNOWN_MODEL = "unknown"      # the call ended before its model was known (bad name, no key)


def outcome_of(code: grpc.StatusCode) -> str:
    """``ok`` or the gRPC status in snake case (``resource_exhausted``...)."""
    return OK if code is grpc.StatusCode.OK else code.name.lower()


class GatewayMetrics:
    """The gateway's Prometheus metrics: finished calls by outcome, time to first token."""

    def __init__(self, registry) -> None:
        self.requests = Counter(
            "glm_gateway_requests_total", "Finished generation calls by outcome (ok or the gRPC status).",
            ["model", "outcome"], registry=registry)
        self.ttft = Histogram(
            "glm_gateway_time_to_first_token_seconds",
            "From a call's arrival to its first token event (queueing included).",
            ["model"], buckets=WAIT_BUCKETS, registry=registry)

    def call(self) -> "Call":
        return Call(self)


class Call:
    """The metrics of one generation call: times its first token, counts its outcome once."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.model = UNKNOWN_MODEL
        self.first = False
        self.done = False

    def token(self) -> None:
        """A token event reached the caller (only the first one is timed)."""
        if not self.first:
            self.first = True
            self.metrics.ttft.labels(self.model).observe(time.monotonic() - self.start)

    def finish(self, outcome: str) -> None:
        if not self.done:
            self.done = True
            self.metrics.requests.labels(self.model, outcome).inc()
