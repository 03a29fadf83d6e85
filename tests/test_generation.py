"""Generation over the model: batching is invisible to each request, greedy
decoding equals the independent reference recomputed from scratch every step,
min_new_tokens and end tokens, and the official left-to-right blank filling."""

from __future__ import annotations

import pytest
import torch

from glm_reference import forward as reference_forward
from model.beam_search import BeamSearch
from model.checkpoint import inspect_checkpoint, read_rank_state
from model.config import EOP_ID, EOS_ID, GMASK_ID, MASK_ID, GLMConfig
from model.generation import GenerationOptions, Generator
from model.limits import MAX_BLANKS
from model.prompt import Blank, PromptError
from model.runner import load_model
from model.sampling import SamplingParams

PROMPTS = [
    [20100, 20200, MASK_ID, 20300, 20400, EOS_ID],
    [20500, 20600, 20700, GMASK_ID],
    [20123, MASK_ID],
]


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=5)


@pytest.fixture(scope="module")
def gen(ckpt):
    return Generator(load_model(ckpt))


def greedy_reference(state, context, steps):
    config = GLMConfig.from_name("glm-tiny")
    blank = Blank.first(context)
    out = []
    for _ in range(steps):
        ids = blank.input_ids + out
        logits = reference_forward(state, config, ids, blank.mask_pos, blank.use_gmask,
                                   blank.context_length + 1)
        out.append(int(logits[-1].argmax()))
    return out


@pytest.mark.parametrize("context", PROMPTS[:2], ids=["mask", "gmask"])
def test_greedy_equals_reference_recomputed_every_step(ckpt, gen, context):
    state = read_rank_state(inspect_checkpoint(ckpt), 1, 0, dtype=torch.float32)
    got = gen.sample([Blank.first(context)], [SamplingParams(greedy=True)], GenerationOptions(max_new_tokens=6))[0]
    assert got.token_ids == greedy_reference(state, context, 6)
    assert len(set(got.token_ids)) > 1            # the demo init does not just echo a token


@pytest.mark.parametrize("params", [SamplingParams(greedy=True),
                                    SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_batch_rows_equal_requests_alone(gen, params):
    opts = GenerationOptions(max_new_tokens=5)
    blanks = [Blank.first(p) for p in PROMPTS]
    batched = gen.sample(blanks, [params] * 3, opts)
    for blank, got in zip(blanks, batched):
        alone = gen.sample([blank], [params], opts)[0]
        assert got.token_ids == alone.token_ids
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert got.finish_reason == "length" and len(got.token_ids) == 5


def test_logprobs_are_raw_log_softmax(ckpt, gen):
    state = read_rank_state(inspect_checkpoint(ckpt), 1, 0, dtype=torch.float32)
    context = PROMPTS[0]
    got = gen.sample([Blank.first(context)], [SamplingParams(temperature=0.5, seed=1)],
                     GenerationOptions(max_new_tokens=3))[0]
    blank = Blank.first(context)
    logits = reference_forward(state, GLMConfig.from_name("glm-tiny"), blank.input_ids + got.token_ids[:-1],
                               blank.mask_pos, blank.use_gmask, blank.context_length + 1)
    expected = torch.log_softmax(logits[blank.context_length:], -1)
    expected = expected[torch.arange(3), torch.tensor(got.token_ids)]
    assert got.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.fixture()
def eager_to_stop(ckpt):
    """The model with its LM head nudged so eop is always the top logit."""
    model = load_model(ckpt)
    head = model.transformer.word_embeddings
    plain = head.logits

    def logits(hidden):
        out = plain(hidden)
        out[..., EOP_ID] += 100.0
        return out

    head.logits = logits
    return Generator(model)


def test_stops_on_end_token_after_min_new_tokens(eager_to_stop):
    blank = Blank.first(PROMPTS[1])
    free = eager_to_stop.sample([blank], [SamplingParams(greedy=True)], GenerationOptions(max_new_tokens=8))[0]
    assert free.token_ids[-1] == EOP_ID and free.finish_reason == "stop"
    held = eager_to_stop.sample([blank], [SamplingParams(greedy=True)],
                                GenerationOptions(max_new_tokens=8, min_new_tokens=3))[0]
    assert EOP_ID not in held.token_ids[:3]
    assert held.finish_reason == "stop" and held.token_ids[-1] == EOP_ID and len(held.token_ids) >= 4
    assert held.content_ids == held.token_ids[:-1]


def test_fill_blanks_left_to_right_as_official(gen):
    ids = [20100, MASK_ID, 20200, MASK_ID, 20300, EOS_ID]
    params, opts = SamplingParams(greedy=True), GenerationOptions(max_new_tokens=3)
    result = gen.fill_blanks(ids, params, opts)
    assert len(result.blanks) == 2
    # replay the official loop by hand
    first = Blank.first(ids)
    one = gen.sample([first], [params], opts)[0]
    seq = first.splice(one.content_ids)
    second = Blank.first(seq)
    assert second.mask_pos == 1 + len(one.content_ids) + 1
    two = gen.sample([second], [params], opts)[0]
    assert [b.token_ids for b in result.blanks] == [one.token_ids, two.token_ids]
    assert result.output_ids == second.splice(two.content_ids)
    assert MASK_ID not in result.output_ids
    only_first = gen.fill_blanks(ids, params, opts, all_blanks=False)
    assert len(only_first.blanks) == 1 and only_first.output_ids.count(MASK_ID) == 1


def test_mask_priority_and_other_masks_left_alone(gen):
    ids = [20100, GMASK_ID, 20200, MASK_ID, 20300]
    result = gen.fill_blanks(ids, SamplingParams(greedy=True), GenerationOptions(max_new_tokens=2))
    assert len(result.blanks) == 1                       # [MASK] wins; [gMASK] stays
    assert GMASK_ID in result.output_ids and MASK_ID not in result.output_ids


def test_beam_search_is_deterministic_and_scored(gen):
    blank = Blank.first(PROMPTS[0])
    opts = GenerationOptions(max_new_tokens=5, num_beams=3, beam_deterministic=True, no_repeat_ngram_size=2)
    a, b = gen.beam_search(blank, opts), gen.beam_search(blank, opts)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 5
    assert a.logprobs == pytest.approx(gen.score(blank, a.token_ids), abs=1e-5)
    # no repeated bigram among generated tokens
    grams = list(zip(a.token_ids, a.token_ids[1:]))
    assert len(grams) == len(set(grams))


def beam_reference(state, blank, opts):
    """The official strategy over logits recomputed from scratch for every beam every step
    (no KV cache, no engine): the candidates, best first, as (generated ids, score)."""
    config = GLMConfig.from_name("glm-tiny")
    search = BeamSearch(1, opts.num_beams, opts.length_penalty, consider_end=True,
                        no_repeat_ngram_size=opts.no_repeat_ngram_size, min_gen_length=opts.min_new_tokens,
                        deterministic=opts.beam_deterministic, seed=opts.beam_seed)
    tokens = torch.tensor([blank.input_ids])[None]
    for step in range(opts.max_new_tokens):
        logits = torch.stack([reference_forward(state, config, row.tolist(), blank.mask_pos, blank.use_gmask,
                                                blank.context_length + 1)[-1] for row in tokens[0]])
        tokens, _ = search.step(logits[None].float(), tokens)
        if search.is_done:
            break
    start = len(blank.input_ids)
    return [(seq.tolist()[start:], score) for seq, score in search.finalize(tokens)[0]]


@pytest.mark.parametrize("opts", [
    GenerationOptions(max_new_tokens=6, num_beams=3, beam_deterministic=True, no_repeat_ngram_size=2),
    GenerationOptions(max_new_tokens=5, num_beams=4, length_penalty=0.6, min_new_tokens=2, beam_seed=11),
    GenerationOptions(max_new_tokens=4, num_beams=2, beam_seed=3),
], ids=["deterministic-ngram", "seeded-minlen", "two-beams"])
def test_beam_search_equals_the_strategy_recomputed_every_step(ckpt, gen, opts):
    state = read_rank_state(inspect_checkpoint(ckpt), 1, 0, dtype=torch.float32)
    blank = Blank.first(PROMPTS[1])
    got = gen.beam_search(blank, opts)
    want = beam_reference(state, blank, opts)
    assert [ids for ids, _ in got.candidates] == [ids for ids, _ in want]
    assert [s for _, s in got.candidates] == pytest.approx([s for _, s in want], abs=1e-4)
    assert got.token_ids == want[0][0]


def test_prompt_without_mask_is_refused(gen):
    with pytest.raises(PromptError, match="no mask"):
        gen.fill_blanks([20100, 20200], SamplingParams(greedy=True), GenerationOptions(max_new_tokens=2))


def test_generation_stops_at_max_sequence_length(gen):
    limit = gen.model.config.max_sequence_length
    context = [20100] * (limit - 4) + [GMASK_ID]          # context + sop = limit - 2 tokens
    got = gen.sample([Blank.first(context)], [SamplingParams(greedy=True)], GenerationOptions(max_new_tokens=50))[0]
    assert len(got.token_ids) == 2 and got.finish_reason == "length"


@pytest.fixture()
def eager_to_mask(ckpt):
    """The model with its LM head nudged so [MASK] is always the top logit."""
    model = load_model(ckpt)
    head = model.transformer.word_embeddings
    plain = head.logits

    def logits(hidden):
        out = plain(hidden)
        out[..., MASK_ID] += 100.0
        return out

    head.logits = logits
    return Generator(model)


@pytest.mark.parametrize("max_new", [1, 3])
def test_a_generated_mask_never_opens_a_blank(eager_to_mask, max_new):
    """"x [MASK] " x 100 on a model that only ever says [MASK]: exactly the prompt's 100
    blanks are filled (the generated masks stay as content), so the request ends."""
    ids = [20100, MASK_ID] * 100 + [EOS_ID]
    result = eager_to_mask.fill_blanks(ids, SamplingParams(greedy=True), GenerationOptions(max_new_tokens=max_new))
    assert len(result.blanks) == 100
    assert all(b.token_ids == [MASK_ID] * max_new for b in result.blanks)
    assert result.output_ids == [20100, *[MASK_ID] * max_new] * 100 + [EOS_ID]


def test_too_many_blanks_are_refused(gen):
    ids = [20100, MASK_ID] * (MAX_BLANKS + 1)
    with pytest.raises(PromptError, match=f"at most {MAX_BLANKS}"):
        gen.fill_blanks(ids, SamplingParams(greedy=True), GenerationOptions(max_new_tokens=1))
