"""model.sampling: official top-k/top-p per row, penalties, greedy, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.limits import MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY, MIN_TEMPERATURE
from kernels import cpu_sample
from model import sampling
from model.sampling import (LOGIT_BOUND, Sampler, SamplingParams, apply_penalties, apply_top_k_top_p, draw_keys,
                            gumbel_draw)


def official_top_k_logits(logits, top_k=0, top_p=0.0, filter_value=-65504):
    """SwissArmyTransformer ``top_k_logits``, batch 1 only (it flattens to 1-D)."""
    logits = logits.clone()
    if top_k > 0:
        indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
        logits[indices_to_remove] = filter_value
    if top_p > 0.0:
        logits = logits.view(logits.size()[1]).contiguous()
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        indices_to_remove = sorted_indices[sorted_indices_to_remove]
        logits[indices_to_remove] = filter_value
        logits = logits.view(1, -1).contiguous()
    return logits


ROWS = [(0, 0.0), (5, 0.0), (0, 0.7), (20, 0.9), (1, 0.5), (3, 0.05), (0, 0.0), (200, 0.3)]


def test_top_k_top_p_per_row_equals_official_batch1():
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), 1000) * 3
    top_k = torch.tensor([k for k, _ in ROWS])
    top_p = torch.tensor([p for _, p in ROWS])
    ours = apply_top_k_top_p(logits, top_k, top_p)
    for i, (k, p) in enumerate(ROWS):
        expected = official_top_k_logits(logits[i : i + 1], k, p)
        assert torch.equal(ours[i : i + 1], expected), f"row {i} (top_k={k}, top_p={p})"
    assert torch.equal(logits, logits.clone())  # input untouched (sanity)


def test_top_k_keeps_ties_at_threshold():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert (out > -65504).tolist() == [[False, True, True, True, False]]


def test_top_p_keeps_first_token_above_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_top_k_top_p(probs.log(), torch.tensor([0]), torch.tensor([0.6]))
    assert (out > -65504).tolist() == [[True, True, False, False]]


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 4.0], [1.0, 1.0, 1.0, 1.0]])
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
    ]
    out = apply_penalties(logits.clone(), params, prompt_ids=[[0], [0, 1]], output_ids=[[1, 1], [2, 2, 2, 3]])
    # row 0: tokens {0, 1} seen; 2.0 / 2 = 1.0, -1.0 * 2 = -2.0; others untouched.
    assert out[0].tolist() == [1.0, -2.0, 0.5, 4.0]
    # row 1: output only (prompt ignored); token 2: 1 - (3*0.25 + 0.5), token 3: 1 - (0.25 + 0.5).
    assert out[1].tolist() == [1.0, 1.0, -0.25, 0.25]


def test_greedy_is_argmax_of_penalised_logits_lowest_index_on_ties():
    logits = torch.tensor([[1.0, 5.0, 5.0, 0.0], [3.0, 2.9, 0.0, 0.0]])
    sampler = Sampler([SamplingParams(greedy=True), SamplingParams(greedy=True, repetition_penalty=2.0)])
    tokens, _ = sampler.sample(logits, [[], [0]], [[], []])
    assert tokens.tolist() == [1, 1]  # row 1: 3.0 / 2 = 1.5 < 2.9


def test_temperature_zero_is_greedy():
    torch.manual_seed(1)
    logits = torch.randn(3, 500)
    sampler = Sampler([SamplingParams(temperature=0.0, top_k=50, top_p=0.5, seed=s) for s in range(3)])
    for _ in range(5):
        tokens, _ = sampler.sample(logits, [[]] * 3, [[]] * 3)
        assert tokens.tolist() == logits.argmax(-1).tolist()


def test_logprob_is_log_softmax_of_raw_logits():
    torch.manual_seed(2)
    logits = torch.randn(3, 300)
    params = [SamplingParams(temperature=0.5, top_k=10, seed=1, repetition_penalty=1.3),
              SamplingParams(greedy=True, presence_penalty=1.0),
              SamplingParams(top_p=0.8, seed=3)]
    tokens, logprobs = Sampler(params).sample(logits, [[1, 2]] * 3, [[4, 5]] * 3)
    expected = F.log_softmax(logits, dim=-1)[torch.arange(3), tokens]
    assert logprobs.dtype == torch.float32
    assert torch.equal(logprobs, expected)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.7), (0.8, 3, 0.0), (1.3, 4, 0.9), (1.0, 0, 0.0)])
def test_seeded_draws_follow_the_official_filtered_distribution(temperature, top_k, top_p):
    """Over 4 000 seeds the first draws of a row land on each token as often as the official
    rule (temperature, top-k, top-p, softmax) says, within 4 standard deviations, and never
    on a filtered token. The seeds are fixed: the counts are the same on every run."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.7]])
    probs = F.softmax(official_top_k_logits(logits / temperature, top_k, top_p).float(), dim=-1)[0]
    n = 4000
    counts = torch.zeros(8)
    for seed in range(n):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p if top_p else 1.0, seed=seed)
        counts[int(Sampler([params]).sample(logits, [[]], [[]])[0][0])] += 1
    expected = probs * n
    assert torch.all(counts[probs == 0] == 0)
    sigma = (n * probs * (1 - probs)).sqrt()
    assert torch.all((counts - expected).abs() <= 4 * sigma + 1), (counts, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_draw_kernel_is_the_gumbel_max_of_the_torch_form(dtype):
    """``kernels.cpu_sample`` against ``gumbel_draw`` (the same rule and hash in torch ops, in
    fp64) over the official top-k filter, on the same keys: the same token unless the two best
    noisy scores are within 1e-4 (there the two logarithms may round apart), never a removed
    token, and the row's token changes with its keys, not with its neighbours."""
    if not cpu_sample.supports(torch.zeros(1, 4, dtype=dtype)):
        pytest.skip("no C compiler: the torch form is the rule")
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 3000, generator=gen) * 3).to(dtype)
    logits[3, 100:] = -math.inf                                   # a row with few live tokens
    temps = [0.5 + (i % 5) * 0.3 for i in range(64)]
    top_k = torch.tensor([0 if i % 2 else 1 + i for i in range(64)])       # every other row: top-k
    kth = [float(logits[i].float().topk(int(k)).values[-1]) if k else -math.inf for i, k in enumerate(top_k)]
    keys = [draw_keys(1000 + i, i) for i in range(64)]
    drawn = cpu_sample.draw(logits, list(range(64)), temps, keys, LOGIT_BOUND, kth)
    scores = (logits.float() / torch.tensor(temps)[:, None]).clamp(-LOGIT_BOUND, LOGIT_BOUND)
    scores = apply_top_k_top_p(scores, top_k, torch.zeros(64))                # the official filter
    scores = torch.where(scores <= -65504, torch.full_like(scores, -math.inf), scores)
    reference = gumbel_draw(scores, keys)
    compared = 0
    for row in range(64):
        assert scores[row, drawn[row]] > -math.inf
        if drawn[row] != reference[row]:
            top2 = torch.topk(_noisy(scores[row:row + 1], keys[row:row + 1])[0], 2).values
            assert float(top2[0] - top2[1]) < 1e-4, row
        else:
            compared += 1
    assert compared >= 60 and drawn[3] < 100
    alone = cpu_sample.draw(logits[5:6].contiguous(), [0], temps[5:6], keys[5:6], LOGIT_BOUND, kth[5:6])
    assert int(alone[0]) == int(drawn[5])
    moved = cpu_sample.draw(logits, [5] * 8, [4.0] * 8, [draw_keys(7, k) for k in range(8)], LOGIT_BOUND)
    assert len(set(moved.tolist())) > 1


def _noisy(scores, keys):
    """The noisy scores of ``gumbel_draw``, for the test's tie check."""
    vocab = scores.shape[1]
    index = torch.arange(vocab, dtype=torch.int64)
    k1 = torch.tensor([k for k, _ in keys])[:, None]
    k2 = torch.tensor([k for _, k in keys])[:, None]
    h = sampling._fmix32(sampling._fmix32(index[None, :] ^ k1) ^ k2)
    u = (h.double() + 0.5) * 2.0**-32
    q = torch.where(h >= 0xFF000000, (2.0**32 - h.double() - 0.5) * 2.0**-32, -torch.log(u))
    return torch.where(torch.isfinite(scores), scores.double() - torch.log(q), torch.full_like(q, -math.inf))


def test_a_draw_does_not_move_with_logits_that_differ_below_its_lead():
    """Logits perturbed by 1e-6 (another TP degree or batch shape rounds them so) draw the same
    tokens in all but a few of 200 rows of 150 528."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(200, 150528, generator=gen) * 3
    nudged = logits * (1 + 1e-6 * torch.randn(200, 150528, generator=gen))
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(200)]
    outs = [[]] * 200
    first = Sampler(params).choose(logits, outs, outs)
    second = Sampler(params).choose(nudged, outs, outs)
    assert int((first != second).sum()) <= 2


def _run(sampler, logits_steps, rows):
    return [sampler.sample(step[rows], [[]] * len(rows), [[]] * len(rows))[0].tolist() for step in logits_steps]


def test_seeded_output_independent_of_batch_composition():
    torch.manual_seed(4)
    steps = [torch.randn(4, 800) for _ in range(6)]
    params = [SamplingParams(top_p=0.9, seed=7), SamplingParams(top_k=30, seed=8),
              SamplingParams(temperature=0.7, seed=9), SamplingParams(greedy=True)]
    alone = [row[0] for row in _run(Sampler([params[0]]), steps, [0])]
    together = [row[0] for row in _run(Sampler(params), steps, [0, 1, 2, 3])]
    assert together == alone
    # Shrink after 3 steps (rows 0 and 2 stay), then grow again by concatenation.
    full = Sampler(params)
    first = [row[0] for row in _run(full, steps[:3], [0, 1, 2, 3])]
    kept = full.rows([2, 0])
    middle = [row[1] for row in _run(kept, steps[3:5], [2, 0])]
    grown = Sampler.concatenate([Sampler([SamplingParams(seed=5)]), kept.select([1])])
    last = [row[1] for row in _run(grown, steps[5:], [1, 0])]
    assert first + middle + last == alone
    assert full.seeds[:3] == [7, 8, 9] and grown.seeds == [5, 7]


def test_unseeded_rows_get_a_recorded_random_seed():
    sampler = Sampler([SamplingParams(), SamplingParams()])
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in sampler.seeds)
    assert sampler.seeds[0] != sampler.seeds[1]
    logits = torch.randn(1, 1000)
    replay = Sampler([SamplingParams(seed=sampler.seeds[0])])
    assert _run(sampler.rows([0]), [logits] * 3, [0]) == _run(replay, [logits] * 3, [0])


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("temperature", math.inf), ("top_k", -1), ("top_k", 1.5), ("top_p", 1.5),
     ("top_p", -0.1), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
     ("seed", -1), ("greedy", 1)],
)
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sample_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        Sampler([SamplingParams()]).sample(torch.randn(2, 10), [[], []], [[], []])


def test_a_resumed_row_continues_with_the_same_draws():
    # a request resumed from its first k tokens (another pool, after a failure) makes the
    # same draws as the uninterrupted run: each draw depends on (seed, step) only
    params = SamplingParams(temperature=1.0, top_k=50, seed=11)
    torch.manual_seed(5)
    steps = [torch.randn(1, 500) for _ in range(8)]
    whole, out = Sampler([params]), []
    for logits in steps:
        out.append(int(whole.sample(logits, [[1]], [list(out)])[0][0]))
    resumed, again = Sampler([params]), out[:4]
    for logits in steps[4:]:
        again.append(int(resumed.sample(logits, [[1]], [list(again)])[0][0]))
    assert again == out
    assert len(set(out)) > 1


# -- numerically safe for every accepted parameter (issue 10) ------------------------------
@pytest.mark.parametrize("value", [1e-38, 1e-6, -1e-9, 100.5, math.inf])
def test_temperature_outside_its_range_is_refused(value):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=value)


@pytest.mark.parametrize("value", [1e-38, 0.009, 101.0, -1.0, 0.0])
def test_repetition_penalty_outside_its_range_is_refused(value):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=value)


EXTREMES = [
    dict(temperature=MIN_TEMPERATURE), dict(temperature=MAX_TEMPERATURE),
    dict(temperature=MIN_TEMPERATURE, top_k=3, top_p=0.5),
    dict(temperature=MIN_TEMPERATURE, repetition_penalty=MIN_REPETITION_PENALTY),
    dict(temperature=MIN_TEMPERATURE, repetition_penalty=MAX_REPETITION_PENALTY, top_k=2),
    dict(temperature=0.7, repetition_penalty=MIN_REPETITION_PENALTY, presence_penalty=2.0, frequency_penalty=2.0),
    dict(temperature=MAX_TEMPERATURE, presence_penalty=-2.0, frequency_penalty=-2.0, top_p=1e-9),
]


@pytest.mark.parametrize("params", EXTREMES, ids=[str(i) for i in range(len(EXTREMES))])
@pytest.mark.parametrize("scale", [1.0, 1e4, 6e4])
def test_extreme_accepted_parameters_always_draw_a_token(params, scale):
    """Logits as large as fp16 holds, the smallest temperature, the strongest penalties,
    repeated tokens, a banned (-inf) entry: a token id is drawn, never an exception."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 64, generator=gen) * scale
    logits[:, 7] = -math.inf                                  # an end token banned by min_new_tokens
    sampler = Sampler([SamplingParams(seed=s, **params) for s in range(4)])
    tokens, logprobs = sampler.sample(logits, [[1, 2, 3]] * 4, [[4, 5, 4, 5] * 50, [], [63] * 9, [7]])
    assert tokens.dtype == torch.long and all(0 <= t < 64 and t != 7 for t in tokens.tolist())
    assert not torch.isnan(logprobs).any()


def test_smallest_temperature_filters_with_minus_inf_and_keeps_the_top_k():
    """At temperature 1e-5 the scaled logits are ~1e5 apart: the official filter value -65504
    would outrank kept logits; the filtered ones get -inf and the draw stays in the top k."""
    logits = torch.tensor([[-3.0, -2.0, -1.5, -1.0, -4.0]])    # scaled: -3e5 .. -1e5, all below -65504
    for seed in range(20):
        sampler = Sampler([SamplingParams(temperature=MIN_TEMPERATURE, top_k=2, seed=seed)])
        assert sampler.sample(logits.clone(), [[]], [[]])[0].item() == 3      # top-2, 5e4 apart: the argmax


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_a_degenerate_row_takes_its_argmax_and_leaves_its_neighbours_alone(poison):
    """A row whose logits hold NaN or inf (a model that overflowed) still gets a token, the
    row's argmax; the other rows draw exactly what they draw without it."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 32, generator=gen)
    bad = logits.clone()
    bad[1] = poison
    bad[1, 5] = math.inf if poison == math.inf else 0.0
    params = [SamplingParams(temperature=0.8, seed=s) for s in (1, 2, 3)]
    alone, _ = Sampler(params).sample(logits.clone(), [[]] * 3, [[]] * 3)
    tokens, _ = Sampler(params).sample(bad, [[]] * 3, [[]] * 3)
    assert tokens[0] == alone[0] and tokens[2] == alone[2]
    assert 0 <= tokens[1].item() < 32


def per_token_penalties(logits, params, prompt_ids, output_ids):
    """The penalties token by token in Python (the rule, written the slow way)."""
    out = logits.clone()
    for row, p in enumerate(params):
        for token in set(prompt_ids[row]) | set(output_ids[row]):
            if p.repetition_penalty != 1.0:
                v = out[row, token]
                out[row, token] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for token in set(output_ids[row]):
            count = output_ids[row].count(token)
            out[row, token] -= torch.tensor(count * p.frequency_penalty + p.presence_penalty, dtype=out.dtype)
    return out


def test_vectorised_penalties_equal_the_per_token_rule_bit_for_bit():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 97, generator=gen) * 3
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3),
              SamplingParams(), SamplingParams(repetition_penalty=0.7),
              SamplingParams(frequency_penalty=-1.1), SamplingParams(presence_penalty=2.0),
              SamplingParams(repetition_penalty=2.0, frequency_penalty=0.1)]
    prompt = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 9, 0, 30, 3, 1)]
    output = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (12, 0, 4, 40, 0, 7)]
    got = apply_penalties(logits.clone(), params, prompt, output)
    assert torch.equal(got, per_token_penalties(logits, params, prompt, output))


def full_rule(params, logits, prompt_ids, output_ids):
    """Every row through penalties, NaN-as-lowest and argmax / the seeded draw: what
    ``choose`` must return whatever shortcut it takes for plain greedy rows."""
    sampler = Sampler(params)
    return sampler._process(logits.float(), list(range(len(params))), prompt_ids, output_ids)


def test_choose_takes_shortcuts_only_where_they_equal_the_full_rule():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(7, 300, generator=gen)
    logits[2, 10] = math.nan                                  # a NaN row: the shortcut must not take it
    logits[4, :] = logits[4, 0]                                # all tied: the lowest index
    params = [SamplingParams(greedy=True), SamplingParams(temperature=0.8, seed=3),
              SamplingParams(greedy=True), SamplingParams(greedy=True, repetition_penalty=1.5),
              SamplingParams(greedy=True), SamplingParams(temperature=0.0, frequency_penalty=0.5),
              SamplingParams(top_k=5, seed=9)]
    prompt = [[1, 2, 3]] * 7
    output = [[4, 5, 5], [], [6], [int(logits[3].argmax())], [], [int(logits[5].argmax())] * 3, [7]]
    before = logits.clone()
    got = Sampler(params).choose(logits, prompt, output)
    assert torch.allclose(logits, before, rtol=0, atol=0, equal_nan=True)     # the caller's logits untouched
    assert got.tolist() == full_rule(params, before, prompt, output).tolist()
    assert got[4] == 0 and got[2] != 10
    assert got[3] != logits[3].argmax() and got[5] != logits[5].argmax()   # penalised rows took the full rule


@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 1024, 3000, 150528])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_equals_torch_max_ties_and_infinities_included(vocab, dtype, monkeypatch):
    from kernels import cpu_argmax
    from model.sampling import first_argmax

    gen = torch.Generator().manual_seed(vocab)
    x = (torch.randn(6, vocab, generator=gen) * 3).to(dtype)
    x[1] = x[1].round()                                      # many ties, at the max too
    x[2] = -math.inf                                         # nothing but -inf: index 0
    x[3, -1] = 1e4                                           # the max in the tail block
    x[4, vocab // 2:] = x[4].max() + 1                        # a tie across blocks: the first
    x[5, 0] = 1e4
    expected = torch.max(x, dim=-1)
    for kernel in (True, False):             # fp32 on an AVX2 CPU: kernels.cpu_argmax; else torch
        monkeypatch.setattr(cpu_argmax, "ENABLED", kernel)
        values, indices = first_argmax(x)
        assert torch.equal(indices, expected.indices) and torch.equal(values, expected.values)
        y = x.clone()
        y[0, vocab // 3] = math.nan
        assert torch.isnan(first_argmax(y)[0][0]) and not torch.isnan(first_argmax(y)[0][1:]).any()
        assert torch.equal(first_argmax(y[1:])[1], expected.indices[1:])


def test_the_argmax_kernel_shares_rows_among_threads_and_agrees_with_torch_max():
    from kernels import cpu_argmax

    if not cpu_argmax.supports(torch.zeros(1, 8)):
        pytest.skip("no AVX2 (or no C compiler): first_argmax keeps its torch path")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 5001, generator=gen).round()        # ties in every row
    values, indices = cpu_argmax.first_max(x)
    expected = torch.max(x, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    assert cpu_argmax.first_max(x[:0])[1].shape == (0,)


def test_top_p_over_a_large_vocabulary_keeps_the_nucleus_of_the_sorted_rule(monkeypatch):
    """From ``TOP_P_MIN_VOCAB`` tokens on, top-p looks at a sorted prefix of the largest logits
    first: it keeps the tokens the full sort keeps, but for the one at the cut where the two
    cumulative sums round apart (their totals are summed in other orders); a flat row, whose
    nucleus is wider than any prefix tried, takes the sort and gets exactly its result."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(16, 60000, generator=gen) * 3
    logits[15] = 0.0                                                    # flat: the sort
    top_k = torch.tensor([0, 0, 50, 0, 500, 0, 0, 3000, 0, 0, 0, 20, 0, 0, 0, 0])
    top_p = torch.tensor([0.7, 0.9, 0.95, 0.5, 0.98, 0.3, 0.0, 0.8, 0.97, 0.6, 0.75, 0.85, 0.9, 0.1, 0.96, 0.9])
    taken, real = [], sampling._top_p_from_candidates
    monkeypatch.setattr(sampling, "_top_p_from_candidates", lambda *a: taken.append(real(*a)) or taken[-1])
    prefix = torch.cat([apply_top_k_top_p(logits[:15], top_k[:15], top_p[:15]),      # a prefix each
                        apply_top_k_top_p(logits[15:], top_k[15:], top_p[15:])])      # the sort
    monkeypatch.setattr(sampling, "TOP_P_MIN_VOCAB", 10**9)
    sorted_rule = apply_top_k_top_p(logits, top_k, top_p)
    same = 0
    for row in range(15):
        mine, theirs = prefix[row] > -65504, sorted_rule[row] > -65504
        # both keep a prefix of the same order: nested, at most the one token at the cut apart
        assert torch.equal(mine & theirs, mine) or torch.equal(mine & theirs, theirs), row
        assert abs(int(mine.sum()) - int(theirs.sum())) <= 1, row
        same += int(torch.equal(mine, theirs))
    assert same >= 13 and torch.equal(prefix[15], sorted_rule[15])
    assert taken[0] is not None and taken[1] is None           # the prefix served the 15, not the flat row
