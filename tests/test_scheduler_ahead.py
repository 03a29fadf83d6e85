"""Steps sent ahead (``services.scheduler.ahead``): the core says when the next Decode may be
sent before the reply of the one in flight, and a loop that sends it then gives every
request exactly the events of a loop that plans every step after the reply. The fake
paged workers of ``test_scheduler_paged`` run a step sent ahead as the ranks do: on the
batch the step before returned, skipping it when that step emptied it."""

from __future__ import annotations

import random

import pytest

from model.config import GMASK_ID, MASK_ID
from services.common.messages import EVENT_FINAL, Event, QueuedRequest
from services.scheduler.request import Cancellation
from tests.test_scheduler_paged import make, run_step, text
from tests.test_scheduler_policy import check_stream


def step_ahead(workers):
    """The workers' step sent ahead: the batch they hold now, by id; none left: an empty reply."""
    if not workers.rows:
        return [], None
    return workers.step([workers.view()], None)


class AheadLoop:
    """``PoolLoop._step`` over fake workers: a Decode sent ahead whenever the core allows it."""

    def __init__(self, core, workers) -> None:
        self.core, self.workers = core, workers
        self.pending = None               # (reply, rows after it) of the step sent ahead
        self.sent_ahead = 0

    def step(self, now: float = 0.0) -> list:
        core, workers = self.core, self.workers
        events = []
        if self.pending is None:
            plan = core.plan(now)
            events += plan.events
            if plan.filter:
                core.filtered(workers.filter(plan.filter))
            batches = core.decode_batches()
            if not batches and plan.prefill is None:
                return events
            reply, op = workers.step(batches, plan.prefill), plan.prefill
            rows = core.rows_after(batches) if batches and op is None else None
        else:
            (reply, rows), op, self.pending = self.pending, None, None
        if rows is not None:
            after = core.ahead(rows, now)
            if after is not None:          # the workers run it right after the step before
                self.pending = (step_ahead(workers), after)
                self.sent_ahead += 1
        gens, view = reply
        events += core.decoded(gens, view, admitted=op).events
        return events


def request(rid, prompt, max_new, stop=()):
    return QueuedRequest(id=rid, model="m", prompt_ids=tuple(prompt), max_new_tokens=max_new, stop=stop)


def serve(seed: int, ahead: bool):
    """40 random requests (some with a stop text) arriving over time on a random pool: every
    request's events and the loop."""
    rng = random.Random(seed)
    num_blocks = rng.randint(29, 60)
    core, workers = make(num_blocks, text, max_batch_size=rng.randint(2, 16),
                         max_prefill_tokens=rng.randint(40, 200), max_input_tokens=60, max_total_tokens=120)
    loop = AheadLoop(core, workers)
    streams: dict[str, list[Event]] = {}
    n = 0
    for _ in range(20_000):
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            if n < 40:
                prompt = [20100 + rng.randint(0, 50) for _ in range(rng.randint(1, 40))]
                prompt.append(rng.choice([GMASK_ID, MASK_ID]))
                stop = (rng.choice("abcdefghijklmnopqrstuvwxyz"),) if rng.random() < 0.3 else ()
                core.add(request(f"r{n}", prompt, rng.randint(1, 70), stop), 0.0)
                n += 1
        events = loop.step() if ahead else run_step(core, workers)[1]
        for rid, e in events:
            streams.setdefault(rid, []).append(e)
        assert workers.used() <= num_blocks
        if n >= 40 and core.idle and loop.pending is None:
            break
    return streams, loop, core, workers


@pytest.mark.parametrize("seed", range(6))
def test_steps_sent_ahead_give_every_request_the_events_of_planned_steps(seed):
    planned, _, _, _ = serve(seed, ahead=False)
    streams, loop, core, workers = serve(seed, ahead=True)
    assert core.idle and not workers.rows and len(streams) == 40
    assert loop.sent_ahead > 0
    for rid, events in streams.items():
        check_stream(events)
        assert [(e.type, e.token_ids, e.text) for e in events] == \
            [(e.type, e.token_ids, e.text) for e in planned[rid]], rid


def running(core, workers, *prompts, max_new=30, **limits):
    """``prompts`` admitted and one Decode planned: the rows after it (what ``ahead`` starts from)."""
    for i, prompt in enumerate(prompts):
        core.add(request(f"r{i}", prompt, max_new), 0.0)
    run_step(core, workers)
    return core.rows_after(core.decode_batches())


def test_the_plain_continuation_is_sent_ahead():
    core, workers = make(100, lambda p, k: 20100)
    rows = running(core, workers, [20100, GMASK_ID], [20101, GMASK_ID])
    after = core.ahead(rows, 0.0)
    assert sorted(after) == sorted(rows)
    assert all(after[r] == (rows[r][0] + 1, rows[r][1] - 1) for r in rows)


def test_no_step_ahead_when_the_next_plan_would_differ():
    core, workers = make(100, lambda p, k: 20100)
    rows = running(core, workers, [20100, GMASK_ID], [20101, GMASK_ID])
    core.cancel("r0")                                       # the next plan filters it out
    assert core.ahead(rows, 0.0) is None

    core, workers = make(100, lambda p, k: 20100)
    rows = running(core, workers, [20100, GMASK_ID])
    core.add(request("late", [20102, GMASK_ID], 5), 0.0)     # it would be admitted now
    assert core.ahead(rows, 0.0) is None

    core, workers = make(100, lambda p, k: 20100, max_batch_size=1)
    rows = running(core, workers, [20100, GMASK_ID])
    core.add(request("late", [20102, GMASK_ID], 5), 0.0)     # no room for it: the step goes ahead
    assert core.ahead(rows, 0.0) is not None
    core.cancel("late")                                      # its final event waits on no step
    assert core.ahead(rows, 0.0) is None

    core, workers = make(100, lambda p, k: 20100)
    core.add(QueuedRequest(id="d", model="m", prompt_ids=(20100, GMASK_ID), max_new_tokens=30, deadline=50.0), 0.0)
    run_step(core, workers)
    rows = core.rows_after(core.decode_batches())
    assert core.ahead(rows, 10.0) is not None and core.ahead(rows, 60.0) is None   # past its deadline


def test_no_step_ahead_past_the_pool():
    """Two rows of 7 tokens in a pool of 4 blocks of 4: their next token fits, the one after
    does not (5 blocks): the next step is planned after the reply (it preempts)."""
    core, workers = make(4, lambda p, k: 20100)
    rows = running(core, workers, [20100] * 6 + [GMASK_ID], [20101] * 6 + [GMASK_ID])
    assert all(tokens == 8 for tokens, _ in rows.values())     # 7 + sop, then the first decode
    assert core.ahead(rows, 0.0) is None


def test_a_row_ending_in_the_step_in_flight_is_left_out():
    core, workers = make(100, lambda p, k: 20100)
    rows = running(core, workers, [20100, GMASK_ID], max_new=2)
    assert rows == {}                                          # its last token comes from the step in flight
    assert core.ahead(rows, 0.0) is None


def test_a_cancel_read_while_a_step_ran_ahead_ends_the_request_at_the_next_plan():
    core, workers = make(100, lambda p, k: 20100)
    loop = AheadLoop(core, workers)
    core.add(request("r", [20100, GMASK_ID], 50), 0.0)
    events = loop.step() + loop.step()                         # the prefill, a Decode and one sent ahead
    assert loop.pending is not None
    assert core.cancel("r", Cancellation.CALLER)
    events += loop.step()                                      # the reply of the one sent ahead: no more
    assert loop.pending is None
    events += loop.step()                                      # the plan ends it
    stream = [e for rid, e in events if rid == "r"]
    check_stream(stream)
    assert stream[-1].type == EVENT_FINAL and stream[-1].finish_reason == "cancelled"
    assert stream[-1].generated_tokens == 3 and core.idle and not workers.rows
