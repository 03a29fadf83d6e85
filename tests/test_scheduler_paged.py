"""The scheduler over paged workers (``Scheduler(block_size=...)``), with fake workers that
keep the same block accounting as ``model.paged_kv``: admitted phases join the running step
(one call, no pause), admission counts the tokens a phase has now, the pool is never
exceeded (randomized), and a row preempted when blocks run out resumes later with what it
generated and ends with exactly the tokens of an uninterrupted run."""

from __future__ import annotations

import random

import pytest

from model.config import EOP_ID, GMASK_ID, MASK_ID
from model.kv_footprint import blocks_for
from services.common.messages import EVENT_BLANK, EVENT_TOKENS, Event, QueuedRequest
from services.scheduler.policy import BatchView, FinishReason, Limits, Scheduler
from services.scheduler.request import Gen
from tests.test_scheduler_policy import check_stream, decode

BLOCK = 4


class Over(Exception):
    pass


class PagedWorkers:
    """One cached batch of rows, each ``[tokens in KV, allowed, generated, prompt]``; a step feeds
    every running row one token and prefills the admitted ones, refusing (``Over``) a step the
    pool cannot hold. The k-th token of a phase depends only on its prompt and k."""

    def __init__(self, num_blocks: int, script) -> None:
        self.num_blocks, self.script = num_blocks, script
        self.rows: dict[int, list] = {}
        self.batch_id = None
        self.peak = self.steps = 0

    def used(self, extra: dict[int, int] | None = None) -> int:
        return sum(blocks_for(r[0] + (extra or {}).get(i, 0), BLOCK) for i, r in self.rows.items())

    def view(self):
        if not self.rows:
            self.batch_id = None
            return None
        return BatchView(self.batch_id, tuple(self.rows), width=max(r[0] for r in self.rows.values()),
                         max_tokens=self.used() * BLOCK)

    def filter(self, op):
        for row in [r for r in self.rows if r not in op.keep]:
            del self.rows[row]
        return self.view()

    def step(self, views, op):
        assert [v.id for v in views] == ([self.batch_id] if self.rows else [])
        need = self.used({i: 1 for i in self.rows})
        if op is not None:
            need += sum(blocks_for(len(r.input_ids) + 1 + len(r.generated_ids), BLOCK) for r in op.requests)
        if need > self.num_blocks:
            raise Over(need)
        for r in self.rows.values():
            r[0] += 1
        if op is not None:
            self.batch_id = self.batch_id or op.batch_id
            for r in op.requests:
                self.rows[r.row_id] = [len(r.input_ids) + 1 + len(r.generated_ids), r.max_new_tokens,
                                       len(r.generated_ids), tuple(r.input_ids)]
        self.steps += 1
        self.peak = max(self.peak, self.used())
        gens = []
        for row, r in list(self.rows.items()):
            tok = self.script(r[3], r[2])
            r[2] += 1
            finished = tok == EOP_ID or r[2] >= r[1]
            gens.append(Gen(row, tok, -0.5, (), finished,
                            (FinishReason.STOP if tok == EOP_ID else FinishReason.LENGTH) if finished else None))
            if finished:
                del self.rows[row]
        return gens, self.view()


def run_step(core: Scheduler, workers: PagedWorkers):
    plan = core.plan(0.0)
    events = list(plan.events)
    if plan.filter:
        core.filtered(workers.filter(plan.filter))
    batches = core.decode_batches()
    if batches or plan.prefill:
        gens, view = workers.step(batches, plan.prefill)
        events += core.decoded(gens, view, admitted=plan.prefill).events
    return plan, events


def make(num_blocks, script, **limits):
    limits.setdefault("max_input_tokens", 256)
    limits.setdefault("max_total_tokens", 512)
    core = Scheduler(Limits(**limits), num_blocks * BLOCK, max_sequence_length=512, decode=decode,
                     block_size=BLOCK)
    return core, PagedWorkers(num_blocks, script)


def text(prompt, k):
    """The uninterrupted k-th token of a prompt's phase: a function of both, sometimes eop."""
    h = hash((prompt, k)) % 1000
    return EOP_ID if k >= 3 and h < 40 else 20000 + 97 + h % 26


def request(rid, prompt, max_new):
    return QueuedRequest(id=rid, model="m", prompt_ids=tuple(prompt), max_new_tokens=max_new)


def tokens_of(events: list[Event]) -> list[int]:
    """The blank's tokens as its ``blank`` event reports them (the stream's tokens events
    carry the same ids, the end token aside)."""
    blank = [e for e in events if e.type == EVENT_BLANK]
    assert len(blank) == 1
    streamed = [t for e in events if e.type == EVENT_TOKENS for t in e.token_ids]
    assert streamed[:len(blank[0].token_ids)] == list(blank[0].token_ids)
    return list(blank[0].token_ids)


def test_admitted_phases_join_the_running_step_without_a_pause():
    core, workers = make(100, lambda p, k: 20100)
    core.add(request("a", [20100, 20101, GMASK_ID], 6), 0.0)
    run_step(core, workers)
    core.add(request("b", [20102, GMASK_ID], 6), 0.0)
    plan, _ = run_step(core, workers)
    assert plan.prefill is not None and workers.steps == 2          # b's prefill was a's decode step
    assert set(workers.rows) == {1, 2}


def test_admission_counts_the_tokens_a_phase_has_now_not_its_max_new_tokens():
    """A pool of 12 blocks (48 tokens) takes five requests of 3 tokens + sop with
    max_new_tokens 40 at once: 5 x 1 block now, where the padded budget held one."""
    core, workers = make(12, lambda p, k: 20100)
    for i in range(5):
        core.add(request(f"r{i}", [20100 + i, 20101, GMASK_ID], 40), 0.0)
    run_step(core, workers)
    assert len(workers.rows) == 5


@pytest.mark.parametrize("seed", range(6))
def test_the_pool_is_never_exceeded_and_preempted_rows_resume_exactly(seed):
    rng = random.Random(seed)
    num_blocks = rng.randint(29, 60)                          # one request alone always fits (<= 28)
    core, workers = make(num_blocks, text, max_batch_size=rng.randint(2, 16),
                         max_prefill_tokens=rng.randint(40, 200), max_input_tokens=60, max_total_tokens=120)
    streams: dict[str, list[Event]] = {}
    prompts: dict[str, tuple] = {}
    n = 0
    for _ in range(20_000):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if n < 40:
                prompt = tuple([20100 + rng.randint(0, 50) for _ in range(rng.randint(1, 40))]
                               + [rng.choice([GMASK_ID, MASK_ID])])
                prompts[f"r{n}"] = prompt
                assert not core.add(request(f"r{n}", prompt, rng.randint(1, 70)), 0.0).events
                n += 1
        _, events = run_step(core, workers)                # PagedWorkers raises Over past the pool
        for rid, e in events:
            streams.setdefault(rid, []).append(e)
        assert workers.used() <= num_blocks
        if n >= 40 and core.idle:
            break
    assert core.idle and len(streams) == 40 and not workers.rows
    for rid, events in streams.items():
        check_stream(events)
        got = tokens_of(events)
        want = [text(prompts[rid], k) for k in range(len(got))]
        assert got == want, rid                                # preempted or not, the same tokens
    assert workers.peak > num_blocks // 2 and core.preempted > 0     # the pool filled up, rows were preempted


def test_a_full_pool_preempts_the_newest_row_and_it_resumes_with_its_tokens():
    """Three rows that together outgrow 9 blocks: the newest leaves (its blocks are freed by
    the filter), is admitted again with its generated ids, and finishes with the same tokens."""
    core, workers = make(9, lambda p, k: 20100 + k)
    for i in range(3):
        core.add(request(f"r{i}", [20100 + i] * 7 + [GMASK_ID], 10), 0.0)   # 9 tokens: 3 blocks each
    events, resumed = [], None
    for _ in range(60):
        plan, ev = run_step(core, workers)
        events += ev
        if plan.prefill and any(r.generated_ids for r in plan.prefill.requests):
            resumed = plan.prefill.requests[0]
        if core.idle:
            break
    assert core.preempted >= 1 and resumed is not None
    assert list(resumed.generated_ids) == [20100 + k for k in range(len(resumed.generated_ids))]
    streams = {}
    for rid, e in events:
        streams.setdefault(rid, []).append(e)
    for rid, evs in streams.items():
        check_stream(evs)
        assert tokens_of(evs) == [20100 + k for k in range(10)], rid
