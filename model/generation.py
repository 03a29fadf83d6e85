"""Generation over a (tensor-parallel) GLM shard: batched sampling, beam search,
and the official left-to-right filling of several blanks.

Every rank runs the same forwards; rank 0 alone chooses tokens and broadcasts
them, so the ranks can never diverge. Prompts of a batch are left-padded; the
KV cache's slot flags give each row its own prefix-LM attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.beam_search import BeamSearch
from model.config import END_IDS
from model.glm import GLMModel
from model.prompt import Blank, PromptError, check_length, generation_mask
from model.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    beam_deterministic: bool = False
    beam_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "min_new_tokens", "no_repeat_ngram_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")


@dataclass
class Completion:
    """What one blank produced: generated ids (the end token included when it
    stopped on one), the fp32 log-softmax of each, and why it stopped."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def content_ids(self) -> list[int]:
        """The ids that fill the blank: a trailing end token dropped, as the official code does."""
        if self.token_ids and self.token_ids[-1] in END_IDS:
            return self.token_ids[:-1]
        return self.token_ids


@dataclass
class FillResult:
    blanks: list[Completion]
    output_ids: list[int]   # the prompt with every filled blank spliced in


def _raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


class Generator:
    def __init__(self, model: GLMModel) -> None:
        self.model = model
        self.ctx = model.ctx
        self.device = model.device

    # -- shared pieces ---------------------------------------------------------------
    def _allowed_new(self, blank: Blank, max_new: int) -> int:
        return max(0, min(max_new, self.model.config.max_sequence_length - len(blank.input_ids)))

    def _prefill(self, blanks: list[Blank], capacity_extra: int):
        """Left-padded prefill of ``context + sop`` for every blank; last-token logits."""
        lengths = [len(b.input_ids) for b in blanks]
        width = max(lengths)
        b = len(blanks)
        ids = torch.zeros((b, width), dtype=torch.long)
        pos = torch.zeros((b, width), dtype=torch.long)
        valid = torch.zeros((b, width), dtype=torch.bool)
        prefix = torch.zeros((b, width), dtype=torch.bool)
        for row, blank in enumerate(blanks):
            pad = width - lengths[row]
            ids[row, pad:] = torch.tensor(blank.input_ids)
            pos[row, pad:-1] = torch.tensor(blank.context_positions())
            pos[row, -1] = blank.position(0)
            valid[row, pad:] = True
            prefix[row, pad:-1] = True
        cache = self.model.new_cache(b, width + capacity_extra)
        mask = cache.extend(valid.to(self.device), prefix.to(self.device))
        logits = self.model(ids.to(self.device), pos.to(self.device), mask, cache, last_only=True)
        return logits[:, -1], cache                                         # [b, V]

    def _step(self, cache, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        b = tokens.shape[0]
        ones = torch.ones((b, 1), dtype=torch.bool, device=self.device)
        mask = cache.extend(ones, ~ones)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]
        return self.model(tokens.view(b, 1).to(self.device), pos, mask, cache)[:, -1]

    # -- sampling / greedy -----------------------------------------------------------
    def sample(self, blanks: list[Blank], params: list[SamplingParams],
               options: GenerationOptions) -> list[Completion]:
        """Generate one blank per row, batched; rows leave the batch when they finish."""
        if len(blanks) != len(params):
            raise ValueError("one SamplingParams per blank is needed")
        for blank in blanks:
            check_length(list(blank.context), self.model.config.max_sequence_length)
        allowed = [self._allowed_new(b, options.max_new_tokens) for b in blanks]
        out = [Completion() for _ in blanks]
        active = [i for i in range(len(blanks)) if allowed[i] > 0]
        if not active:
            return out
        logits, cache = self._prefill([blanks[i] for i in active], max(allowed))
        sampler = Sampler([params[i] for i in active], device=self.device)
        is_end = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
        is_end[list(END_IDS)] = True
        while True:
            n_gen = [len(out[i].token_ids) for i in active]
            ban = torch.tensor([n < options.min_new_tokens for n in n_gen], device=self.device)
            chosen_from = logits.clone()
            chosen_from[ban[:, None] & is_end] = -float("inf")          # min_new_tokens
            tokens = torch.empty(len(active), dtype=torch.long, device=self.device)
            if self.ctx.rank == 0:
                tokens, _ = sampler.sample(chosen_from, [list(blanks[i].context) for i in active],
                                           [out[i].token_ids for i in active])
                tokens = tokens.to(self.device)
            self.ctx.broadcast(tokens)
            logprobs = _raw_logprobs(logits, tokens)
            keep = []
            for row, i in enumerate(active):
                tok = int(tokens[row])
                out[i].token_ids.append(tok)
                out[i].logprobs.append(float(logprobs[row]))
                if tok in END_IDS:
                    out[i].finish_reason = "stop"
                elif len(out[i].token_ids) < allowed[i]:
                    keep.append(row)
            if not keep:
                return out
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=self.device)
                cache, sampler = cache.select(rows), sampler.rows(keep)
                tokens, active = tokens[rows], [active[r] for r in keep]
            positions = [blanks[i].position(len(out[i].token_ids)) for i in active]
            logits = self._step(cache, tokens, positions)

    # -- beam search -----------------------------------------------------------------
    def beam_search(self, blank: Blank, options: GenerationOptions) -> Completion:
        """The official BeamSearchStrategy for one blank (consider_end, as generate.py)."""
        check_length(list(blank.context), self.model.config.max_sequence_length)
        allowed = self._allowed_new(blank, options.max_new_tokens)
        if allowed == 0:
            return Completion()
        search = BeamSearch(
            batch_size=1, num_beams=options.num_beams, length_penalty=options.length_penalty,
            consider_end=True, end_tokens=list(END_IDS),
            no_repeat_ngram_size=options.no_repeat_ngram_size, min_gen_length=options.min_new_tokens,
            deterministic=options.beam_deterministic, seed=options.beam_seed,
        )
        logits, cache = self._prefill([blank], allowed)
        tokens = torch.tensor([blank.input_ids], dtype=torch.long)[None]          # [1, 1, seq]
        nb = options.num_beams
        for step in range(allowed):
            payload = torch.zeros(1 + 2 * nb, dtype=torch.long)
            if self.ctx.rank == 0:
                new_tokens, source = search.step(logits.float()[None].cpu(), tokens)
                payload[0] = int(search.is_done)
                payload[1: 1 + nb] = new_tokens[0, :, -1]
                payload[1 + nb:] = source[0]
            payload = self.ctx.broadcast(payload.to(self.device)).cpu()
            last, source = payload[1: 1 + nb], payload[1 + nb:]
            tokens = torch.cat([tokens[:, source], last.view(1, nb, 1)], dim=-1)  # [1, nb, seq+1]
            if payload[0] or step + 1 == allowed:
                break
            cache = cache.select(source.to(self.device))
            logits = self._step(cache, last, [blank.position(step + 1)] * nb)
        generated = self._best_beam(search, tokens, len(blank.input_ids))
        reason = "stop" if generated and generated[-1] in END_IDS else "length"
        return Completion(generated, self.score(blank, generated), reason)

    def _best_beam(self, search: BeamSearch, tokens: torch.Tensor, start: int) -> list[int]:
        """Rank 0 finalizes the search; every rank gets the best beam's generated ids."""
        payload = torch.zeros(tokens.shape[-1] - start + 1, dtype=torch.long)
        if self.ctx.rank == 0:
            seq = search.finalize(tokens)[0][0][0].tolist()[start:]
            payload[0] = len(seq)
            payload[1: 1 + len(seq)] = torch.tensor(seq, dtype=torch.long)
        payload = self.ctx.broadcast(payload.to(self.device)).cpu()
        return payload[1: 1 + int(payload[0])].tolist()

    def score(self, blank: Blank, generated: list[int]) -> list[float]:
        """Raw fp32 log-probs of ``generated`` after ``blank``, teacher-forced in one pass."""
        if not generated:
            return []
        ids = blank.input_ids + generated[:-1]
        n_ctx = blank.context_length
        pos = blank.context_positions() + [blank.position(k) for k in range(len(generated))]
        cache = self.model.new_cache(1, len(ids))
        valid = torch.ones((1, len(ids)), dtype=torch.bool, device=self.device)
        prefix = torch.zeros_like(valid)
        prefix[:, :n_ctx] = True
        mask = cache.extend(valid, prefix)
        logits = self.model(torch.tensor([ids], device=self.device),
                            torch.tensor([pos], device=self.device), mask, cache)[0, n_ctx:]
        target = torch.tensor(generated, device=self.device)
        return _raw_logprobs(logits, target).tolist()

    # -- blank filling ---------------------------------------------------------------
    def fill_blanks(self, ids: list[int], params: SamplingParams, options: GenerationOptions,
                    *, all_blanks: bool = True) -> FillResult:
        """Fill the generation mask's blanks left to right, as the official ``fill_blanks``
        (one fresh prefill per blank); only the first with ``all_blanks=False``."""
        mask = generation_mask(ids)
        if mask is None:
            raise PromptError("prompt holds no mask id ([MASK] 150000, [sMASK] 150002 or [gMASK] 150001)")
        seq, blanks = list(ids), []
        while mask in seq:
            blank = Blank.first(seq, mask)
            if options.num_beams > 1:
                done = self.beam_search(blank, options)
            else:
                done = self.sample([blank], [params], options)[0]
            blanks.append(done)
            seq = blank.splice(done.content_ids)
            if not all_blanks:
                break
        return FillResult(blanks, seq)
