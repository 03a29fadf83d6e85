"""Per-row token sampling: penalties, temperature, official top-k / top-p, seeded draws.

The filtering math is the official GLM-130B ``BaseStrategy`` + SwissArmyTransformer
``top_k_logits`` (docs/model.md, "Generation"):

* top-k keeps every logit ``>=`` the k-th largest (ties at the threshold survive);
* top-p sorts the (top-k filtered) logits, takes the cumulative softmax, removes the
  tokens where it exceeds p, shifted right by one so the first token above p is kept;
* removed logits get the filter value -65504, then ``softmax(fp32)`` and a draw from it.

The official top-p step flattens the logits to 1-D and so only works at batch 1. Here
every row carries its own ``SamplingParams`` and its own seed, the filter is vectorised
over rows (one sort per step for top-p, a partial selection for top-k alone), and a row's
draw never depends on which other rows share the batch: a seeded request reproduces
whatever it is batched with.

The draw: the official code calls ``torch.multinomial`` on the global generator, which draws
one exponential per vocabulary entry (3.4 ms a row of 150 528 on this project's CPUs, ~100 ms
a 32-row step: docs/benchmarks.md, "Sampled requests") and takes ``argmax(p / q)``. Ours takes
the same distribution the same way in log form, ``argmax(v + g)`` with Gumbel noise ``g``,
the noise at each token a hash of the token and the row's keys (``draw_keys``: its seed and
the number of tokens it generated) instead of a generator's stream (``kernels.cpu_sample`` on
a CPU, ``gumbel_draw`` elsewhere). The draws are not the official generator's stream (that
one is global, shared by every request, and no batched server can replay it), but each is a
function of ``(seed, k)`` and the row's logits alone, so a request resumed elsewhere from its
first k tokens (another pool, after a failure) continues with exactly the draws it would have
made; and, as with the exponentials, logits that differ below the winner's lead (another TP
degree or batch shape) draw the same token.

Extensions the official code lacks (issue #65): a CTRL/HF repetition penalty over
prompt + output tokens and OpenAI presence/frequency penalties over output tokens.

Numerically safe for every accepted parameter (the ranges are ``model.limits``): the
processed logits are fp32 with NaN read as the lowest score and every value clamped
to ``[-LOGIT_BOUND, LOGIT_BOUND]`` after the temperature (a no-op on ordinary logits);
a row whose scaled logits fall below the filter value is filtered with ``-inf`` instead
(so a removed token can never outrank a kept one); and a row whose distribution still
degenerates (its weights do not sum to a finite positive) takes its argmax instead of a
draw. No accepted request can make a draw fail.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu_argmax, cpu_sample
from model.limits import (PENALTY_RANGE, TOP_P_RANGE, range_problem, repetition_penalty_problem,
                          temperature_problem)

FILTER_VALUE = -65504.0  # the official filter value (fp16 lowest), not -inf
TOP_P_MIN_VOCAB = 16384          # from this vocabulary size top-p looks at a sorted prefix first
TOP_P_CANDIDATES = (1024, 8192)  # the prefixes tried before a full sort
LOGIT_BOUND = 1e30       # processed fp32 logits are clamped to +-this (fp32 max is 3.4e38)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token. ``temperature == 0`` means greedy; every
    range is ``model.limits``'s (the gateway checks the same constants)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 0 or 1 = off (the official top_p=0.0 means off)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"sampling: {name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.greedy, bool):
            raise bad("greedy", "must be a bool")
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        problems = {
            "temperature": temperature_problem(self.temperature),
            "top_p": range_problem(self.top_p, *TOP_P_RANGE),
            "repetition_penalty": repetition_penalty_problem(self.repetition_penalty),
            "presence_penalty": range_problem(self.presence_penalty, *PENALTY_RANGE),
            "frequency_penalty": range_problem(self.frequency_penalty, *PENALTY_RANGE),
        }
        for name, problem in problems.items():
            if problem:
                raise bad(name, problem)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64
        ):
            raise bad("seed", "must be None or an integer in [0, 2**64) (a uint64)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def top_p_active(self) -> bool:
        return 0.0 < self.top_p < 1.0


def apply_top_k_top_p(
    logits: Tensor, top_k: Tensor, top_p: Tensor, filter_value: float = FILTER_VALUE
) -> Tensor:
    """The official ``top_k_logits`` rule applied to every row with one sort.

    logits [b, V] float; top_k LongTensor [b] (0 = off); top_p FloatTensor [b] (0 or 1 = off).
    Returns new logits [b, V] with the removed entries set to ``filter_value``, or to
    ``-inf`` in a row whose lowest logit is not above ``filter_value`` (logits scaled by a
    small temperature), so a removed entry never outranks a kept one; on real logits the
    softmax is the same either way (``exp`` of either is 0).
    """
    b, vocab = logits.shape
    k = top_k.to(device=logits.device, dtype=torch.long).clamp(max=vocab)  # [b]
    k_on = k > 0
    p = top_p.to(device=logits.device, dtype=torch.float32)  # [b]
    p_on = (p > 0) & (p < 1)
    if not bool(p_on.any()) or vocab >= TOP_P_MIN_VOCAB:
        # the k-th largest from a partial selection (the same value the sort gives), the rule
        # applied in place of the sorted order: no sort, no scatter
        low = logits.amin(dim=-1, keepdim=True)
        fill = torch.where(low > filter_value, torch.full_like(low, filter_value), torch.full_like(low, -math.inf))
        if bool(k_on.any()):
            kth, _ = kth_largest(logits, k)
            logits = torch.where(logits < kth, fill, logits)
        if not bool(p_on.any()):
            return logits
        nucleus = _top_p_from_candidates(logits, p, p_on, fill)
        if nucleus is not None:
            return nucleus
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # [b, V]
    low = sorted_logits[:, -1:]                                            # [b, 1] each row's lowest
    fill = torch.where(low > filter_value, torch.full_like(low, filter_value), torch.full_like(low, -math.inf))
    # The k-th largest per row; rows with top-k off get a threshold nothing is below.
    kth = sorted_logits.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # [b, 1]
    kth = torch.where(k_on.unsqueeze(1), kth, torch.full_like(kth, -math.inf))
    sorted_logits = torch.where(sorted_logits < kth, fill, sorted_logits)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)  # [b, V]
    remove = cumulative > p.unsqueeze(1)
    remove = torch.cat([torch.zeros_like(remove[:, :1]), remove[:, :-1]], dim=1)  # shift right
    remove &= p_on.unsqueeze(1)
    sorted_logits = torch.where(remove, fill, sorted_logits)
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def kth_largest(logits: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """``(kth, top)`` ``[b, 1]`` each: each row's ``k``-th largest value (``-inf`` where k is 0;
    ``k`` at most the vocabulary) and its largest, from one partial selection (``topk``: the
    values the sort gives; a NaN ranks first)."""
    largest = torch.topk(logits, max(1, int(k.max())), dim=-1).values           # [b, max k], descending
    kth = largest.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    return torch.where((k > 0).unsqueeze(1), kth, torch.full_like(kth, -math.inf)), largest[:, :1]


def _top_p_from_candidates(logits: Tensor, p: Tensor, p_on: Tensor, fill: Tensor) -> Tensor | None:
    """Top-p over a large vocabulary without the full sort: the sorted prefix of the
    ``TOP_P_CANDIDATES`` largest logits (``topk``) with the cumulative softmax of the whole row;
    where that prefix's mass passes p in every row that asks, every token after it is removed
    by the rule anyway, so the rule is applied to the prefix alone. None: a row's nucleus is
    wider than the widest prefix tried (the caller sorts). The cumulative sums are those of
    the sorted rule up to rounding (the softmax's total is summed in another order)."""
    probs = F.softmax(logits, dim=-1)                                         # [b, V]
    for size in TOP_P_CANDIDATES:
        if 4 * size > logits.shape[1]:
            return None
        values, index = torch.topk(logits, size, dim=-1)                      # [b, M], descending
        cumulative = probs.gather(1, index).cumsum(dim=-1)
        if not bool(((cumulative[:, -1] > p) | ~p_on).all()):
            continue
        remove = cumulative > p.unsqueeze(1)
        remove = torch.cat([torch.zeros_like(remove[:, :1]), remove[:, :-1]], dim=1)   # shift right
        out = fill.expand_as(logits).clone().scatter_(1, index, torch.where(remove, fill, values))
        return torch.where(p_on.unsqueeze(1), out, logits)
    return None


def apply_penalties(
    logits: Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> Tensor:
    """Repetition (CTRL/HF: prompt + output, >0 divided, <0 multiplied), then presence and
    frequency penalties (OpenAI: output only, ``-= count * frequency + presence``).
    logits [b, V] float32, modified in place and returned.

    Vectorised over the rows that have a penalty: each row's ids are padded into one
    ``[r, L]`` tensor and counted with one ``scatter_add`` per kind; the subtracted amount
    ``count * frequency + presence`` is formed in float64 and rounded once, so it equals the
    per-token Python arithmetic bit for bit."""
    device = logits.device
    rep = [row for row, p in enumerate(params) if p.repetition_penalty != 1.0]
    pen = [row for row, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    if rep:
        seen = _counts(logits.shape[1], [list(prompt_ids[r]) + list(output_ids[r]) for r in rep], device) > 0
        rows = torch.tensor(rep, device=device)
        by = torch.tensor([params[r].repetition_penalty for r in rep], device=device, dtype=logits.dtype)[:, None]
        values = logits[rows]                                                    # [r, V]
        logits[rows] = torch.where(seen, torch.where(values > 0, values / by, values * by), values)
    if pen:
        counts = _counts(logits.shape[1], [output_ids[r] for r in pen], device).double()   # [r, V]
        rows = torch.tensor(pen, device=device)
        freq = torch.tensor([params[r].frequency_penalty for r in pen], device=device, dtype=torch.float64)[:, None]
        pres = torch.tensor([params[r].presence_penalty for r in pen], device=device, dtype=torch.float64)[:, None]
        amount = torch.where(counts > 0, counts * freq + pres, torch.zeros_like(counts)).to(logits.dtype)
        logits[rows] -= amount
    return logits


def _counts(vocab: int, ids: Sequence[Sequence[int]], device) -> Tensor:
    """How often each id occurs in each row of ``ids``: ``[len(ids), vocab]`` int32."""
    width = max(1, max(len(row) for row in ids))
    index = torch.zeros((len(ids), width), dtype=torch.long)
    ones = torch.zeros((len(ids), width), dtype=torch.int32)
    for row, seq in enumerate(ids):
        if seq:
            index[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            ones[row, : len(seq)] = 1
    counts = torch.zeros((len(ids), vocab), dtype=torch.int32, device=device)
    return counts.scatter_add_(1, index.to(device), ones.to(device))


ARGMAX_BLOCK = 1024   # columns per block of ``first_argmax``'s first pass


def first_argmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` of each row's maximum of ``x [b, V]``, the first index among
    ties: what ``torch.max(x, dim=-1)`` returns, ~5x faster on bf16 logits here.

    torch's max-with-indices reduction is a slow path for bf16 while ``amax`` is
    vectorised: the maxima of blocks of ``ARGMAX_BLOCK`` columns are taken with ``amax``,
    then the first index is searched only in the first block that holds the row's maximum.
    A NaN makes its row's value NaN (the caller sends such rows down the full rule). fp32
    and bf16 logits on an AVX2 CPU take ``kernels.cpu_argmax`` instead: one pass, the same
    result."""
    if cpu_argmax.supports(x):
        return cpu_argmax.first_max(x)
    b, vocab = x.shape
    full = vocab // ARGMAX_BLOCK * ARGMAX_BLOCK
    if full == 0 or not x.is_contiguous():
        return torch.max(x, dim=-1)
    blocks = x[:, :full].view(b, -1, ARGMAX_BLOCK).amax(dim=-1)               # [b, nb]
    if full < vocab:
        blocks = torch.cat([blocks, x[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    values = blocks.amax(dim=-1)                                             # [b]
    first = torch.argmax((blocks == values[:, None]).to(torch.uint8), dim=-1)  # [b] first block holding it
    start = first * ARGMAX_BLOCK                                            # [b]
    columns = (start[:, None] + torch.arange(ARGMAX_BLOCK, device=x.device)).clamp(max=vocab - 1)
    window = x.gather(1, columns)                                            # [b, block]
    inside = torch.argmax((window == values[:, None]).to(torch.uint8), dim=-1)
    return values, start + inside


def draw_keys(seed: int, step: int) -> tuple[int, int]:
    """The two 32-bit keys of a row's ``step``-th draw: blake2b over ``(seed, step)``."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


_M32 = 0xFFFFFFFF


def _fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's finaliser on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def gumbel_draw(scores: Tensor, keys: Sequence[tuple[int, int]]) -> Tensor:
    """Per row of final ``scores [s, V]`` (fp32), ``argmax(score + g)`` for the Gumbel noise
    of the row's keys (``kernels.cpu_sample``'s rule in torch ops, the same hash); -1 where no
    score is finite."""
    s, vocab = scores.shape
    index = torch.arange(vocab, dtype=torch.int64, device=scores.device)
    k1 = torch.tensor([k for k, _ in keys], dtype=torch.int64, device=scores.device)[:, None]
    k2 = torch.tensor([k for _, k in keys], dtype=torch.int64, device=scores.device)[:, None]
    h = _fmix32(_fmix32(index[None, :] ^ k1) ^ k2)                           # [s, V]
    u = (h.double() + 0.5) * 2.0**-32
    q = torch.where(h >= 0xFF000000, (2.0**32 - h.double() - 0.5) * 2.0**-32, -torch.log(u))
    noisy = torch.where(torch.isfinite(scores), scores.double() - torch.log(q), torch.full_like(q, -math.inf))
    best = noisy.argmax(dim=-1)
    return torch.where(torch.isfinite(noisy.amax(dim=-1)), best, torch.full_like(best, -1))


class Sampler:
    """Samples one token per row; row i follows ``params[i]`` with its own generator."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.params: list[SamplingParams] = list(params)
        # The seed actually used per row (drawn from the OS when the request gave none).
        self.seeds: list[int] = [
            p.seed if p.seed is not None else secrets.randbits(63) for p in self.params
        ]

    @classmethod
    def _from_parts(cls, params, seeds, device) -> "Sampler":
        sampler = cls.__new__(cls)
        sampler.device = torch.device(device)
        sampler.params, sampler.seeds = list(params), list(seeds)
        return sampler

    def __len__(self) -> int:
        return len(self.params)

    def rows(self, indices: Sequence[int]) -> "Sampler":
        """A Sampler for a subset of rows; their seeds carry over."""
        idx = list(indices)
        return Sampler._from_parts([self.params[i] for i in idx], [self.seeds[i] for i in idx], self.device)

    select = rows

    @classmethod
    def concatenate(cls, samplers: Sequence["Sampler"]) -> "Sampler":
        """Rows of ``samplers`` in order (for batches that grow)."""
        if not samplers:
            raise ValueError("concatenate needs at least one Sampler")
        devices = {s.device for s in samplers}
        if len(devices) != 1:
            raise ValueError(f"cannot concatenate Samplers on different devices {devices}")
        return cls._from_parts([p for s in samplers for p in s.params], [x for s in samplers for x in s.seeds],
                               samplers[0].device)

    def choose(self, logits: Tensor, prompt_ids: Sequence[Sequence[int]],
               output_ids: Sequence[Sequence[int]]) -> Tensor:
        """logits [b, V] (any float dtype) -> the chosen tokens, LongTensor [b]; ``logits`` is
        not modified.

        Work is proportional to what the rows ask: a greedy row without penalties is one
        argmax over its logits (no copy); only the other rows (penalties, sampling, or a
        NaN in their logits) are copied and processed, together."""
        b, _ = logits.shape
        if b != len(self.params) or len(prompt_ids) != b or len(output_ids) != b:
            raise ValueError(
                f"sample: {b} logit rows, {len(self.params)} params, "
                f"{len(prompt_ids)} prompts, {len(output_ids)} outputs"
            )
        plain = [i for i, p in enumerate(self.params) if p.is_greedy and not p.has_penalties]
        tokens = torch.zeros(b, dtype=torch.long, device=logits.device)
        if plain:
            whole = len(plain) == b
            sub = logits if whole else logits[torch.tensor(plain, device=logits.device)]
            # The first index among ties, like argmax, but at the speed of amax on bf16;
            # a NaN wins it, so a row with one takes the full rule below.
            values, best = first_argmax(sub)                                   # [p]
            nan = torch.isnan(values)
            if whole:
                tokens = best
            else:
                tokens[torch.tensor(plain, device=logits.device)] = best
            plain = [i for i, bad in zip(plain, nan.tolist()) if not bad]
        rest = sorted(set(range(b)) - set(plain))
        if rest and cpu_sample.supports(logits):
            # sampled rows without penalties or top-p: drawn from the logits as they are
            bare = [i for i in rest if not self.params[i].is_greedy and not self.params[i].has_penalties
                    and not self.params[i].top_p_active]
            kth = self._top_k_floors(logits, bare)
            bare = [i for i in bare if not math.isnan(kth[i])]         # a NaN logit: the full rule
            if bare:
                drawn = cpu_sample.draw(logits, bare, [self.params[i].temperature for i in bare],
                                        [self._keys(i, output_ids) for i in bare], LOGIT_BOUND,
                                        [kth[i] for i in bare]).tolist()
                done = [(i, t) for i, t in zip(bare, drawn) if t >= 0]   # -1: degenerate, the full rule below
                if done:
                    tokens[torch.tensor([i for i, _ in done])] = torch.tensor([t for _, t in done])
                taken = {i for i, _ in done}
                rest = [i for i in rest if i not in taken]
        if rest:
            tokens[torch.tensor(rest, device=logits.device)] = self._process(logits, rest, prompt_ids, output_ids)
        return tokens

    def _top_k_floors(self, logits: Tensor, rows: list[int]) -> dict[int, float]:
        """Per row, its top-k threshold: the k-th largest logit (``-inf`` without top-k; NaN when
        the row holds a NaN, which ``topk`` ranks first), from one partial selection."""
        floors = {i: -math.inf for i in rows}
        ranked = [i for i in rows if self.params[i].top_k > 0]
        if ranked:
            vocab = logits.shape[1]
            sub = logits if ranked == list(range(logits.shape[0])) else logits[torch.tensor(ranked)]
            kth, top = kth_largest(sub, torch.tensor([min(self.params[i].top_k, vocab) for i in ranked]))
            values = torch.where(torch.isnan(top), torch.full_like(kth, math.nan), kth).float()[:, 0]
            floors.update(zip(ranked, values.tolist()))
        return floors

    def _keys(self, row: int, output_ids: Sequence[Sequence[int]]) -> tuple[int, int]:
        """The keys of ``row``'s next draw: a function of its seed and its step alone."""
        return draw_keys(self.seeds[row], len(output_ids[row]))

    def _process(self, logits: Tensor, rows: list[int], prompt_ids, output_ids) -> Tensor:
        """The full rule for ``rows`` of ``logits``: penalties, NaN as the lowest score, then
        the argmax (greedy) or the seeded draw; the chosen tokens ``[len(rows)]``."""
        params = [self.params[i] for i in rows]
        if rows == list(range(logits.shape[0])):                # every row: one copy, no gather
            processed = logits.to(torch.float32, copy=True)
        else:
            processed = logits[torch.tensor(rows, device=logits.device)].float()
        processed = apply_penalties(processed, params, [prompt_ids[i] for i in rows], [output_ids[i] for i in rows])
        processed.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)   # NaN: the lowest score
        sampled = [j for j, p in enumerate(params) if not p.is_greedy]
        tokens = (torch.argmax(processed, dim=-1) if len(sampled) < len(rows)    # [r], greedy rows keep this
                  else torch.zeros(len(rows), dtype=torch.long, device=logits.device))
        if sampled:
            chosen = [params[j] for j in sampled]
            temperature = torch.tensor([p.temperature for p in chosen], device=logits.device)
            scaled = processed if len(sampled) == len(rows) else processed[torch.tensor(sampled, device=logits.device)]
            scaled.div_(temperature.unsqueeze(1))                 # [s, V]
            scaled.clamp_(-LOGIT_BOUND, LOGIT_BOUND)              # finite; a no-op on ordinary logits
            if any(p.top_k > 0 or p.top_p_active for p in chosen):
                scaled = apply_top_k_top_p(
                    scaled,
                    torch.tensor([p.top_k for p in chosen]),
                    torch.tensor([p.top_p for p in chosen]),
                )
            scaled = scaled.float().contiguous()
            keys = [self._keys(rows[j], output_ids) for j in sampled]
            if cpu_sample.supports(scaled):           # the scores are final: temperature 1
                drawn = cpu_sample.draw(scaled, list(range(len(sampled))), [1.0] * len(sampled), keys, LOGIT_BOUND)
            else:
                drawn = gumbel_draw(scaled, keys)
            drawn = drawn.to(scaled.device)
            degenerate = drawn < 0                    # no finite score: its argmax
            if bool(degenerate.any()):
                drawn[degenerate] = torch.argmax(scaled[degenerate], dim=-1)
            tokens[torch.tensor(sampled, device=logits.device)] = drawn
        return tokens

    def sample(
        self, logits: Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]]
    ) -> tuple[Tensor, Tensor]:
        """logits [b, V] -> (tokens LongTensor [b], logprobs FloatTensor [b]): ``choose``
        plus the ``log_softmax`` of the raw logits (before any processing) of each token."""
        tokens = self.choose(logits, prompt_ids, output_ids)
        logprobs = F.log_softmax(logits.float(), dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)  # [b]
        return tokens, logprobs
