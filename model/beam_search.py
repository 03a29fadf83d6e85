"""Beam search with the exact semantics of the official GLM-130B ``BeamSearchStrategy``.

``docs/model.md`` "Generation"; the math, step by step, for every batch element:

1. Scores are fp32 ``log_softmax`` of the logits, accumulated across steps.
2. Invalid slices, and the end tokens while ``length_generated < min_gen_length``, get -65504.
3. No-repeat n-grams: each beam keeps a dict ``(n-1 previous tokens) -> banned next tokens``
   filled only when a token is generated (its prefix may reach into the context); a ban
   applies only once ``seq_len > n``. For n = 1 the official prefix slice ``[-0:]`` is the
   whole row, so nothing is ever banned; kept as is.
4. ``(max(1, len(end_tokens)) + 1) * num_beams`` candidates over ``beams * V`` are drawn by
   ``multinomial(softmax(total scores))`` (without replacement), or ``topk`` when
   ``deterministic``. The first step (fewer beams than ``num_beams``) uses beam 0 only.
5. Candidates are sorted by score; an end token (while the element is not done) becomes a
   finished beam scored ``score / ((5 + len) / 6) ** length_penalty`` with ``len`` the full
   length including context; other candidates continue until ``num_beams`` are found.
6. An element is done once it holds ``num_beams`` finished beams and the worst of them is
   ``>=`` best live score / penalty at ``seq_len + 1``. A done element keeps being stepped
   (its end tokens then continue as ordinary tokens) until every element is done.
7. ``finalize``: with ``consider_end`` the live beams of not-done elements join the finished
   ones; without it the live beams are returned (finished beams are dropped, as officially).

Unlike the official class, which reorders ``mems`` itself, ``step`` returns ``source_beam``
so a caller with a KV cache can ``index_select`` its cache rows.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import END_IDS

BAN_VALUE = -65504.0


class BeamSearch:
    """One beam search over ``batch_size`` independent prompts."""

    def __init__(
        self,
        batch_size: int,
        num_beams: int,
        length_penalty: float = 1.0,
        consider_end: bool = False,
        end_tokens: Sequence[int] = END_IDS,
        no_repeat_ngram_size: int = 0,
        min_gen_length: int = 0,
        deterministic: bool = False,
        seed: int | None = None,
        invalid_slices: Sequence[slice | int] = (),
    ):
        if batch_size < 1 or num_beams < 1:
            raise ValueError(f"beam search: batch_size {batch_size} and num_beams {num_beams} must be >= 1")
        if no_repeat_ngram_size < 0 or min_gen_length < 0:
            raise ValueError("beam search: no_repeat_ngram_size and min_gen_length must be >= 0")
        self.batch_size = batch_size
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.consider_end = consider_end
        self.end_tokens = tuple(int(t) for t in end_tokens)
        self.ngram = no_repeat_ngram_size
        self.min_gen_length = min_gen_length
        self.deterministic = deterministic
        # The seed actually used for non-deterministic picks (drawn when not given).
        self.seed = seed if seed is not None else secrets.randbits(63)
        self.invalid_slices = tuple(invalid_slices)
        self.num_candidates = (max(1, len(self.end_tokens)) + 1) * num_beams
        self._generator: torch.Generator | None = None
        self.reset()

    def reset(self) -> None:
        """Forget all state (the official ``_init_cache``); the generator keeps running."""
        self.end_beams: list[list[Tensor]] = [[] for _ in range(self.batch_size)]
        self.end_scores: list[list[float]] = [[] for _ in range(self.batch_size)]  # penalised, best first
        self.beam_scores: Tensor | None = None  # [batch, num_beams] fp32, None before step 1
        self.ngram_bans: list[list[dict]] = [
            [{} for _ in range(self.num_beams)] for _ in range(self.batch_size)
        ]
        self.length_generated = 0
        self.done: list[bool] = [False] * self.batch_size

    @property
    def is_done(self) -> bool:
        return all(self.done)

    def _penalty(self, length: int) -> float:
        return ((5.0 + length) / 6) ** self.length_penalty  # OpenNMT / GNMT

    def _add_end_beam(self, score: Tensor, beam: Tensor, b: int) -> None:
        """Insert keeping best first; a tie goes before the older beam; keep num_beams."""
        penalised = float(score / self._penalty(len(beam)))  # fp32 division, as officially
        scores = self.end_scores[b]
        i = len(scores)
        while i > 0 and not penalised < scores[i - 1]:
            i -= 1
        self.end_beams[b].insert(i, beam)
        scores.insert(i, penalised)
        del self.end_beams[b][self.num_beams :], scores[self.num_beams :]

    def _prefixes(self, tokens: Tensor) -> list:
        """The official ``tokens[..., -(n - 1):]`` as nested lists: the last n-1 tokens, or
        the whole row when it is shorter or when n = 1 (``[-0:]``). [batch, beams, <=n-1]"""
        start = max(0, tokens.shape[-1] - (self.ngram - 1)) if self.ngram > 1 else 0
        return tokens[..., start:].tolist()

    def _ban(self, logits: Tensor, tokens: Tensor) -> None:
        """Invalid slices, min-length end bans and n-gram bans, in place. logits [b, k, V]."""
        for invalid in self.invalid_slices:
            logits[..., invalid] = BAN_VALUE
        if self.min_gen_length > self.length_generated:
            for end in self.end_tokens:
                logits[..., end] = BAN_VALUE
        batch, beams, seq_len = tokens.shape
        if self.ngram > 0 and seq_len > self.ngram:
            prefixes = self._prefixes(tokens)
            where = [
                (b, i, banned)
                for b in range(batch)
                for i in range(beams)
                for banned in self.ngram_bans[b][i].get(tuple(prefixes[b][i]), ())
            ]
            if where:
                b_idx, i_idx, v_idx = (torch.tensor(x, device=logits.device) for x in zip(*where))
                logits[b_idx, i_idx, v_idx] = BAN_VALUE

    def _pick(self, scores: Tensor, vocab: int, first: bool) -> Tensor:
        """scores [batch, beams * V] -> candidate flat indices [batch, num_candidates]."""
        probs = F.softmax(scores, dim=-1)
        if first:  # first token: only the first beam's row
            probs = probs[..., :vocab]
        if self.deterministic:
            return torch.topk(probs, k=self.num_candidates).indices
        if self._generator is None or self._generator.device != probs.device:
            self._generator = torch.Generator(device=probs.device)
            self._generator.manual_seed(self.seed)
        return torch.multinomial(probs, self.num_candidates, generator=self._generator)

    def step(self, logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """One step. logits [batch, beams_now, V]; tokens LongTensor [batch, beams_now, seq_len]
        (beams_now = 1 on the first step). Returns new tokens [batch, num_beams, seq_len + 1]
        and source_beam LongTensor [batch, num_beams]: new beam j continues row
        source_beam[b, j] of the previous step (reorder a KV cache with it)."""
        batch, beams_now, vocab = logits.shape
        seq_len = tokens.shape[-1]
        if batch != self.batch_size or tokens.shape[:2] != (batch, beams_now):
            raise ValueError(f"beam search: logits {tuple(logits.shape)} vs tokens {tuple(tokens.shape)}")
        logits = logits.float().clone()
        self._ban(logits, tokens)
        scores = F.log_softmax(logits, dim=-1)  # [batch, beams_now, V]
        if self.beam_scores is not None:
            scores = scores + self.beam_scores.unsqueeze(-1)
        scores = scores.view(batch, beams_now * vocab)

        picks = self._pick(scores, vocab, first=beams_now < self.num_beams)  # [batch, c]
        pick_scores = scores.gather(1, picks)
        pick_scores, order = torch.sort(pick_scores, descending=True, dim=1)
        picks = picks.gather(1, order)
        sources = torch.div(picks, vocab, rounding_mode="trunc")  # [batch, c]
        next_tokens = picks % vocab

        src_list, tok_list = sources.tolist(), next_tokens.tolist()
        prefixes = self._prefixes(tokens) if self.ngram > 0 else None
        chosen: list[list[int]] = []  # candidate positions that continue, per element
        for b in range(batch):
            keep: list[int] = []
            bans = []
            for c, (src, tok) in enumerate(zip(src_list[b], tok_list[b])):
                if not self.done[b] and tok in self.end_tokens:
                    beam = torch.cat((tokens[b, src], next_tokens[b, c : c + 1]))
                    self._add_end_beam(pick_scores[b, c], beam, b)
                elif len(keep) < self.num_beams:
                    keep.append(c)
                    if self.ngram > 0:
                        beam_bans = self.ngram_bans[b][src].copy()
                        key = tuple(prefixes[b][src])
                        beam_bans[key] = beam_bans.get(key, ()) + (tok,)
                        bans.append(beam_bans)
                else:
                    break
            if len(keep) < self.num_beams:
                raise RuntimeError(f"beam search: only {len(keep)} live candidates for element {b}")
            chosen.append(keep)
            self.ngram_bans[b] = bans
        keep_idx = torch.tensor(chosen, device=picks.device)  # [batch, num_beams]
        source_beam = sources.gather(1, keep_idx)  # [batch, num_beams]
        new_token = next_tokens.gather(1, keep_idx)  # [batch, num_beams]
        self.beam_scores = pick_scores.gather(1, keep_idx)  # [batch, num_beams] fp32
        rows = torch.arange(batch, device=tokens.device).unsqueeze(1)
        new_tokens = torch.cat(
            (tokens[rows, source_beam.to(tokens.device)], new_token.unsqueeze(-1).to(tokens.device)), dim=-1
        )  # [batch, num_beams, seq_len + 1]
        self.length_generated += 1

        best_live = (self.beam_scores.max(dim=1).values / self._penalty(seq_len + 1)).tolist()
        for b in range(batch):
            if len(self.end_scores[b]) == self.num_beams and self.end_scores[b][-1] >= best_live[b]:
                self.done[b] = True  # no live beam can beat the worst finished one
        return new_tokens, source_beam

    def finalize(self, tokens: Tensor) -> list[list[tuple[Tensor, float]]]:
        """Per batch element, (token row, score) best first; then reset. tokens [batch, beams, seq]."""
        scores = self.beam_scores
        if self.consider_end:
            if scores is not None:
                for b in range(tokens.shape[0]):
                    if not self.done[b]:
                        for i in range(tokens.shape[1]):
                            self._add_end_beam(scores[b, i], tokens[b, i], b)
            result = [list(zip(self.end_beams[b], self.end_scores[b])) for b in range(tokens.shape[0])]
        else:  # official: the live beams (already sorted by raw cumulative score)
            result = [
                [(tokens[b, i], float(scores[b, i]) if scores is not None else 0.0) for i in range(tokens.shape[1])]
                for b in range(tokens.shape[0])
            ]
        self.reset()
        return result
