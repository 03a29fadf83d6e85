"""The scheduler's decisions, pure and synchronous (``docs/architecture.md``, "Scheduler").

``Scheduler`` holds the requests of one pool and decides, step by step, which
rows leave the running batch (``FilterOp``: cancelled, past their deadline,
ended on a stop text), which waiting phases are prefilled (``PrefillOp``) and
what is decoded; it turns the workers' generations into events. The asyncio loop
(``services.scheduler.loop``) performs the calls and publishes the events.

The KV budget is the workers' own accounting, computed here by the same functions
(``model.kv_footprint``). Over paged workers (``block_size`` > 0, the default) a row
holds ``blocks_for(its tokens in KV)`` blocks: admission is by the tokens a phase has
now plus ``kv_watermark``, the admitted phases join the running step (no pause, within
``max_prefill_tokens`` tokens a step), and when the next step would not fit the newest
row is preempted (filtered out, to be prefilled again with what it generated). Over dense
workers (CUDA graphs) a batch holds ``rows x (widest row + longest remaining generation)``
slots (``padded_kv_slots``), the running batch's width being the one the workers report
(``CachedBatch.width``); a prefill pauses the running batch, so new phases are prefilled
only when enough are waiting (``waiting_served_ratio`` x running rows) or the running
batch has decoded ``max_waiting_tokens`` steps since the last prefill (TGI's rule). What
each row may still generate is counted here, from the tokens it received. Admission is
FIFO and stops at the first phase that does not fit (no request overtakes another, so
none starves).

A phase on the workers is a *row*: its ``row_id`` is the ``Request.id`` of the
shard protocol (not a tensor-parallel shard: every rank holds every row). The
loop uses only the public methods: ``add`` / ``cancel``, ``request_ids`` /
``tags`` / ``idle`` / ``room`` / ``snapshot``, then per step ``plan`` and the
replies (``filtered``, ``prefilled`` or ``prefill_refused``, ``decode_batches``
with ``request_ids_of``, ``decoded``); over paged workers ``rows_after`` and ``ahead``
say when the next Decode can be sent before the reply (``services.scheduler.ahead``).

A row the workers report failed (``RowFailure``: it failed on its own, e.g. its
sampling raised, and left their batch) ends its request at once with an INTERNAL
error carrying the workers' message, and the request goes to the dead letters:
the failure is deterministic, so no other pool retries it. Its neighbours go on.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any, Callable, Sequence

from model.config import END_IDS
from model.kv_footprint import blocks_for, padded_kv_slots
from model.limits import blanks_problem
from services.common.messages import Event, FinishReason, QueuedRequest
from services.scheduler.ahead import RunAhead
from services.scheduler.ops import (BatchingMode, BatchView, FilterOp, Limits, PrefillOp, ShardRequest, Snapshot,
                                    StepOutput, StepPlan)
from services.scheduler.request import Cancellation, Gen, Outcome, RequestState, RequestStatus
from services.scheduler.resume import Resumed, ResumeError, apply_events


class Scheduler(RunAhead):
    """The requests of one pool and the decisions of every step (see the module docstring)."""

    def __init__(self, limits: Limits, capacity: int, *, max_sequence_length: int,
                 decode: Callable[[Sequence[int]], str], block_size: int = 0) -> None:
        self.limits = limits
        self.capacity = capacity
        self.block_size = block_size                    # > 0: the workers page their KV in blocks
        self.num_blocks = capacity // block_size if block_size else 0
        self.preempted = 0                              # rows preempted to free blocks (recomputed later)
        self._row_tokens: dict[int, int] = {}           # paged: per worker row, tokens in its KV
        self.max_sequence_length = max_sequence_length
        self.decode = decode
        self._requests: dict[str, RequestState] = {}
        self._waiting: list[RequestState] = []          # sorted by arrival: FIFO over requests
        self._by_row: dict[int, RequestState] = {}      # live phases on the workers
        self._row_remaining: dict[int, int] = {}        # per worker row: tokens it may still generate
        self._row_beams: dict[int, int] = {}            # per beam-search row id: its beams (rows on the workers)
        self._running: BatchView | None = None
        self._fresh: BatchView | None = None            # prefilled this step, merged by the next decode
        self._steps_since_prefill = 0
        self._blocked_at: int | None = None             # running size when the workers refused a prefill
        self._arrivals = itertools.count()
        self._row_ids = itertools.count(1)
        self._batch_ids = itertools.count(1)

    # -- requests in ----------------------------------------------------------------------
    def add(self, req: QueuedRequest, now: float, *, tag: Any = None,
            events: Sequence[Event] = (), reject: str = "") -> StepOutput:
        """Take a request (with the events a previous pool published, when resuming it);
        ``reject`` ends it at once with an error and sends it to the dead letters (poison)."""
        out = StepOutput()
        if req.id in self._requests:
            return out                                   # delivered twice to this pool
        state = RequestState(req, self.decode, self.max_sequence_length, self.limits.max_total_tokens,
                             arrival=next(self._arrivals), tag=tag)
        self._requests[req.id] = state
        try:
            resumed = apply_events(state, events)
        except ResumeError as exc:
            return self._fail(state, "INTERNAL", f"cannot resume: {exc}", dead=True, out=out)
        if resumed is Resumed.ENDED:
            del self._requests[req.id]
            out.ended.append(Outcome(req.id, tag))
            return out
        if reject:
            return self._fail(state, "INTERNAL", reject, dead=True, out=out)
        if resumed is Resumed.FINAL_MISSING:
            self._emit(state, [state.final()], out)
            self._finish(state, Outcome(state.id, tag), out)
            return out
        problem = self._invalid(state)
        if problem:
            return self._fail(state, "INVALID_ARGUMENT", problem, dead=True, out=out)
        if req.expired(now):
            return self._fail(state, "DEADLINE_EXCEEDED", "deadline passed before the request started", out=out)
        if state.phase_complete:
            has_end = bool(state.tokens) and state.tokens[-1] in END_IDS
            self._emit(state, state.end_blank(FinishReason.STOP if has_end else FinishReason.LENGTH), out)
            self._advance(state, out)
        else:
            self._enqueue(state)
        return out

    @property
    def paged(self) -> bool:
        """The workers keep a block-paged KV pool: admitted phases join the running step."""
        return self.block_size > 0

    def _invalid(self, state: RequestState) -> str:
        if not state.mask:
            return "prompt_ids hold no mask id ([MASK] 150000, [sMASK] 150002 or [gMASK] 150001)"
        if not state.done and len(state.req.prompt_ids) + 1 > self.limits.max_input_tokens:
            return (f"prompt_ids: {len(state.req.prompt_ids)} tokens + sop exceed this pool's "
                    f"max_input_tokens {self.limits.max_input_tokens}")
        blanks = blanks_problem(state.req.prompt_ids.count(state.mask))
        if blanks:
            return f"prompt_ids: {blanks}"
        if state.req.max_new_tokens < 1:
            return f"max_new_tokens must be >= 1, got {state.req.max_new_tokens}"
        beams = _beams(state)
        if beams > self.limits.max_batch_size:
            return f"num_beams {beams} exceeds this pool's max_batch_size {self.limits.max_batch_size}"
        if state.req.beam is not None and state.req.stop:
            return "stop texts do not apply to a beam search (its candidates end on eop/eos or their length)"
        need = padded_kv_slots(beams, state.input_len, state.allowed)
        if self.paged:
            need = beams * blocks_for(state.input_len + state.allowed, self.block_size) * self.block_size
        if need > self.capacity:
            return f"needs {need} KV slots, the pool holds {self.capacity}"
        return ""

    def cancel(self, request_id: str, why: Cancellation = Cancellation.CALLER) -> bool:
        """Mark a request cancelled; it leaves at the next ``plan``. True when this call
        marked it (False: unknown, or marked already)."""
        state = self._requests.get(request_id)
        if state is None or state.cancelled is not None:
            return False
        state.cancelled = why
        return True

    # -- what the loop asks ---------------------------------------------------------------
    def request_ids(self) -> list[str]:
        """The requests this pool holds, whatever their status."""
        return list(self._requests)

    def state(self, request_id: str) -> RequestState | None:
        """A held request's state (None: not held, or ended)."""
        return self._requests.get(request_id)

    def tags(self) -> list[Any]:
        return [s.tag for s in self._requests.values() if s.tag is not None]

    @property
    def idle(self) -> bool:
        return not self._requests and self._running is None and self._fresh is None

    def snapshot(self) -> Snapshot:
        views = self.decode_batches()
        return Snapshot(requests=len(self._requests), running=len(self._by_row), waiting=len(self._waiting),
                        batch_rows=sum(v.rows for v in views), kv_slots=sum(v.max_tokens for v in views))

    def room(self) -> int:
        """How many new requests to read from the queue now (0 when the budget is full)."""
        lim = self.limits
        if lim.mode is BatchingMode.SEQUENTIAL:
            return 0 if self._requests else 1
        if lim.mode is BatchingMode.STATIC:
            return 0 if self._requests else lim.max_batch_size
        view = self._running
        rows = sum(v.rows for v in self.decode_batches())     # the running rows and those just prefilled
        free = lim.max_batch_size - rows - sum(_beams(s) for s in self._waiting)
        if view is not None and not self.paged:
            per_row = padded_kv_slots(1, view.width, self._longest_remaining(view.row_ids))
            free = min(free, self.capacity // max(1, per_row) - rows)
        return max(0, free)

    def decode_batches(self) -> list[BatchView]:
        """The cached batches the next ``Decode`` steps (merged by the workers, in this order)."""
        return [v for v in (self._running, self._fresh) if v is not None]

    def request_ids_of(self, views: Sequence[BatchView]) -> list[str]:
        """The requests whose phases are rows of ``views`` (in row order)."""
        return self.row_request_ids([r for v in views for r in v.row_ids])

    # -- one step ---------------------------------------------------------------------------
    def plan(self, now: float) -> StepPlan:
        """Start a step: rows to filter out, phases to prefill; ends cancelled requests."""
        out = StepPlan()
        for state in list(self._requests.values()):
            if state.req.expired(now) and state.cancelled is None:
                state.cancelled = Cancellation.DEADLINE
        for state in [s for s in self._waiting if s.cancelled is not None]:
            self._waiting.remove(state)
            self._end_cancelled(state, out)
        keep = self._preempt(self._plan_filter(out), out)
        phases = self._admit(keep)
        if phases:
            requests = []
            for state in phases:
                self._waiting.remove(state)
                state.status, state.row_id = RequestStatus.RUNNING, next(self._row_ids)
                self._by_row[state.row_id] = state
                self._row_remaining[state.row_id] = state.remaining
                if state.req.beam is not None:
                    self._row_beams[state.row_id] = state.req.beam.num_beams
                if self.paged:
                    self._row_tokens[state.row_id] = state.prefill_width
                requests.append(ShardRequest(
                    state.row_id, tuple(state.context), tuple(state.tokens), state.req.sampling,
                    state.allowed, state.req.min_new_tokens, state.req.top_logprobs, state.blank.mask_pos,
                    state.req.logprobs, state.req.beam))
            out.prefill = PrefillOp(next(self._batch_ids), tuple(requests), tuple(s.id for s in phases))
        return out

    def _plan_filter(self, out: StepPlan) -> list[int]:
        """Running rows to keep; ends the cancelled ones and schedules a FilterBatch."""
        if self._running is None:
            return []
        keep = []
        for row in self._running.row_ids:
            state = self._by_row.get(row)
            if state is not None and state.cancelled is not None:
                del self._by_row[row]
                self._end_cancelled(state, out)
            elif state is not None:
                keep.append(row)
        if len(keep) < self._running.size:
            out.filter = FilterOp(self._running.id, tuple(keep))
        return keep

    def _blocks_after_step(self, rows: Sequence[int]) -> int:
        """Blocks ``rows`` hold once the next step has fed each its pending token (a beam search
        counts each beam's whole sequence: an upper bound, its beams share the context)."""
        return sum(self._row_beams.get(r, 1) * blocks_for(self._row_tokens[r] + 1, self.block_size) for r in rows)

    def _forget_row(self, row: int) -> None:
        """A worker row left: forget what is counted of it (remaining tokens, KV tokens, beams)."""
        self._row_remaining.pop(row, None)
        self._row_tokens.pop(row, None)
        self._row_beams.pop(row, None)

    def _worker_rows(self, rows: Sequence[int]) -> int:
        """The workers' rows of ``rows`` (a beam search holds one per beam)."""
        return sum(self._row_beams.get(r, 1) for r in rows)

    def _preempt(self, keep: list[int], out: StepPlan) -> list[int]:
        """Paged: while the running rows' next step does not fit the pool, the most recently
        admitted row leaves (its blocks are freed by the FilterBatch) and waits again with what
        it generated; it is prefilled again later (recomputed), as a resumed request is."""
        if not self.paged or not keep or self._blocks_after_step(keep) <= self.num_blocks:
            return keep
        keep = list(keep)
        while len(keep) > 1 and self._blocks_after_step(keep) > self.num_blocks:
            row = max(keep)                              # row ids grow with admission
            keep.remove(row)
            state = self._by_row.pop(row)
            self._forget_row(row)
            self._enqueue(state)
            self.preempted += 1
        out.filter = FilterOp(self._running.id, tuple(keep))
        return keep

    def _longest_remaining(self, rows: Sequence[int]) -> int:
        return max((self._row_remaining.get(r, 0) for r in rows), default=0)

    def _admission_closed(self, rows: int) -> bool:
        """No phase joins ``rows`` running rows: none waits, the mode admits only into an idle
        pool, or the workers refused a prefill at this batch size (``_blocked_at``)."""
        return (not self._waiting or (self.limits.mode is not BatchingMode.CONTINUOUS and rows > 0)
                or (self._blocked_at is not None and rows > 0 and rows >= self._blocked_at))

    def _admit(self, keep: list[int]) -> list[RequestState]:
        if self._admission_closed(len(keep)):
            return []
        self._blocked_at = None
        return self._admissible(keep)

    def _admissible(self, keep: list[int]) -> list[RequestState]:
        """The waiting phases the plan admits beside the rows ``keep`` (admission open)."""
        lim = self.limits
        rows = len(keep)
        max_rows = 1 if lim.mode is BatchingMode.SEQUENTIAL else lim.max_batch_size
        if self.paged:
            return self._admit_paged(keep, max_rows)
        width = self._running.width if self._running is not None and rows else 0
        longest = self._longest_remaining(keep)
        take: list[RequestState] = []
        new_width, taken = 0, self._worker_rows(keep)
        for state in self._waiting:
            if (rows or take) and taken + _beams(state) > max_rows or (take and (state.solo or take[0].solo)):
                break
            w = max(new_width, state.prefill_width)
            if take and (len(take) + 1) * w > lim.max_prefill_tokens:
                break
            need = padded_kv_slots(taken + _beams(state), max(width, w), max(longest, state.remaining))
            if need > self.capacity:
                break
            take.append(state)
            new_width, taken = w, taken + _beams(state)
            longest = max(longest, state.remaining)
        min_size = 1
        if lim.mode is BatchingMode.CONTINUOUS and rows and self._steps_since_prefill < lim.max_waiting_tokens:
            min_size = max(1, int(rows * lim.waiting_served_ratio))
        return take if len(take) >= min_size else []

    def _admit_paged(self, keep: list[int], max_rows: int) -> list[RequestState]:
        """Paged admission: FIFO while a row is free, the step's tokens (one per running row plus
        the prompts admitted) stay within ``max_prefill_tokens`` (the first phase always passes)
        and the blocks after the step leave ``kv_watermark`` of the pool free (an empty pool
        takes any phase that fits it): by the tokens a phase has now, not its max_new_tokens."""
        rows, used = self._worker_rows(keep), self._blocks_after_step(keep)
        limit = self.num_blocks - max(1, int(self.num_blocks * self.limits.kv_watermark))
        take: list[RequestState] = []
        tokens = taken = rows
        for state in self._waiting:
            beams = _beams(state)
            if (rows or take) and taken + beams > max_rows or (take and (state.solo or take[0].solo)):
                break
            n = state.prefill_width
            if take and tokens + n > self.limits.max_prefill_tokens:
                break
            # a beam search forks into its beams at its first step: count them (an upper bound)
            blocks = blocks_for(n, self.block_size) if beams == 1 else beams * blocks_for(n + 1, self.block_size)
            if used + blocks > (limit if rows or take else self.num_blocks):
                break
            take.append(state)
            used, tokens, taken = used + blocks, tokens + n, taken + beams
        return take

    # -- replies ------------------------------------------------------------------------------
    def filtered(self, view: BatchView | None) -> None:
        if self._running is not None:
            for row in self._running.row_ids:
                if view is None or row not in view.row_ids:
                    self._forget_row(row)
        self._running = view

    def prefilled(self, op: PrefillOp, gens: Sequence[Gen], view: BatchView | None,
                  failed: Sequence[tuple[int, str]] = ()) -> StepOutput:
        """The workers prefilled ``op``: ``gens`` per row, ``failed`` (row id, message) rows
        that failed on their own and left the batch. Paged, with nothing running, the new batch
        is the running one at once: the next plan's filter and admission count its rows."""
        self._steps_since_prefill = 0
        if self.paged and self._running is None:
            self._running = view
        else:
            self._fresh = view
        return self._rows_failed(failed).merge(self._apply(gens))

    def prefill_refused(self, op: PrefillOp, code: str, message: str,
                        refused_row_id: int | None = None) -> StepOutput:
        """The workers refused a prefill. INVALID_ARGUMENT: the row they named
        (``refused_row_id``) is poison (the others retry one by one when none is named);
        RESOURCE_EXHAUSTED: retry once the running batch shrinks."""
        out = StepOutput()
        states = [self._by_row.pop(r.row_id) for r in op.requests if r.row_id in self._by_row]
        for state in states:
            self._forget_row(state.row_id)
            if code == "INVALID_ARGUMENT" and (state.row_id == refused_row_id or len(states) == 1):
                self._fail(state, code, f"the workers rejected the request: {message}", dead=True, out=out)
            elif code == "RESOURCE_EXHAUSTED" and self._running is None:
                self._fail(state, code, f"the workers have no room for the request: {message}", out=out)
            else:
                state.solo = state.solo or (code == "INVALID_ARGUMENT" and refused_row_id is None)
                self._enqueue(state)
        if code == "RESOURCE_EXHAUSTED" and self._running is not None:
            self._blocked_at = self._running.size
        return out

    def decoded(self, gens: Sequence[Gen], view: BatchView | None,
                failed: Sequence[tuple[int, str]] = (), admitted: PrefillOp | None = None) -> StepOutput:
        """The workers decoded one step (with ``admitted``: and prefilled those phases in the
        same forward, paged): as ``prefilled``."""
        for v in self.decode_batches():
            for row in v.row_ids:
                if row in self._row_tokens:
                    self._row_tokens[row] += 1            # each fed its pending token
        self._running, self._fresh = view, None
        self._steps_since_prefill = 0 if admitted is not None else self._steps_since_prefill + 1
        return self._rows_failed(failed).merge(self._apply(gens))

    def _rows_failed(self, failed: Sequence[tuple[int, str]]) -> StepOutput:
        """End the requests of rows that failed on the workers: an error, then the dead letters."""
        out = StepOutput()
        for row_id, message in failed:
            self._forget_row(row_id)
            state = self._by_row.get(row_id)
            if state is None or state.status is not RequestStatus.RUNNING:
                continue                                   # it had left already (a stop text)
            self._fail(state, "INTERNAL", f"the workers failed on this request (not retried): {message}",
                       dead=True, out=out)
        return out

    def fail_all(self, code: str, message: str) -> StepOutput:
        """Give every request an error (used when the pool shuts down on purpose)."""
        out = StepOutput()
        for state in list(self._requests.values()):
            self._fail(state, code, message, out=out)
        return out

    # -- internals --------------------------------------------------------------------------
    def _apply(self, gens: Sequence[Gen]) -> StepOutput:
        out = StepOutput()
        for gen in gens:
            if gen.row_id in self._row_remaining:
                self._row_remaining[gen.row_id] -= 1
                if gen.finished:
                    self._forget_row(gen.row_id)
            state = self._by_row.get(gen.row_id)
            if state is None or state.status is not RequestStatus.RUNNING:
                continue                                   # left on a stop text; filtered next step
            events, ended = state.on_token(gen)
            self._emit(state, events, out)
            if ended:
                del self._by_row[gen.row_id]
                self._advance(state, out)
        return out

    def _advance(self, state: RequestState, out: StepOutput) -> None:
        """A blank ended: queue the next blank, or end the request."""
        while state.next_phase():
            if state.allowed > 0:
                self._enqueue(state)
                return
            self._emit(state, state.end_blank(FinishReason.LENGTH), out)
        self._emit(state, [state.final()], out)
        self._finish(state, Outcome(state.id, state.tag), out)

    def _enqueue(self, state: RequestState) -> None:
        state.status = RequestStatus.WAITING
        keys = [s.arrival for s in self._waiting]
        self._waiting.insert(bisect.bisect(keys, state.arrival), state)

    def _end_cancelled(self, state: RequestState, out: StepOutput) -> None:
        if state.cancelled is Cancellation.DEADLINE:
            self._fail(state, "DEADLINE_EXCEEDED", "the request passed its deadline", out=out)
            return
        self._emit(state, [state.cancelled_final()], out)
        self._finish(state, Outcome(state.id, state.tag), out)

    def _fail(self, state: RequestState, code: str, message: str, *, dead: bool = False,
              out: StepOutput) -> StepOutput:
        if state in self._waiting:
            self._waiting.remove(state)
        self._by_row.pop(state.row_id, None)
        self._emit(state, [state.error(code, message)], out)
        self._finish(state, Outcome(state.id, state.tag, code, message, dead), out)
        return out

    def _finish(self, state: RequestState, outcome: Outcome, out: StepOutput) -> None:
        state.status = RequestStatus.DONE
        self._requests.pop(state.id, None)
        out.ended.append(outcome)

    @staticmethod
    def _emit(state: RequestState, events: Sequence[Event], out: StepOutput) -> None:
        out.events.extend((state.id, e) for e in events)


def _beams(state: RequestState) -> int:
    """The workers' rows a phase of ``state`` holds: its beams, or one."""
    return state.req.beam.num_beams if state.req.beam is not None else 1
