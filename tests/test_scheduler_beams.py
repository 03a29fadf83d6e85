"""The scheduler's side of a beam search, with hand-made worker replies (no Redis, no
workers): the phase goes out as one row with ``Request.beam`` and no generated ids; nothing
is published until the search ends; then one ``tokens`` event with the best candidate, the
``blank`` event with every candidate, and a ``final`` carrying them; it counts one worker
row per beam; a preempted or resumed beam search restarts from its blank."""

from __future__ import annotations

from model.config import EOP_ID, GMASK_ID, MASK_ID
from model.kv_footprint import blocks_for
from services.common.messages import EVENT_BLANK, EVENT_FINAL, EVENT_TOKENS, Beam, QueuedRequest
from services.scheduler.policy import BatchView, Limits, Scheduler
from services.scheduler.request import Gen
from tests.test_scheduler_policy import decode, text_ids

BLOCK = 4
BEAM = Beam(num_beams=3, length_penalty=0.8, no_repeat_ngram_size=2, deterministic=True)


def scheduler(blocks: int = 64, **limits) -> Scheduler:
    return Scheduler(Limits(max_batch_size=limits.pop("max_batch_size", 8), max_input_tokens=32,
                            max_total_tokens=64, **limits),
                     blocks * BLOCK, max_sequence_length=64, decode=decode, block_size=BLOCK)


def beam_request(rid: str, prompt: str, max_new: int = 4, **fields) -> QueuedRequest:
    return QueuedRequest(id=rid, model="m", prompt_ids=tuple(text_ids(prompt) + [GMASK_ID]), max_new_tokens=max_new,
                         beam=fields.pop("beam", BEAM), **fields)


def events_of(out):
    return [e for _, e in out.events]


def test_a_beam_search_publishes_its_blank_once_with_every_candidate():
    core = scheduler()
    core.add(beam_request("b", "Hi"), now=0.0)
    plan = core.plan(now=0.0)
    [row] = plan.prefill.requests
    assert row.beam == BEAM and row.generated_ids == () and row.sampling.seed == 0
    quiet = core.prefilled(plan.prefill, [Gen(row.row_id, 20001)], BatchView(1, (row.row_id,), 4, 8 * BLOCK, rows=3))
    assert not quiet.events                                          # a search step publishes nothing
    candidates = ((tuple(text_ids("ab")) + (EOP_ID,), -1.5), (tuple(text_ids("abc")), -2.0),
                  (tuple(text_ids("x")) + (EOP_ID,), -3.25))
    out = core.decoded([Gen(row.row_id, 20002, finished=True, candidates=candidates)], None)
    tokens, blank, final = events_of(out)
    assert tokens.type == EVENT_TOKENS and tokens.token_ids == candidates[0][0] and tokens.text == "ab"
    assert blank.type == EVENT_BLANK and blank.token_ids == candidates[0][0]
    assert [c["text"] for c in blank.candidates] == ["ab", "abc", "x"]
    assert [c["score"] for c in blank.candidates] == [-1.5, -2.0, -3.25]
    assert [c["finish_reason"] for c in blank.candidates] == ["stop", "length", "stop"]
    assert [c["output_text"] for c in blank.candidates] == ["Hiab", "Hiabc", "Hix"]
    assert final.type == EVENT_FINAL and final.candidates == blank.candidates and final.text == "ab"
    assert [o.request_id for o in out.ended] == ["b"]


def test_the_candidates_of_a_later_blank_carry_the_earlier_blanks_text():
    core = scheduler()
    state = QueuedRequest(id="m", model="m", prompt_ids=tuple(text_ids("A") + [MASK_ID] + text_ids("B") + [MASK_ID]),
                          max_new_tokens=3, beam=BEAM)
    core.add(state, now=0.0)
    texts = []
    for step, cands in enumerate([((tuple(text_ids("1")) + (EOP_ID,), -1.0),),
                                  ((tuple(text_ids("2")) + (EOP_ID,), -0.5), (tuple(text_ids("3")), -0.7))]):
        plan = core.plan(now=0.0)
        [row] = plan.prefill.requests
        assert row.generated_ids == ()
        out = core.prefilled(plan.prefill, [Gen(row.row_id, 0, finished=True, candidates=cands)], None)
        texts += [e for e in events_of(out) if e.type == EVENT_FINAL]
    [final] = texts
    assert [c["text"] for c in final.candidates] == ["12", "13"]
    assert [c["output_text"] for c in final.candidates] == ["A1B2", "A1B3"]


def test_beams_count_one_worker_row_and_block_set_each():
    core = scheduler(blocks=64, max_batch_size=7)
    for i in range(3):
        core.add(beam_request(f"b{i}", "Hello"), now=0.0)
    plan = core.plan(now=0.0)
    assert len(plan.prefill.requests) == 2                          # 2 x 3 beams fit 7 rows, 3 x 3 do not
    ids = tuple(r.row_id for r in plan.prefill.requests)
    core.prefilled(plan.prefill, [Gen(r, 20001) for r in ids], BatchView(1, ids, 8, 16 * BLOCK, rows=6))
    assert core.room() == 0 and core.snapshot().batch_rows == 6
    assert core.plan(now=0.0).prefill is None                        # the third waits for rows
    core = scheduler(blocks=10)          # "Hello" + gMASK + sop + the first token: 2 blocks a beam, 6 a search
    for rid in ("b", "c"):
        core.add(beam_request(rid, "Hello"), now=0.0)
    assert [r.request_ids for r in [core.plan(now=0.0).prefill]] == [("b",)]   # 6 + 6 > 10 - 1 (watermark)
    assert 3 * blocks_for(len("Hello") + 3, BLOCK) == 6


def test_a_beam_search_cannot_outgrow_the_pool_or_take_stop_texts():
    core = scheduler(max_batch_size=2)
    out = core.add(beam_request("wide", "Hi"), now=0.0)
    assert out.ended[0].code == "INVALID_ARGUMENT" and "num_beams 3" in out.ended[0].message
    core = scheduler()
    out = core.add(beam_request("stops", "Hi", stop=("x",)), now=0.0)
    assert out.ended[0].code == "INVALID_ARGUMENT" and "stop texts" in out.ended[0].message


def test_a_preempted_or_resumed_beam_search_restarts_from_its_blank():
    core = scheduler()
    core.add(beam_request("b", "Hi"), now=0.0)
    plan = core.plan(now=0.0)
    [row] = plan.prefill.requests
    core.prefilled(plan.prefill, [Gen(row.row_id, 20001)], BatchView(1, (row.row_id,), 4, 8 * BLOCK, rows=3))
    core.cancel("b")                                                 # leaves; another pool would resume it:
    resumed = scheduler()
    resumed.add(beam_request("b", "Hi"), now=0.0, events=())         # nothing was published
    [again] = resumed.plan(now=0.0).prefill.requests
    assert again.generated_ids == () and again.beam == BEAM
