"""The scheduler's decisions, pure and synchronous (DESIGN §7; STYLE habit 2).

``Scheduler`` holds the requests of one pool and decides, step by step, which
rows leave the running batch (``FilterOp``: cancelled, past their deadline,
ended on a stop text), which waiting phases are prefilled (``PrefillOp``) and
what is decoded; it turns the workers' generations into events. The asyncio loop
(``services.scheduler.loop``) performs the calls and publishes the events.

The KV budget mirrors the workers' own check (``docs/worker.md``): the cache is
dense and left-padded, so a batch holds ``rows x (widest row + longest remaining
generation)`` slots; ``input + max_new_tokens`` of every request is bounded by
it. The running batch's shape comes from its ``CachedBatch.max_tokens``.
Admission is FIFO and stops at the first phase that does not fit (no request
overtakes another, so none starves). In ``continuous`` mode a prefill pauses the
running batch, so new phases are prefilled only when enough are waiting
(``waiting_served_ratio`` x running rows) or the running batch has decoded
``max_waiting_tokens`` steps since the last prefill (TGI's rule).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from model.config import END_IDS
from services.common.messages import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Event, QueuedRequest, Sampling
from services.scheduler.request import DONE, RUNNING, WAITING, Gen, Outcome, RequestState
from services.scheduler.resume import ENDED, FINAL_MISSING, ResumeError, apply_events

MODES = ("continuous", "static", "sequential")
DEADLINE = "deadline"


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = 32
    max_input_tokens: int = 1024       # context + sop of one request
    max_total_tokens: int = 2048       # input + new tokens of one request (new tokens are clamped)
    max_prefill_tokens: int = 4096     # padded rows x width of one prefill (one phase always passes)
    max_waiting_tokens: int = 20       # decode steps after which waiting phases are forced in
    waiting_served_ratio: float = 0.3  # waiting phases per running row that justify a prefill
    mode: str = "continuous"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("max_batch_size", "max_input_tokens", "max_total_tokens", "max_prefill_tokens",
                     "max_waiting_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_input_tokens < self.max_total_tokens:
            raise ValueError(f"max_input_tokens ({self.max_input_tokens}) must be < max_total_tokens "
                             f"({self.max_total_tokens})")
        if self.waiting_served_ratio < 0:
            raise ValueError(f"waiting_served_ratio must be >= 0, got {self.waiting_served_ratio}")


@dataclass(frozen=True)
class BatchView:
    """A cached batch on the workers (``CachedBatch``)."""

    id: int
    shard_ids: tuple[int, ...]
    max_tokens: int

    @property
    def size(self) -> int:
        return len(self.shard_ids)


@dataclass(frozen=True)
class ShardRequest:
    """One phase as the workers get it (``shard.proto`` ``Request``)."""

    shard_id: int
    input_ids: tuple[int, ...]
    generated_ids: tuple[int, ...]
    sampling: Sampling
    max_new_tokens: int
    min_new_tokens: int
    top_logprobs: int


@dataclass(frozen=True)
class PrefillOp:
    batch_id: int
    requests: tuple[ShardRequest, ...]
    request_ids: tuple[str, ...]

    @property
    def tokens(self) -> int:
        return len(self.requests) * max(len(r.input_ids) + 1 + len(r.generated_ids) for r in self.requests)


@dataclass(frozen=True)
class FilterOp:
    batch_id: int
    keep: tuple[int, ...]


@dataclass
class StepOutput:
    """Events to append (request id, event), in order, and the requests that ended."""

    events: list[tuple[str, Event]] = field(default_factory=list)
    ended: list[Outcome] = field(default_factory=list)

    def merge(self, other: "StepOutput") -> "StepOutput":
        self.events += other.events
        self.ended += other.ended
        return self


@dataclass
class StepPlan(StepOutput):
    filter: FilterOp | None = None
    prefill: PrefillOp | None = None


class Scheduler:
    def __init__(self, limits: Limits, capacity: int, *, max_sequence_length: int,
                 decode: Callable[[Sequence[int]], str]) -> None:
        self.limits = limits
        self.capacity = capacity
        self.max_sequence_length = max_sequence_length
        self.decode = decode
        self.requests: dict[str, RequestState] = {}
        self.waiting: list[RequestState] = []          # sorted by arrival: FIFO over requests
        self.by_shard: dict[int, RequestState] = {}     # live phases on the workers
        self.shard_remaining: dict[int, int] = {}       # per worker row: tokens it may still generate
        self.running: BatchView | None = None
        self.fresh: BatchView | None = None             # prefilled this step, merged by the next decode
        self.steps_since_prefill = 0
        self.blocked_at: int | None = None              # running size when the workers refused a prefill
        self._arrivals = itertools.count()
        self._shard_ids = itertools.count(1)
        self._batch_ids = itertools.count(1)

    # -- requests in ----------------------------------------------------------------------
    def add(self, req: QueuedRequest, now: float, *, tag: Any = None,
            events: Sequence[Event] = (), reject: str = "") -> StepOutput:
        """Take a request (with the events a previous pool published, when resuming it);
        ``reject`` ends it at once with an error and sends it to the dead letters (poison)."""
        out = StepOutput()
        if req.id in self.requests:
            return out                                   # delivered twice to this pool
        state = RequestState(req, self.decode, self.max_sequence_length, self.limits.max_total_tokens,
                             arrival=next(self._arrivals), tag=tag)
        self.requests[req.id] = state
        try:
            resumed = apply_events(state, events)
        except ResumeError as exc:
            return self._fail(state, "INTERNAL", f"cannot resume: {exc}", dead=True, out=out)
        if resumed == ENDED:
            del self.requests[req.id]
            out.ended.append(Outcome(req.id, tag))
            return out
        if reject:
            return self._fail(state, "INTERNAL", reject, dead=True, out=out)
        if resumed == FINAL_MISSING:
            self._emit(state, [state.final()], out)
            self._finish(state, Outcome(state.id, tag), out)
            return out
        problem = self._invalid(state)
        if problem:
            return self._fail(state, "INVALID_ARGUMENT", problem, dead=True, out=out)
        if req.deadline and now > req.deadline:
            return self._fail(state, "DEADLINE_EXCEEDED", "deadline passed before the request started", out=out)
        if state.phase_complete:
            has_end = bool(state.tokens) and state.tokens[-1] in END_IDS
            self._emit(state, state.end_blank(FINISH_STOP if has_end else FINISH_LENGTH), out)
            self._advance(state, out)
        else:
            self._enqueue(state)
        return out

    def _invalid(self, state: RequestState) -> str:
        if not state.mask:
            return "prompt_ids hold no mask id ([MASK] 150000, [sMASK] 150002 or [gMASK] 150001)"
        if not state.done and len(state.req.prompt_ids) + 1 > self.limits.max_input_tokens:
            return (f"prompt_ids: {len(state.req.prompt_ids)} tokens + sop exceed this pool's "
                    f"max_input_tokens {self.limits.max_input_tokens}")
        if state.req.max_new_tokens < 1:
            return f"max_new_tokens must be >= 1, got {state.req.max_new_tokens}"
        if state.input_len + state.allowed > self.capacity:
            return f"needs {state.input_len + state.allowed} KV slots, the pool holds {self.capacity}"
        return ""

    def cancel(self, request_id: str, reason: str = FINISH_CANCELLED) -> None:
        """Mark a request cancelled; it leaves at the next ``plan``."""
        state = self.requests.get(request_id)
        if state is not None and not state.cancelled:
            state.cancelled = reason

    # -- what the loop asks ---------------------------------------------------------------
    def ids(self) -> list[str]:
        return list(self.requests)

    def tags(self) -> list[Any]:
        return [s.tag for s in self.requests.values() if s.tag is not None]

    @property
    def idle(self) -> bool:
        return not self.requests and self.running is None and self.fresh is None

    def room(self) -> int:
        """How many new requests to read from the queue now (0 when the budget is full)."""
        lim = self.limits
        if lim.mode == "sequential":
            return 0 if self.requests else 1
        if lim.mode == "static":
            return 0 if self.requests else lim.max_batch_size
        rows = self.running.size if self.running else 0
        free = lim.max_batch_size - rows - len(self.waiting)
        if self.running is not None:
            per_row = self.running.max_tokens // max(1, rows)
            free = min(free, self.capacity // max(1, per_row) - rows)
        return max(0, free)

    # -- one step ---------------------------------------------------------------------------
    def plan(self, now: float) -> StepPlan:
        """Start a step: rows to filter out, phases to prefill; ends cancelled requests."""
        out = StepPlan()
        for state in list(self.requests.values()):
            if state.req.deadline and now > state.req.deadline and not state.cancelled:
                state.cancelled = DEADLINE
        for state in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(state)
            self._end_cancelled(state, out)
        keep = self._plan_filter(out)
        phases = self._admit(keep)
        if phases:
            requests = []
            for state in phases:
                self.waiting.remove(state)
                state.status, state.shard_id = RUNNING, next(self._shard_ids)
                self.by_shard[state.shard_id] = state
                self.shard_remaining[state.shard_id] = state.remaining
                requests.append(ShardRequest(
                    state.shard_id, tuple(state.context), tuple(state.tokens), state.req.sampling,
                    state.allowed, state.req.min_new_tokens, state.req.top_logprobs))
            out.prefill = PrefillOp(next(self._batch_ids), tuple(requests), tuple(s.id for s in phases))
        return out

    def _plan_filter(self, out: StepPlan) -> list[int]:
        """Running rows to keep; ends the cancelled ones and schedules a FilterBatch."""
        if self.running is None:
            return []
        keep = []
        for sid in self.running.shard_ids:
            state = self.by_shard.get(sid)
            if state is not None and state.cancelled:
                del self.by_shard[sid]
                self._end_cancelled(state, out)
            elif state is not None:
                keep.append(sid)
        if len(keep) < self.running.size:
            out.filter = FilterOp(self.running.id, tuple(keep))
        return keep

    def _running_shape(self, keep: list[int]) -> tuple[int, int]:
        """(cache width, longest remaining of the kept rows) of the running batch."""
        view = self.running
        if view is None:
            return 0, 0
        longest = max(self.shard_remaining.get(sid, 0) for sid in view.shard_ids)
        width = view.max_tokens // view.size - longest
        return width, max((self.shard_remaining.get(sid, 0) for sid in keep), default=0)

    def _admit(self, keep: list[int]) -> list[RequestState]:
        lim = self.limits
        if not self.waiting:
            return []
        rows = len(keep)
        if lim.mode in ("static", "sequential") and rows:
            return []
        if self.blocked_at is not None and rows and rows >= self.blocked_at:
            return []
        self.blocked_at = None
        max_rows = 1 if lim.mode == "sequential" else lim.max_batch_size
        width, longest = self._running_shape(keep)
        take: list[RequestState] = []
        new_width = 0
        for state in self.waiting:
            if rows + len(take) >= max_rows or (take and (state.solo or take[0].solo)):
                break
            w = max(new_width, state.prefill_width)
            if take and (len(take) + 1) * w > lim.max_prefill_tokens:
                break
            need = (rows + len(take) + 1) * (max(width, w) + max(longest, state.remaining))
            if need > self.capacity:
                break
            take.append(state)
            new_width = w
            longest = max(longest, state.remaining)
        min_size = 1
        if lim.mode == "continuous" and rows and self.steps_since_prefill < lim.max_waiting_tokens:
            min_size = max(1, int(rows * lim.waiting_served_ratio))
        return take if len(take) >= min_size else []

    # -- replies ------------------------------------------------------------------------------
    def filtered(self, view: BatchView | None) -> None:
        if self.running is not None:
            for sid in self.running.shard_ids:
                if view is None or sid not in view.shard_ids:
                    self.shard_remaining.pop(sid, None)
        self.running = view

    def prefilled(self, op: PrefillOp, gens: Sequence[Gen], view: BatchView | None) -> StepOutput:
        self.steps_since_prefill = 0
        self.fresh = view
        return self._apply(gens)

    def prefill_refused(self, op: PrefillOp, code: str, message: str, shard_id: int | None = None) -> StepOutput:
        """The workers refused a prefill. INVALID_ARGUMENT: the named request is poison (the
        others retry one by one when none is named); RESOURCE_EXHAUSTED: retry once the
        running batch shrinks."""
        out = StepOutput()
        states = [self.by_shard.pop(r.shard_id) for r in op.requests if r.shard_id in self.by_shard]
        for state in states:
            self.shard_remaining.pop(state.shard_id, None)
            if code == "INVALID_ARGUMENT" and (state.shard_id == shard_id or len(states) == 1):
                self._fail(state, code, f"the workers rejected the request: {message}", dead=True, out=out)
            elif code == "RESOURCE_EXHAUSTED" and self.running is None:
                self._fail(state, code, f"the workers have no room for the request: {message}", out=out)
            else:
                state.solo = state.solo or (code == "INVALID_ARGUMENT" and shard_id is None)
                self._enqueue(state)
        if code == "RESOURCE_EXHAUSTED" and self.running is not None:
            self.blocked_at = self.running.size
        return out

    def decode_batches(self) -> list[BatchView]:
        return [v for v in (self.running, self.fresh) if v is not None]

    def decoded(self, gens: Sequence[Gen], view: BatchView | None) -> StepOutput:
        self.running, self.fresh = view, None
        self.steps_since_prefill += 1
        return self._apply(gens)

    def fail_all(self, code: str, message: str) -> StepOutput:
        """Give every request an error (used when the pool shuts down on purpose)."""
        out = StepOutput()
        for state in list(self.requests.values()):
            self._fail(state, code, message, out=out)
        return out

    # -- internals --------------------------------------------------------------------------
    def _apply(self, gens: Sequence[Gen]) -> StepOutput:
        out = StepOutput()
        for gen in gens:
            if gen.shard_id in self.shard_remaining:
                self.shard_remaining[gen.shard_id] -= 1
                if gen.finished:
                    del self.shard_remaining[gen.shard_id]
            state = self.by_shard.get(gen.shard_id)
            if state is None or state.status != RUNNING:
                continue                                   # left on a stop text; filtered next step
            events, ended = state.on_token(gen)
            self._emit(state, events, out)
            if ended:
                del self.by_shard[gen.shard_id]
                self._advance(state, out)
        return out

    def _advance(self, state: RequestState, out: StepOutput) -> None:
        """A blank ended: queue the next blank, or end the request."""
        while state.next_phase():
            if state.allowed > 0:
                state.status = WAITING
                self._enqueue(state)
                return
            self._emit(state, state.end_blank(FINISH_LENGTH), out)
        self._emit(state, [state.final()], out)
        self._finish(state, Outcome(state.id, state.tag), out)

    def _enqueue(self, state: RequestState) -> None:
        state.status = WAITING
        keys = [s.arrival for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, state.arrival), state)

    def _end_cancelled(self, state: RequestState, out: StepOutput) -> None:
        if state.cancelled == DEADLINE:
            self._fail(state, "DEADLINE_EXCEEDED", "the request passed its deadline", out=out)
            return
        self._emit(state, [state.cancelled_final()], out)
        self._finish(state, Outcome(state.id, state.tag), out)

    def _fail(self, state: RequestState, code: str, message: str, *, dead: bool = False,
              out: StepOutput) -> StepOutput:
        if state in self.waiting:
            self.waiting.remove(state)
        self.by_shard.pop(state.shard_id, None)
        self._emit(state, [state.error(code, message)], out)
        self._finish(state, Outcome(state.id, state.tag, code, message, dead), out)
        return out

    def _finish(self, state: RequestState, outcome: Outcome, out: StepOutput) -> None:
        state.status = DONE
        self.requests.pop(state.id, None)
        out.ended.append(outcome)

    @staticmethod
    def _emit(state: RequestState, events: Sequence[Event], out: StepOutput) -> None:
        out.events.extend((state.id, e) for e in events)
