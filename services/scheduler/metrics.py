"""One pool's metrics (docs/deploy.md §8), labelled ``model`` and ``pool``.

The loop feeds them: the queue's lag on a timer, the batch and KV gauges before
every step (the core's ``Snapshot``), token counters from the workers' replies,
and each published ``StepOutput`` (inter-token gaps per request, failures by
reason). The two pure parts, ``TokenClock`` and ``failure_reason``, are
unit-tested on their own.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import Counter, Gauge, Histogram

from services.common.messages import EVENT_TOKENS
from services.common.metrics import LATENCY_BUCKETS
from services.scheduler.ops import Snapshot
from services.scheduler.request import Outcome

MALFORMED = "malformed"          # a queue entry that is not a request (dead-lettered)


def failure_reason(outcome: Outcome) -> str | None:
    """The ``reason`` label of a request that ended with an error (None: it did not).

    The gRPC status of its error event in snake case: ``invalid_argument`` (poison,
    dead-lettered), ``resource_exhausted`` (the workers have no room),
    ``deadline_exceeded``, ``internal`` (delivered too often or not resumable,
    dead-lettered)."""
    return outcome.code.lower() if outcome.code else None


class TokenClock:
    """The time between two token events of one request. Pure: the caller gives ``now``."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def tick(self, with_tokens: Iterable[str], ended: Iterable[str], now: float) -> list[float]:
        """Gaps since each request's previous token event; forgets the ended requests."""
        gaps = []
        for request_id in dict.fromkeys(with_tokens):
            before = self.last.get(request_id)
            if before is not None:
                gaps.append(now - before)
            self.last[request_id] = now
        for request_id in ended:
            self.last.pop(request_id, None)
        return gaps


class SchedulerMetrics:
    """The pool's Prometheus metrics, labelled with its model and pool id."""

    def __init__(self, registry, *, model: str, pool: str) -> None:
        labels = {"model": model, "pool": pool}
        names = list(labels)

        def make(kind, name, doc, **kw):
            return kind(name, doc, names, registry=registry, **kw).labels(**labels)

        self.queue_depth = make(Gauge, "glm_scheduler_queue_depth",
                                "Requests in the model's queue that no pool has taken (the group's lag).")
        self.batch_size = make(Gauge, "glm_scheduler_batch_size", "Rows in the running batch.")
        self.waiting = make(Gauge, "glm_scheduler_waiting_requests",
                            "Requests taken from the queue, not prefilled yet.")
        self.generated = make(Counter, "glm_scheduler_generated_tokens_total",
                              "Tokens generated (tokens/s = its rate).")
        self.decode_steps = make(Counter, "glm_scheduler_decode_steps_total", "Decode calls (forwards) sent.")
        self.decode_rows = make(Counter, "glm_scheduler_decode_rows_total",
                                "Rows of the Decode calls (rows per forward = its rate / the steps' rate).")
        self.prompt = make(Counter, "glm_scheduler_prompt_tokens_total", "Prompt tokens prefilled.")
        self.itl = make(Histogram, "glm_scheduler_inter_token_latency_seconds",
                        "Time between two tokens of one request.", buckets=LATENCY_BUCKETS)
        self.kv_used = make(Gauge, "glm_scheduler_kv_cache_used_tokens", "KV slots the running batch holds.")
        self.kv_capacity = make(Gauge, "glm_scheduler_kv_cache_capacity_tokens",
                                "KV slots of the pool (Warmup's max_batch_total_tokens).")
        self.resumed = make(Counter, "glm_scheduler_resumed_requests_total",
                            "Requests claimed from a dead pool and resumed.")
        self.preempted = make(Counter, "glm_scheduler_preempted_rows_total",
                              "Rows preempted because the paged KV pool was full (recomputed later).")
        self._failures = Counter("glm_scheduler_request_failures_total", "Requests ended with an error, by reason.",
                                 names + ["reason"], registry=registry)
        self._labels = labels
        self.clock = TokenClock()

    def failure(self, reason: str) -> None:
        self._failures.labels(**self._labels, reason=reason).inc()

    def observe(self, snapshot: Snapshot) -> None:
        """The cached batches' rows and KV footprint, and the waiting phases."""
        self.batch_size.set(snapshot.batch_rows)
        self.kv_used.set(snapshot.kv_slots)
        self.waiting.set(snapshot.waiting)

    def published(self, events, ended: Iterable[Outcome], now: float) -> None:
        """A ``StepOutput`` went out: inter-token gaps and failures."""
        ended = list(ended)
        with_tokens = [rid for rid, event in events if event.type == EVENT_TOKENS and event.token_ids]
        for gap in self.clock.tick(with_tokens, [o.request_id for o in ended], now):
            self.itl.observe(gap)
        for outcome in ended:
            reason = failure_reason(outcome)
            if reason:
                self.failure(reason)
