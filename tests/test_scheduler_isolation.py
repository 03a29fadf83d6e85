"""The scheduler's core when a request fails on the workers or fills many blanks, with
the fakes of ``tests/test_scheduler_policy.py`` (no Redis, no workers): a row the
workers report failed ends its request alone (INTERNAL error, dead-lettered at once)
while its neighbours finish; generated [MASK] ids never reopen a blank, so
"x [MASK] " x 100 ends; more blanks than ``model.limits.MAX_BLANKS`` are refused."""

from __future__ import annotations

import pytest

from model.config import EOP_ID, EOS_ID, MASK_ID
from model.limits import MAX_BLANKS
from tests.test_scheduler_policy import FakeWorkers, by_request, check_stream, drain, make, request


class FailingWorkers(FakeWorkers):
    """``FakeWorkers`` whose sampling fails for the rows of ``poisoned`` requests at their
    ``fail_at``-th token: the row leaves the batch and the step reports it failed."""

    def __init__(self, capacity, script, core, poisoned, fail_at):
        super().__init__(capacity, script)
        self.core, self.poisoned, self.fail_at, self.failed = core, poisoned, fail_at, []

    def _step(self, bid):
        rows = self.batches[bid]["rows"]
        self.failed = []
        for row, (_, generated) in list(rows.items()):
            owner = next((s for s in map(self.core.state, self.core.request_ids()) if s.row_id == row), None)
            if owner is not None and owner.id in self.poisoned and generated >= self.fail_at:
                del rows[row]
                self.failed.append((row, "sampling failed: RuntimeError: probability tensor contains nan"))
        return super()._step(bid)


@pytest.mark.parametrize("fail_at", [0, 3], ids=["prefill", "decode"])
def test_a_failed_row_ends_its_request_alone_and_dead_letters_it(fail_at):
    core, _ = make()
    workers = FailingWorkers(10_000, lambda row, k: 30001, core, {"bad"}, fail_at)
    for rid in ("a", "bad", "b"):
        core.add(request(rid, max_new=6), 0)
    events, ended = [], []
    for _ in range(50):
        if core.idle:
            break
        plan = core.plan(0)
        events += plan.events
        if plan.filter:
            core.filtered(workers.filter(plan.filter))
        if plan.prefill:
            gens, view = workers.prefill(plan.prefill)
            out = core.prefilled(plan.prefill, gens, view, workers.failed)
            events, ended = events + out.events, ended + out.ended
        if core.decode_batches():
            gens, view = workers.decode(core.decode_batches())
            out = core.decoded(gens, view, workers.failed)
            events, ended = events + out.events, ended + out.ended
    assert core.idle
    streams = by_request(events)
    for rid in ("a", "b", "bad"):
        check_stream(streams[rid])
    assert [e.type for e in streams["a"]][-1] == "final" and streams["a"][-1].generated_tokens == 6
    assert [e.type for e in streams["b"]][-1] == "final" and streams["b"][-1].generated_tokens == 6
    error = streams["bad"][-1]
    assert error.type == "error" and error.code == "INTERNAL" and "probability tensor" in error.message
    assert [(o.request_id, o.dead) for o in ended if o.code] == [("bad", True)]


@pytest.mark.parametrize("max_new", [1, 3])
def test_generated_masks_never_reopen_a_blank(max_new):
    """"x [MASK] " x 100 on workers that only ever generate [MASK]: the request fills the
    prompt's 100 blanks and ends (each phase fills the mask after the previous content)."""
    core, workers = make(script=lambda row, k: MASK_ID, max_input_tokens=400, max_total_tokens=512)
    prompt = [20000 + ord("x"), 20000 + ord(" "), MASK_ID] * 100 + [EOS_ID]
    core.add(request("x", prompt, max_new=max_new), 0)
    seen_positions = []
    events = []
    for _ in range(1000):
        if core.idle:
            break
        plan = core.plan(0)
        if plan.prefill:
            seen_positions += [r.mask_position for r in plan.prefill.requests]
        events += plan.events
        if plan.prefill:
            gens, view = workers.prefill(plan.prefill)
            events += core.prefilled(plan.prefill, gens, view).events
        if core.decode_batches():
            gens, view = workers.decode(core.decode_batches())
            events += core.decoded(gens, view).events
    assert core.idle
    stream = [e for _, e in events]
    check_stream(stream)
    assert stream[-1].type == "final" and len(stream[-1].blanks) == 100
    assert stream[-1].generated_tokens == 100 * max_new
    assert seen_positions == [2 + k * (2 + max_new) for k in range(100)]    # always the prompt's next mask


def test_more_blanks_than_the_limit_are_dead_lettered():
    core, _ = make(max_input_tokens=600, max_total_tokens=700)
    out = core.add(request("many", [20100, MASK_ID] * (MAX_BLANKS + 1), max_new=1), 0)
    assert out.ended[0].dead and out.events[0][1].code == "INVALID_ARGUMENT"
    assert f"at most {MAX_BLANKS}" in out.events[0][1].message


def test_a_resumed_request_keeps_generated_masks_as_content():
    """A dead pool published blank 0, whose content is a generated [MASK]: the pool that
    resumes the request fills the prompt's second mask next, not the generated one."""
    prompt = [20100, MASK_ID, 20101, MASK_ID, 20102]
    script = lambda row, k: [MASK_ID, EOP_ID][k]                   # noqa: E731
    full_core, w1 = make(script=script)
    full_core.add(request("a", prompt, max_new=4), 0)
    full = [e for _, e in drain(full_core, w1)]
    first_blank = next(i for i, e in enumerate(full) if e.type == "blank")
    core, w2 = make(script=script)
    core.add(request("a", prompt, max_new=4), 0, events=full[:first_blank + 1])
    plan = core.plan(0)
    assert [r.mask_position for r in plan.prefill.requests] == [3]
    assert core.state("a").context == [20100, MASK_ID, 20101, MASK_ID, 20102]
    gens, view = w2.prefill(plan.prefill)
    rest = core.prefilled(plan.prefill, gens, view).events + drain(core, w2)
    assert [e.to_json() for e in full[:first_blank + 1]] + [e.to_json() for _, e in rest] == \
        [e.to_json() for e in full]
    assert full[-1].type == "final" and len(full[-1].blanks) == 2
