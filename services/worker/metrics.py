"""One rank's metrics (docs/deploy.md §8), labelled ``model`` and ``rank``: the
duration of each Prefill and Decode forward, and failed shard calls by reason."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from services.common.errors import ServiceError, Unavailable
from services.common.metrics import LATENCY_BUCKETS

BROKEN = "broken"


def failure_reason(exc: BaseException, *, collective: bool, out_of_memory: type) -> str:
    """``out_of_memory``; ``broken`` (the rank failed earlier); the gRPC status of a
    refusal in snake case (``invalid_argument``, ``resource_exhausted``,
    ``failed_precondition``); ``collective`` for any other failure inside a forward
    (a peer died, a collective timed out), ``internal`` outside one."""
    if isinstance(exc, out_of_memory):
        return "out_of_memory"
    if isinstance(exc, Unavailable):
        return BROKEN
    if isinstance(exc, ServiceError):
        return exc.code.name.lower()
    return "collective" if collective else "internal"


class WorkerMetrics:
    """The Prometheus metrics of one rank: step times, batch sizes, KV use and failures by reason."""

    def __init__(self, registry, *, model: str, rank: int) -> None:
        self.labels = {"model": model, "rank": str(rank)}
        names = list(self.labels)
        self.prefill = Histogram("glm_worker_prefill_seconds", "One Prefill forward on this rank.", names,
                                 buckets=LATENCY_BUCKETS, registry=registry).labels(**self.labels)
        self.decode = Histogram("glm_worker_decode_seconds", "One Decode step on this rank.", names,
                                buckets=LATENCY_BUCKETS, registry=registry).labels(**self.labels)
        self._failures = Counter("glm_worker_failures_total", "Failed shard calls by reason.",
                                 names + ["reason"], registry=registry)

    def failure(self, reason: str) -> None:
        self._failures.labels(**self.labels, reason=reason).inc()
