"""The scheduler's pure decision core and its text handling, with fakes (no Redis, no
workers): the KV budget is never exceeded (randomized), FIFO admission without
starvation, cancellation within one step, static / sequential modes, the wait
bound, incremental detokenization, stop texts, multi-blank filling and resuming
from published events."""

from __future__ import annotations

import random

import pytest

from model.config import EOP_ID, EOS_ID, GMASK_ID, MASK_ID
from model.kv_footprint import padded_kv_slots
from services.common.messages import Event, FinishReason, QueuedRequest
from services.scheduler.policy import BatchingMode, BatchView, Limits, Scheduler
from services.scheduler.request import Gen, RequestStatus
from services.scheduler.text import BlankText, IncrementalDecoder

# A byte-level fake tokenizer: id 20000 + b is the byte b; a few ids are words.
WORDS = {30001: " hello", 30002: " world", 30003: "\n", 30004: "END", 30005: " stop"}


def piece(t: int) -> bytes:
    if 20000 <= t < 20256:
        return bytes([t - 20000])
    if t in WORDS:
        return WORDS[t].encode()
    return f"[{t}]".encode()


def decode(ids) -> str:
    return b"".join(piece(t) for t in ids).decode("utf-8", errors="replace")


def text_ids(s: str) -> list[int]:
    return [20000 + b for b in s.encode()]


class Refused(Exception):
    pass


class FakeWorkers:
    """The workers' batch accounting (docs/architecture.md, "Shard protocol"): dense, left-padded caches whose
    footprint is ``model.kv_footprint.padded_kv_slots``; a prefill that could exceed
    the capacity is refused. ``script(row_id, k)`` gives the k-th token of a phase."""

    def __init__(self, capacity: int, script) -> None:
        self.capacity, self.script = capacity, script
        self.batches: dict[int, dict] = {}      # id -> {"width": w, "rows": {row: [allowed, generated]}}
        self.peak = 0

    def _need(self, batches) -> int:
        rows = sum(len(b["rows"]) for b in batches)
        width = max(b["width"] for b in batches)
        rem = max(a - g for b in batches for a, g in b["rows"].values())
        return padded_kv_slots(rows, width, rem)

    def _view(self, bid):
        b = self.batches.get(bid)
        if b is None or not b["rows"]:
            self.batches.pop(bid, None)
            return None
        return BatchView(bid, tuple(b["rows"]), width=b["width"], max_tokens=self._need([b]))

    def _step(self, bid):
        gens, rows = [], self.batches[bid]["rows"]
        for row in list(rows):
            allowed, generated = rows[row]
            tok = self.script(row, generated)
            rows[row][1] += 1
            finished = tok in (EOP_ID, EOS_ID) or rows[row][1] >= allowed
            reason = FinishReason.STOP if tok in (EOP_ID, EOS_ID) else FinishReason.LENGTH
            gens.append(Gen(row, tok, -0.5, (), finished, reason if finished else None))
            if finished:
                del rows[row]
        self.peak = max(self.peak, self.total())
        return gens, self._view(bid)

    def total(self) -> int:
        return sum(v.max_tokens for v in (self._view(b) for b in list(self.batches)) if v)

    def prefill(self, op):
        new = {"width": max(len(r.input_ids) + 1 + len(r.generated_ids) for r in op.requests),
               "rows": {r.row_id: [r.max_new_tokens, len(r.generated_ids)] for r in op.requests}}
        if self._need([*self.batches.values(), new]) > self.capacity:
            raise Refused()
        self.batches[op.batch_id] = new
        return self._step(op.batch_id)

    def decode(self, views):
        first = self.batches[views[0].id]
        for v in views[1:]:
            other = self.batches.pop(v.id)
            first["width"] = max(first["width"], other["width"])
            first["rows"].update(other["rows"])
        first["width"] += 1
        return self._step(views[0].id)

    def filter(self, op):
        rows = self.batches[op.batch_id]["rows"]
        for row in [r for r in rows if r not in op.keep]:
            del rows[row]
        return self._view(op.batch_id)


def run_step(core: Scheduler, workers: FakeWorkers, now: float = 0.0, log=None):
    plan = core.plan(now)
    events = list(plan.events)
    if plan.filter:
        core.filtered(workers.filter(plan.filter))
    if plan.prefill:
        gens, view = workers.prefill(plan.prefill)
        events += core.prefilled(plan.prefill, gens, view).events
        if log is not None:
            log.append(("prefill", plan.prefill.request_ids))
    batches = core.decode_batches()
    if batches:
        gens, view = workers.decode(batches)
        events += core.decoded(gens, view).events
        if log is not None:
            log.append(("decode", len(gens)))
    return plan, events


def request(rid: str, prompt=None, max_new=8, **kw) -> QueuedRequest:
    return QueuedRequest(id=rid, model="m", prompt_ids=tuple(prompt or [20100, 20101, GMASK_ID]),
                         max_new_tokens=max_new, **kw)


def make(capacity=10_000, script=None, **limits):
    limits.setdefault("max_input_tokens", 256)
    limits.setdefault("max_total_tokens", 512)
    core = Scheduler(Limits(**limits), capacity, max_sequence_length=512, decode=decode)
    return core, FakeWorkers(capacity, script or (lambda row, k: 30001))


def drain(core, workers, steps=500, now=0.0):
    events = []
    for _ in range(steps):
        if core.idle:
            return events
        events += run_step(core, workers, now)[1]
    raise AssertionError("did not finish")


def by_request(events):
    out: dict[str, list[Event]] = {}
    for rid, e in events:
        out.setdefault(rid, []).append(e)
    return out


def check_stream(events: list[Event]):
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].terminal and not any(e.terminal for e in events[:-1])


# -- budget -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_budget_is_never_exceeded_randomized(seed):
    rng = random.Random(seed)
    capacity = rng.randint(300, 1200)
    ends = {}

    def script(row, k):
        ends.setdefault(row, rng.randint(1, 40))
        return EOP_ID if k + 1 >= ends[row] else 20000 + 97 + (k % 20)

    core, workers = make(capacity, script, max_batch_size=rng.randint(1, 12),
                         max_prefill_tokens=rng.randint(200, 800), max_input_tokens=100, max_total_tokens=200,
                         waiting_served_ratio=rng.choice([0.0, 0.3, 1.2]), max_waiting_tokens=rng.randint(1, 20))
    streams: dict[str, list[Event]] = {}
    n = 0
    for step in range(5000):
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            if n < 60:
                prompt = [20100 + i for i in range(rng.randint(1, 90))] + [rng.choice([GMASK_ID, MASK_ID])]
                core.add(request(f"r{n}", prompt, max_new=rng.randint(1, 100)), 0.0)
                n += 1
        if rng.random() < 0.05 and core.request_ids():
            core.cancel(rng.choice(core.request_ids()))
        _, events = run_step(core, workers)                     # FakeWorkers raises if over budget
        for rid, e in events:
            streams.setdefault(rid, []).append(e)
        assert workers.total() <= capacity
        if n >= 60 and core.idle:
            break
    assert core.idle and len(streams) == 60
    for events in streams.values():
        check_stream(events)
    if core.limits.max_batch_size >= 6:
        assert workers.peak > capacity // 3                     # the budget was actually used


def test_admission_stops_at_first_request_that_does_not_fit_fifo():
    core, workers = make(capacity=410, max_batch_size=8)
    core.add(request("big", max_new=200), 0)
    core.add(request("a", max_new=10), 0)
    core.add(request("b", max_new=10), 0)
    plan = core.plan(0)
    assert plan.prefill.request_ids == ("big", "a")            # padded: 2 x (4 + 200) <= 410 < 3 x 204
    core2, _ = make(capacity=300, max_batch_size=8)
    core2.add(request("a", max_new=100), 0)
    core2.add(request("big", max_new=200), 0)
    core2.add(request("c", max_new=1), 0)
    assert core2.plan(0).prefill.request_ids == ("a",)         # big waits; c may not overtake it


def test_no_starvation_large_request_runs_once_batch_drains():
    core, workers = make(capacity=250, max_batch_size=8)
    log = []
    core.add(request("a", max_new=100), 0)
    for i in range(5):
        core.add(request(f"s{i}", max_new=5), 0)
    core.add(request("big", max_new=200), 0)
    core.add(request("late", max_new=5), 0)
    events = []
    while not core.idle:
        events += run_step(core, workers, log=log)[1]
    prefills = [ids for kind, ids in log if kind == "prefill"]
    flat = [r for ids in prefills for r in ids]
    assert flat.index("big") < flat.index("late")
    assert {rid for rid, _ in events} == {"a", "big", "late", *(f"s{i}" for i in range(5))}


# -- cancellation, deadline ---------------------------------------------------------------
def test_cancelled_request_leaves_at_next_step():
    core, workers = make()
    core.add(request("a", max_new=50), 0)
    core.add(request("b", max_new=50), 0)
    run_step(core, workers)
    core.cancel("a")
    plan, events = run_step(core, workers)
    assert plan.filter is not None and plan.filter.keep == (core.state("b").row_id,)
    final = [e for rid, e in events if rid == "a"]
    assert final[-1].type == "final" and final[-1].finish_reason is FinishReason.CANCELLED
    assert core.state("a") is None and all(len(v.row_ids) == 1 for v in core.decode_batches())
    assert [o.request_id for o in plan.ended] == ["a"]


def test_waiting_request_cancelled_and_deadline():
    core, workers = make(max_batch_size=1)
    core.add(request("a", max_new=50), 0)
    core.add(request("b", max_new=50), 0)
    core.add(request("c", max_new=50, deadline=10.0), 0)
    run_step(core, workers, now=1.0)
    core.cancel("b")
    plan, events = run_step(core, workers, now=11.0)
    got = {rid: e for rid, e in events if e.terminal}
    assert got["b"].finish_reason is FinishReason.CANCELLED and got["c"].type == "error"
    assert got["c"].code == "DEADLINE_EXCEEDED"


# -- modes and the wait bound ---------------------------------------------------------------
def test_static_mode_admits_only_into_an_empty_batch():
    core, workers = make(mode="static", max_batch_size=4)
    log = []
    core.add(request("a", max_new=3), 0)
    core.add(request("b", max_new=6), 0)
    run_step(core, workers, log=log)
    core.add(request("c", max_new=3), 0)
    assert core.room() == 0
    for _ in range(4):
        run_step(core, workers, log=log)
    prefills = [ids for kind, ids in log if kind == "prefill"]
    assert prefills == [("a", "b")]
    drain(core, workers)
    assert core.state("c") is None


def test_sequential_mode_runs_one_request_at_a_time():
    core, workers = make(mode="sequential", max_batch_size=8)
    log = []
    for r in "abc":
        core.add(request(r, max_new=3), 0)
    while not core.idle:
        run_step(core, workers, log=log)
    assert [ids for kind, ids in log if kind == "prefill"] == [("a",), ("b",), ("c",)]
    assert all(n <= 1 for kind, n in log if kind == "decode")


def test_wait_bound_prefill_after_max_waiting_tokens():
    core, workers = make(max_batch_size=16, waiting_served_ratio=0.5, max_waiting_tokens=4)
    for i in range(6):
        core.add(request(f"r{i}", max_new=100), 0)
    run_step(core, workers)                                   # 6 running
    core.add(request("x", max_new=5), 0)                      # 1 < 6 x 0.5 waiting: must wait
    waited = 0
    while core.state("x") is not None and core.state("x").status is RequestStatus.WAITING:
        plan, _ = run_step(core, workers)
        waited += 1
        if plan.prefill:
            break
    assert plan.prefill.request_ids == ("x",) and waited == 4
    for i in range(3):                                        # 3 >= 7 x 0.5 -> at once
        core.add(request(f"y{i}", max_new=5), 0)
    assert core.plan(0).prefill.request_ids == ("y0", "y1", "y2")


# -- text ---------------------------------------------------------------------------------
def test_incremental_decoder_holds_incomplete_utf8():
    dec = IncrementalDecoder(decode)
    out = [dec.push(t) for t in text_ids("é€!")]
    assert out == ["", "é", "", "", "€", "!"]


def test_blank_text_stop_sequence_cuts_text_and_tokens():
    bt = BlankText(decode, stops=["END"])
    rel = [bt.push(t) for t in [30001, 30002] + text_ids("EN")]
    assert "".join(r.text for r in rel) == " hello world" and sum(r.tokens for r in rel) == 2
    r = bt.push(20000 + ord("D"))
    assert r.stop == "END" and r.text == "" and r.tokens == 0 and bt.text == " hello world"
    bt = BlankText(decode, stops=["\n"])
    r = [bt.push(t) for t in [30001, 30003]]
    assert r[1].stop == "\n" and bt.text == " hello" and bt.emitted_tokens == 1


def test_blank_text_held_prefix_released_when_it_diverges():
    bt = BlankText(decode, stops=["END"])
    assert bt.push(20000 + ord("E")).text == ""
    r = bt.push(20000 + ord("x"))
    assert r.text == "Ex" and r.tokens == 2


def test_stop_sequence_request_events():
    script = lambda row, k: [30001, 30002, 30005, 30001][k]      # noqa: E731
    core, workers = make(script=script)
    core.add(request("a", max_new=10, stop=(" stop",)), 0)
    events = [e for _, e in drain(core, workers)]
    check_stream(events)
    tokens = [t for e in events if e.type == "tokens" for t in e.token_ids]
    assert tokens == [30001, 30002]
    final = events[-1]
    assert final.finish_reason is FinishReason.STOP and final.stop_sequence == " stop"
    assert final.text == " hello world"


# -- blanks, resume ------------------------------------------------------------------------
def test_multi_blank_filled_in_order_with_splice():
    script = lambda row, k: [30001, EOP_ID][k] if row == 1 else [30002, EOS_ID][k]  # noqa: E731 (phase 1, phase 2)
    core, workers = make(script=script)
    prompt = [20100, MASK_ID, 20101, MASK_ID, 20102]
    core.add(request("a", prompt, max_new=10), 0)
    events = [e for _, e in drain(core, workers)]
    check_stream(events)
    blanks = [e for e in events if e.type == "blank"]
    assert [b.text for b in blanks] == [" hello", " world"] and [b.blank for b in blanks] == [0, 1]
    final = events[-1]
    assert final.blanks == (" hello", " world")
    assert final.output_text == decode([20100, 30001, 20101, 30002, 20102])
    assert final.generated_tokens == 4
    index = [(e.index, len(e.token_ids)) for e in events if e.type == "tokens"]
    assert index == [(0, 1), (1, 1), (2, 1), (3, 1)]


def test_resume_continues_at_next_seq_without_gap_or_duplicate():
    seq = [30001, 30002, 30001, 30002, 30001, EOP_ID]
    script = lambda row, k: seq[k]                                   # noqa: E731
    full_core, w1 = make(script=script)
    full_core.add(request("a", max_new=10), 0)
    full = [e for _, e in drain(full_core, w1)]
    # A dead pool published the first three events.
    published = full[:3]
    core, w2 = make(script=lambda row, k: seq[k])
    core.add(request("a", max_new=10), 0, events=published)
    assert core.state("a").tokens == [t for e in published for t in e.token_ids]
    rest = [e for _, e in drain(core, w2)]
    assert rest[0].seq == 3
    assert [e.to_json() for e in published + rest] == [e.to_json() for e in full]


def test_resume_of_ended_request_only_acks():
    core, _ = make()
    out = core.add(request("a"), 0, events=[Event("final", 0, finish_reason="stop")])
    assert out.events == [] and [o.request_id for o in out.ended] == ["a"] and core.idle


def test_invalid_request_is_dead_lettered_with_error():
    core, _ = make()
    out = core.add(request("a", [20100, 20101]), 0)
    assert out.ended[0].dead and out.events[0][1].type == "error"
    assert out.events[0][1].code == "INVALID_ARGUMENT"


def test_worker_rejection_dead_letters_the_named_request_only():
    core, workers = make()
    core.add(request("a"), 0)
    core.add(request("b"), 0)
    plan = core.plan(0)
    bad = plan.prefill.requests[1].row_id
    out = core.prefill_refused(plan.prefill, "INVALID_ARGUMENT", "a message that names no id", bad)
    assert [(o.request_id, o.dead) for o in out.ended] == [("b", True)]
    assert core.state("a").status is RequestStatus.WAITING and not core.state("a").solo
    assert core.state("b") is None and core.plan(0).prefill.request_ids == ("a",)


def test_worker_rejection_naming_no_request_retries_each_alone():
    core, workers = make()
    for rid in "abc":
        core.add(request(rid), 0)
    plan = core.plan(0)
    out = core.prefill_refused(plan.prefill, "INVALID_ARGUMENT", f"request {plan.prefill.requests[1].row_id}: bad")
    assert out.ended == []                                    # the message is not read: no id, nobody is blamed
    assert all(core.state(rid).solo for rid in "abc")
    assert core.plan(0).prefill.request_ids == ("a",)


# -- the running batch's width ------------------------------------------------------------
def _running(width: int, max_tokens: int, capacity: int = 400):
    """A core whose running batch is request "a" (max_new 50, 2 tokens done) at the width
    and footprint the workers reported."""
    core, _ = make(capacity=capacity, max_batch_size=8, waiting_served_ratio=0.0)
    core.add(request("a", max_new=50), 0)
    op = core.plan(0).prefill
    row = op.requests[0].row_id
    view = BatchView(op.batch_id, (row,), width=width, max_tokens=max_tokens)
    core.prefilled(op, [Gen(row, 30001)], view)
    core.decoded([Gen(row, 30001)], view)
    return core


def test_admission_uses_the_width_the_workers_report():
    # b needs padded_kv_slots(2, max(width, 4), max(48, 50)) = 2 x (width + 50) <= 400: width <= 150.
    # max_tokens is only reported: a wrong one changes nothing (it used to be inverted into a width).
    for width, max_tokens, admitted in [(100, 10**6, True), (150, 0, True), (151, 10**6, False), (200, 1, False)]:
        core = _running(width, max_tokens)
        core.add(request("b", max_new=50), 0)
        plan = core.plan(0)
        assert (plan.prefill is not None and plan.prefill.request_ids == ("b",)) == admitted, width
        assert padded_kv_slots(2, width, 50) <= 400 if admitted else padded_kv_slots(2, width, 50) > 400


def test_room_counts_rows_of_the_reported_width():
    # one row of the running batch holds width + 48 slots: 400 // 148 = 2 rows fit, 400 // 248 = 1
    assert _running(100, 10**6).room() == 1
    assert _running(200, 1).room() == 0


def test_modes_are_an_enum_given_as_their_strings():
    assert Limits(mode="static").mode is BatchingMode.STATIC
    assert [m.value for m in BatchingMode] == ["continuous", "static", "sequential"]
    with pytest.raises(ValueError, match="mode must be one of continuous, static, sequential"):
        Limits(mode="greedy")


def test_finish_reasons_keep_their_json():
    event = Event("final", 3, finish_reason=FinishReason.CANCELLED)
    assert event.to_json() == '{"type":"final","seq":3,"finish_reason":"cancelled"}'
    assert Event.from_json(event.to_json()).finish_reason is FinishReason.CANCELLED
    assert Event("blank", 0, finish_reason="stop").finish_reason is FinishReason.STOP
    assert Event("tokens", 0).finish_reason is None and "finish_reason" not in Event("tokens", 0).to_json()

