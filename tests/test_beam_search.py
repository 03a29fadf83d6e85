"""model.beam_search against a transcription of the official BeamSearchStrategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.beam_search import BeamSearch

VOCAB = 16
END = (14, 15)


class OfficialBeamSearch:
    """GLM-130B ``generation/strategies.py`` BeamSearchStrategy (commit c713dae), transcribed.

    Changes: numpy bool -> list, an explicit generator for multinomial, and ``mems`` is a
    [1, batch, beams] tensor of beam ids so its reordering can be compared."""

    def __init__(self, batch_size, num_beams, length_penalty=1.0, consider_end=False, end_tokens=[],
                 invalid_slices=[], no_repeat_ngram_size=0, min_gen_length=0, deterministic=False,
                 generator=None):
        self.batch_size, self.num_beams, self.length_penalty = batch_size, num_beams, length_penalty
        self.end_tokens, self.ngram, self.min_gen_length = end_tokens, no_repeat_ngram_size, min_gen_length
        self.invalid_slices, self.consider_end, self.deterministic = invalid_slices, consider_end, deterministic
        self.generator = generator
        self._init_cache()

    def _init_cache(self):
        self.end_beams = [[] for _ in range(self.batch_size)]
        self.end_beams_penalized_scores = [[] for _ in range(self.batch_size)]
        self.cached_beam_scores = 0
        self.cached_beam_ngram_bans = [[{} for _ in range(self.num_beams)] for _ in range(self.batch_size)]
        self.length_generated = 0
        self._is_done = [False] * self.batch_size

    def _add_end_beams(self, score, beam, batch_idx):
        score = score / ((5.0 + len(beam)) / 6) ** self.length_penalty
        for i in range(len(self.end_beams[batch_idx]), -1, -1):
            if i == 0 or score < self.end_beams_penalized_scores[batch_idx][i - 1]:
                break
        self.end_beams[batch_idx].insert(i, beam)
        self.end_beams_penalized_scores[batch_idx].insert(i, score)
        self.end_beams[batch_idx] = self.end_beams[batch_idx][: self.num_beams]
        self.end_beams_penalized_scores[batch_idx] = self.end_beams_penalized_scores[batch_idx][: self.num_beams]

    @property
    def is_done(self):
        return all(self._is_done)

    def forward(self, logits, tokens, mems):
        batch_size, num_beams, vocab_size = logits.shape
        seq_len = tokens.shape[-1]
        logits = logits.float()
        for invalid_slice in self.invalid_slices:
            logits[..., invalid_slice] = -65504
        if self.min_gen_length > self.length_generated:
            for end_token in self.end_tokens:
                logits[..., end_token] = -65504
        if self.ngram > 0 and seq_len > self.ngram:
            for batch_idx in range(batch_size):
                for i in range(num_beams):
                    ngram_prefix = tokens[batch_idx, i, -(self.ngram - 1):].tolist()
                    for banned_index in self.cached_beam_ngram_bans[batch_idx][i].get(tuple(ngram_prefix), []):
                        logits[batch_idx, i, banned_index] = -65504
        next_token_scores = F.log_softmax(logits, dim=-1)
        prev_scores = self.cached_beam_scores
        if isinstance(prev_scores, torch.Tensor):
            prev_scores = prev_scores[..., None].expand_as(next_token_scores)
        next_token_scores = next_token_scores + prev_scores
        next_token_scores = next_token_scores.view(batch_size, num_beams * vocab_size)
        probs = F.softmax(next_token_scores, dim=-1)
        if num_beams < self.num_beams:
            probs = probs[..., :vocab_size]
        n = (max(1, len(self.end_tokens)) + 1) * self.num_beams
        if self.deterministic:
            next_tokens = torch.topk(probs, k=n).indices
        else:
            next_tokens = torch.multinomial(probs, num_samples=n, generator=self.generator)
        next_token_scores = next_token_scores[torch.arange(batch_size).unsqueeze(1), next_tokens]
        next_token_scores, _indices = torch.sort(next_token_scores, descending=True, dim=1)
        next_tokens = next_tokens[torch.arange(batch_size).unsqueeze(1), _indices]
        next_indices = torch.div(next_tokens, vocab_size, rounding_mode="trunc")
        next_tokens = next_tokens % vocab_size
        beam_continue_batch, score_continue_batch, mems_continue_batch = [], [], []
        for batch_idx in range(batch_size):
            beam_continue, scores_continue, bans_continue, mems_contiue = [], [], [], []
            for i in range(len(next_tokens[batch_idx])):
                beam = torch.cat((tokens[batch_idx, next_indices[batch_idx, i]], next_tokens[batch_idx, i : i + 1]))
                if not self._is_done[batch_idx] and int(next_tokens[batch_idx, i]) in self.end_tokens:
                    self._add_end_beams(next_token_scores[batch_idx, i], beam, batch_idx)
                elif len(beam_continue) < self.num_beams:
                    beam_continue.append(beam)
                    mems_contiue.append(mems[:, batch_idx, next_indices[batch_idx, i]])
                    scores_continue.append(next_token_scores[batch_idx, i])
                    if self.ngram > 0:
                        bans = self.cached_beam_ngram_bans[batch_idx][next_indices[batch_idx, i]].copy()
                        ngram_prefix = tuple(tokens[batch_idx, next_indices[batch_idx, i], -(self.ngram - 1):].tolist())
                        bans[ngram_prefix] = bans.get(ngram_prefix, tuple()) + (next_tokens[batch_idx, i],)
                        bans_continue.append(bans)
                else:
                    break
            beam_continue_batch.append(torch.stack(beam_continue))
            mems_continue_batch.append(torch.stack(mems_contiue, dim=1))
            score_continue_batch.append(scores_continue)
            self.cached_beam_ngram_bans[batch_idx] = bans_continue
        tokens = torch.stack(beam_continue_batch)
        mems = torch.stack(mems_continue_batch, dim=1)
        self.cached_beam_scores = torch.tensor(score_continue_batch, device=logits.device)
        self.length_generated += 1
        for batch_idx in range(self.batch_size):
            if batch_idx >= batch_size:
                self._is_done[batch_idx] = True
            elif (
                len(self.end_beams[batch_idx]) == self.num_beams
                and self.end_beams_penalized_scores[batch_idx][-1]
                >= self.cached_beam_scores[batch_idx].max() / ((5.0 + (seq_len + 1)) / 6) ** self.length_penalty
            ):
                self._is_done[batch_idx] = True
        return tokens, mems

    def finalize(self, tokens, mems):
        if self.consider_end:
            batch_size, num_beams = tokens.shape[:2]
            for batch_idx in range(batch_size):
                if not self._is_done[batch_idx]:
                    for i in range(num_beams):
                        self._add_end_beams(self.cached_beam_scores[batch_idx, i], tokens[batch_idx, i], batch_idx)
            ret = [list(zip(b, map(float, s))) for b, s in zip(self.end_beams, self.end_beams_penalized_scores)]
        else:
            ret = [[(tokens[b, i], float(self.cached_beam_scores[b, i])) for i in range(tokens.shape[1])]
                   for b in range(tokens.shape[0])]
        self._init_cache()
        return ret, None


class FakeModel:
    """Logits are a fixed table per batch element, indexed by the last token."""

    def __init__(self, batch, seed, end_bias=(0.0,)):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(batch, VOCAB, VOCAB, generator=g) * 2.5  # [b, last, V]
        for b, bias in enumerate(end_bias * batch if len(end_bias) == 1 else end_bias):
            self.table[b, :, list(END)] += bias

    def __call__(self, tokens):  # tokens [b, k, s] -> logits [b, k, V]
        b = torch.arange(tokens.shape[0]).unsqueeze(1)
        return self.table[b, tokens[..., -1]].clone()


def _context(batch, length=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, END[0], (batch, 1, length), generator=g)  # [b, 1, s], no end tokens


def run_ours(model, context, max_steps, seed=0, **kw):
    search = BeamSearch(context.shape[0], end_tokens=END, seed=seed, **kw)
    tokens, history = context, []
    for _ in range(max_steps):
        if search.is_done:
            break
        tokens, source = search.step(model(tokens), tokens)
        history.append((tokens.clone(), source.clone(), list(search.done)))
    return search.finalize(tokens), history


def run_official(model, context, max_steps, seed=0, **kw):
    official = OfficialBeamSearch(context.shape[0], end_tokens=list(END),
                                  generator=torch.Generator().manual_seed(seed), **kw)
    tokens, history = context, []
    for _ in range(max_steps):
        if official.is_done:
            break
        mems = torch.arange(tokens.shape[1]).repeat(tokens.shape[0], 1).unsqueeze(0)  # [1, b, k]
        tokens, mems = official.forward(model(tokens), tokens, mems)
        history.append((tokens.clone(), mems[0].clone(), list(official._is_done)))
    return official.finalize(tokens, None)[0], history


CASES = [
    dict(num_beams=3, deterministic=True),
    dict(num_beams=3, deterministic=False),
    dict(num_beams=4, deterministic=True, no_repeat_ngram_size=3, consider_end=True),
    dict(num_beams=4, deterministic=False, no_repeat_ngram_size=2, consider_end=True, min_gen_length=3),
    dict(num_beams=2, deterministic=False, length_penalty=2.0, consider_end=True),
    dict(num_beams=3, deterministic=True, length_penalty=0.0, consider_end=True, no_repeat_ngram_size=1),
    dict(num_beams=1, deterministic=True, consider_end=True, no_repeat_ngram_size=2),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("model_seed,end_bias", [(0, (0.0,)), (1, (3.0, -1.0)), (2, (1.5,))])
def test_matches_official(kw, model_seed, end_bias):
    model, context = FakeModel(2, model_seed, end_bias), _context(2, seed=model_seed)
    ours, ours_hist = run_ours(model, context, 12, seed=model_seed, **kw)
    ref, ref_hist = run_official(model, context, 12, seed=model_seed, **kw)
    assert len(ours_hist) == len(ref_hist)
    for step, ((t, s, d), (rt, rs, rd)) in enumerate(zip(ours_hist, ref_hist)):
        assert torch.equal(t, rt), f"tokens differ at step {step}"
        assert torch.equal(s, rs), f"source_beam differs at step {step}"
        assert d == rd, f"done flags differ at step {step}"
    assert len(ours) == len(ref)
    for b, (mine, theirs) in enumerate(zip(ours, ref)):
        assert [x.tolist() for x, _ in mine] == [x.tolist() for x, _ in theirs], f"element {b}"
        assert [s for _, s in mine] == [s for _, s in theirs], f"element {b} scores"


def test_one_element_done_while_other_runs():
    """Element 0 loves end tokens and finishes early; element 1 keeps going (official: the
    done element keeps being stepped and its end tokens continue as ordinary tokens)."""
    model, context = FakeModel(2, 5, (6.0, -4.0)), _context(2, seed=5)
    kw = dict(num_beams=2, deterministic=True, consider_end=True)
    ours, hist = run_ours(model, context, 10, **kw)
    ref, _ = run_official(model, context, 10, **kw)
    dones = [d for _, _, d in hist]
    assert [True, False] in dones
    assert [[x.tolist() for x, _ in r] for r in ours] == [[x.tolist() for x, _ in r] for r in ref]


def test_length_penalty_orders_finished_beams():
    ctx = torch.zeros(6, dtype=torch.long)
    short, long = torch.cat([ctx, torch.tensor([14])]), torch.cat([ctx, torch.tensor([1, 2, 3, 14])])
    for lp, best in ((1.0, long), (0.0, short)):
        search = BeamSearch(1, 2, length_penalty=lp, end_tokens=END, consider_end=True)
        search._add_end_beam(torch.tensor(-2.0), short, 0)  # len 7: /2.0 at lp=1
        search._add_end_beam(torch.tensor(-2.4), long, 0)  # len 10: /2.5 at lp=1
        ranked = search.finalize(torch.zeros(1, 2, 10, dtype=torch.long))
        assert torch.equal(ranked[0][0][0], best)
    assert ranked[0][0][1] == pytest.approx(-2.0) and ranked[0][1][1] == pytest.approx(-2.4)


def test_no_repeat_ngram_bans_generated_ngrams():
    # A model that always wants the cycle 1 -> 2 -> 1 -> 2 ...
    model = FakeModel(1, 0)
    model.table[:] = -5.0
    model.table[0, :, 1] = 5.0
    model.table[0, 1, 2] = 8.0
    context = torch.tensor([[[7, 8, 9]]])
    for n in (2, 3):
        results, _ = run_ours(model, context, 10, num_beams=2, deterministic=True, no_repeat_ngram_size=n)
        for row, _ in results[0]:
            row = row.tolist()
            grams = [tuple(row[i - n + 1 : i + 1]) for i in range(3, len(row))]  # ending in a generated token
            assert len(grams) == len(set(grams)), (n, row)
    unbanned, _ = run_ours(model, context, 10, num_beams=2, deterministic=True)
    assert unbanned[0][0][0].tolist()[3:7] == [1, 2, 1, 2]  # the test model does want to repeat


def test_min_gen_length_bans_end_tokens():
    model = FakeModel(1, 3, (8.0,))  # end tokens dominate
    context = _context(1, length=4)
    quick, _ = run_ours(model, context, 20, num_beams=2, deterministic=True, consider_end=True)
    assert min(len(t) for t, _ in quick[0]) == 5  # ends right away without the ban
    results, _ = run_ours(model, context, 20, num_beams=2, deterministic=True, consider_end=True, min_gen_length=4)
    for row, _ in results[0]:
        generated = row.tolist()[4:]
        assert len(generated) >= 5 and not set(generated[:4]) & set(END)


def test_consider_end_returns_finished_beams_sorted():
    model = FakeModel(1, 4, (1.0,))
    context = _context(1)
    with_end, _ = run_ours(model, context, 8, num_beams=3, deterministic=True, consider_end=True)
    scores = [s for _, s in with_end[0]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert any(int(t[-1]) in END for t, _ in with_end[0])
    live, _ = run_ours(model, context, 8, num_beams=3, deterministic=True, consider_end=False)
    assert all(len(t) == len(live[0][0][0]) for t, _ in live[0])  # live beams only, same length


def test_source_beam_reorders_a_cache():
    model, context = FakeModel(2, 6), _context(2, seed=6)
    search = BeamSearch(2, 3, end_tokens=END, deterministic=True)
    tokens = context
    cache = tokens.clone()  # a stand-in KV cache: one row per beam, [b, k, s]
    for _ in range(4):
        tokens, source = search.step(model(tokens), tokens)
        cache = torch.stack([cache[b].index_select(0, source[b]) for b in range(2)])
        cache = torch.cat([cache, tokens[..., -1:]], dim=-1)
        assert torch.equal(cache, tokens)


def test_bad_shapes_raise():
    search = BeamSearch(2, 2, end_tokens=END)
    with pytest.raises(ValueError):
        search.step(torch.randn(1, 1, VOCAB), torch.zeros(1, 1, 3, dtype=torch.long))


def test_first_step_uses_only_the_first_beam_row():
    """With fewer rows than num_beams (a first step), candidates come from row 0 only."""
    model, context = FakeModel(1, 7), _context(1, seed=7)
    tokens = torch.cat([context, context.flip(-1)], dim=1)  # [1, 2, s]: two different rows
    logits = model(tokens)
    for deterministic in (True, False):
        ours = BeamSearch(1, 3, end_tokens=END, deterministic=deterministic, seed=3)
        ref = OfficialBeamSearch(1, 3, end_tokens=list(END), deterministic=deterministic,
                                 generator=torch.Generator().manual_seed(3))
        new, source = ours.step(logits, tokens)
        ref_new, ref_mems = ref.forward(logits, tokens, torch.arange(2).view(1, 1, 2))
        assert source.tolist() == [[0, 0, 0]] and torch.equal(new, ref_new)


def test_equal_penalised_scores_newest_first():
    search = BeamSearch(1, 3, end_tokens=END, consider_end=True)
    old, new = torch.tensor([1, 2, 14]), torch.tensor([3, 4, 14])
    search._add_end_beam(torch.tensor(-1.0), old, 0)
    search._add_end_beam(torch.tensor(-1.0), new, 0)
    ranked = search.finalize(torch.zeros(1, 3, 3, dtype=torch.long))
    assert [t.tolist() for t, _ in ranked[0]] == [new.tolist(), old.tolist()]
