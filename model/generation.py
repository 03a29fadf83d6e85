"""Generation over a (tensor-parallel) GLM shard: batched sampling, beam search,
and the official left-to-right filling of several blanks (``glm generate``).

Sampling and beam search decode through ``model.engine.Engine``, the engine the
worker's Prefill/Decode use, so both give the same tokens for the same rows (a beam
search is a group of rows there, ``model.engine.BeamGroup``). Every rank runs
the same forwards; rank 0 alone chooses tokens and broadcasts them, so the ranks
can never diverge (docs/model.md, "Generation").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.config import END_IDS
from model.engine import LENGTH, STOP, Batch, BeamOptions, Engine, RequestState, allowed_new_tokens
from model.glm import GLMModel
from model.prompt import Blank, PromptError, check_blanks, check_length, generation_mask, next_blank
from model.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationOptions:
    """How ``glm generate`` decodes every blank: token limits and the beam-search knobs."""

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
    finish_reason: str = LENGTH
    # Beam search, on rank 0: every candidate best first, (generated ids, score).
    candidates: list[tuple[list[int], float]] = field(default_factory=list)

    @property
    def content_ids(self) -> list[int]:
        """The ids that fill the blank: a trailing end token dropped, as the official code does."""
        if self.token_ids and self.token_ids[-1] in END_IDS:
            return self.token_ids[:-1]
        return self.token_ids


@dataclass
class FillResult:
    """Every filled blank, in order, and the prompt with all of them spliced in."""

    blanks: list[Completion]
    output_ids: list[int]   # the prompt with every filled blank spliced in


def _raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


class Generator:
    """``glm generate`` over one rank's shard: batched sampling and beam search through
    ``model.engine.Engine`` (the worker's engine too), and the official blank filling."""

    def __init__(self, model: GLMModel, engine: Engine | None = None) -> None:
        self.model = model
        self.ctx = model.ctx
        self.device = model.device
        self.engine = engine or Engine(model)

    def _allowed_new(self, blank: Blank, max_new: int) -> int:
        return allowed_new_tokens(blank, max_new, self.model.config.max_sequence_length)

    # -- sampling / greedy -----------------------------------------------------------
    def sample(self, blanks: list[Blank], params: list[SamplingParams],
               options: GenerationOptions) -> list[Completion]:
        """Generate one blank per row, batched; rows leave the batch when they finish."""
        if len(blanks) != len(params):
            raise ValueError("one SamplingParams per blank is needed")
        for blank in blanks:
            check_length(list(blank.context), self.model.config.max_sequence_length)
        out = [Completion() for _ in blanks]
        rows = [RequestState(i, blank, params[i], allowed, options.min_new_tokens)
                for i, blank in enumerate(blanks)
                if (allowed := self._allowed_new(blank, options.max_new_tokens)) > 0]
        if not rows:
            return out
        step = self.engine.prefill(Batch(0, rows))
        while True:
            if step.failed:
                raise RuntimeError(f"blank {step.failed[0].request.id}: {step.failed[0].message}")
            for token in step.tokens:
                done = out[token.request.id]
                done.token_ids.append(token.token_id)
                done.logprobs.append(token.logprob)
                if token.finish_reason is not None:
                    done.finish_reason = token.finish_reason
            if step.batch is None:
                return out
            step = self.engine.decode(step.batch)

    # -- beam search -----------------------------------------------------------------
    def beam_search(self, blank: Blank, options: GenerationOptions) -> Completion:
        """The official BeamSearchStrategy for one blank (consider_end, as generate.py),
        decoded by the engine's beam groups, as the worker decodes one (``model.engine``)."""
        check_length(list(blank.context), self.model.config.max_sequence_length)
        allowed = self._allowed_new(blank, options.max_new_tokens)
        if allowed == 0:
            return Completion()
        beam = BeamOptions(options.num_beams, options.length_penalty, options.no_repeat_ngram_size,
                           options.beam_deterministic, options.beam_seed)
        row = RequestState(0, blank, SamplingParams(greedy=True), allowed, options.min_new_tokens,
                           logprobs=False, beam=beam)
        step, ended = self.engine.prefill(Batch(0, [row])), None
        while True:
            if step.failed:
                raise RuntimeError(f"blank: {step.failed[0].message}")
            ended = next((t for t in step.tokens if t.finish_reason is not None), ended)
            if step.batch is None:
                break
            step = self.engine.decode(step.batch)
        candidates = [(list(ids), score) for ids, score in ended.candidates]        # rank 0 only
        generated = self._best_beam(candidates)
        reason = STOP if generated and generated[-1] in END_IDS else LENGTH
        return Completion(generated, self.score(blank, generated), reason, candidates)

    def _best_beam(self, candidates: list[tuple[list[int], float]]) -> list[int]:
        """Every rank gets rank 0's best candidate (the next blank is spliced from it)."""
        best = candidates[0][0] if self.ctx.rank == 0 else []
        size = self.ctx.broadcast(torch.tensor([len(best)], dtype=torch.long, device=self.device)).item()
        payload = torch.zeros(size, dtype=torch.long)
        if self.ctx.rank == 0:
            payload[:] = torch.tensor(best, dtype=torch.long)
        return self.ctx.broadcast(payload.to(self.device)).cpu().tolist() if size else []

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
        (one fresh prefill per blank); only the first with ``all_blanks=False``.

        The blanks are the prompt's own masks: the next one is searched after the content
        just spliced in, so a mask id the model generates is content, never a new blank
        (docs/model.md, "Generation"), and at most ``model.limits.MAX_BLANKS`` are filled."""
        mask = generation_mask(ids)
        if mask is None:
            raise PromptError("prompt holds no mask id ([MASK] 150000, [sMASK] 150002 or [gMASK] 150001)")
        check_blanks(ids)
        seq, blanks = list(ids), []
        blank = next_blank(seq, mask, 0)
        while blank is not None:
            if options.num_beams > 1:
                done = self.beam_search(blank, options)
            else:
                done = self.sample([blank], [params], options)[0]
            blanks.append(done)
            seq = blank.splice(done.content_ids)
            if not all_blanks:
                break
            blank = next_blank(seq, mask, blank.end(done.content_ids))
        return FillResult(blanks, seq)
