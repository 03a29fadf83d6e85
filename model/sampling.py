"""Per-row token sampling: penalties, temperature, official top-k / top-p, seeded draws.

The filtering math is the official GLM-130B ``BaseStrategy`` + SwissArmyTransformer
``top_k_logits`` (docs/model.md, "Generation"):

* top-k keeps every logit ``>=`` the k-th largest (ties at the threshold survive);
* top-p sorts the (top-k filtered) logits, takes the cumulative softmax, removes the
  tokens where it exceeds p, shifted right by one so the first token above p is kept;
* removed logits get the filter value -65504, then ``softmax(fp32)`` and ``multinomial``.

The official top-p step flattens the logits to 1-D and so only works at batch 1. Here
every row carries its own ``SamplingParams`` and its own seeded ``torch.Generator``, the
filter is vectorised over rows (one sort per step), and a row's draw never depends on
which other rows share the batch: a seeded request reproduces whatever it is batched
with (and its first draw equals the official sampler at batch 1 after
``torch.manual_seed(seed)``). The draw for a row's k-th generated token uses a generator
seeded from ``(seed, k)`` alone, so a request resumed elsewhere from its first k tokens
(another pool, after a failure) continues with exactly the draws it would have made.

Extensions the official code lacks (issue #65): a CTRL/HF repetition penalty over
prompt + output tokens and OpenAI presence/frequency penalties over output tokens.

Numerically safe for every accepted parameter (the ranges are ``model.limits``): the
processed logits are fp32 with NaN read as the lowest score and every value clamped
to ``[-LOGIT_BOUND, LOGIT_BOUND]`` after the temperature (a no-op on ordinary logits,
so those draws stay bit-identical to the official sampler); a row whose scaled logits
fall below the filter value is filtered with ``-inf`` instead (so a removed token can
never outrank a kept one); and a row whose distribution still degenerates (not finite,
or summing to 0) takes its argmax instead of a draw. No accepted request can make
``multinomial`` raise.
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

from kernels import cpu_argmax
from model.limits import (PENALTY_RANGE, TOP_P_RANGE, range_problem, repetition_penalty_problem,
                          temperature_problem)

FILTER_VALUE = -65504.0  # the official filter value (fp16 lowest), not -inf
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
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # [b, V]
    low = sorted_logits[:, -1:]                                            # [b, 1] each row's lowest
    fill = torch.where(low > filter_value, torch.full_like(low, filter_value), torch.full_like(low, -math.inf))
    k = top_k.to(device=logits.device, dtype=torch.long).clamp(max=vocab)  # [b]
    k_on = k > 0
    # The k-th largest per row; rows with top-k off get a threshold nothing is below.
    kth = sorted_logits.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # [b, 1]
    kth = torch.where(k_on.unsqueeze(1), kth, torch.full_like(kth, -math.inf))
    sorted_logits = torch.where(sorted_logits < kth, fill, sorted_logits)

    p = top_p.to(device=logits.device, dtype=torch.float32)  # [b]
    p_on = (p > 0) & (p < 1)
    if bool(p_on.any()):
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)  # [b, V]
        remove = cumulative > p.unsqueeze(1)
        remove = torch.cat([torch.zeros_like(remove[:, :1]), remove[:, :-1]], dim=1)  # shift right
        remove &= p_on.unsqueeze(1)
        sorted_logits = torch.where(remove, fill, sorted_logits)
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


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


def step_seed(seed: int, step: int) -> int:
    """The generator seed of a row's ``step``-th draw: ``seed`` itself for the first (as the
    official sampler after ``torch.manual_seed(seed)``), then a hash of ``(seed, step)``.
    Any uint64 ``seed`` works: ``torch.Generator.manual_seed`` takes the whole range."""
    if step == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Sampler:
    """Samples one token per row; row i follows ``params[i]`` with its own generator."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.params: list[SamplingParams] = list(params)
        # The seed actually used per row (drawn from the OS when the request gave none).
        self.seeds: list[int] = [
            p.seed if p.seed is not None else secrets.randbits(63) for p in self.params
        ]
        self.generators: list[torch.Generator] = [
            torch.Generator(device=self.device).manual_seed(s) for s in self.seeds
        ]

    @classmethod
    def _from_parts(cls, params, seeds, generators, device) -> "Sampler":
        sampler = cls.__new__(cls)
        sampler.device = torch.device(device)
        sampler.params, sampler.seeds, sampler.generators = list(params), list(seeds), list(generators)
        return sampler

    def __len__(self) -> int:
        return len(self.params)

    def rows(self, indices: Sequence[int]) -> "Sampler":
        """A Sampler for a subset of rows; the generators (and their state) carry over."""
        idx = list(indices)
        return Sampler._from_parts(
            [self.params[i] for i in idx], [self.seeds[i] for i in idx],
            [self.generators[i] for i in idx], self.device,
        )

    select = rows

    @classmethod
    def concatenate(cls, samplers: Sequence["Sampler"]) -> "Sampler":
        """Rows of ``samplers`` in order (for batches that grow)."""
        if not samplers:
            raise ValueError("concatenate needs at least one Sampler")
        devices = {s.device for s in samplers}
        if len(devices) != 1:
            raise ValueError(f"cannot concatenate Samplers on different devices {devices}")
        return cls._from_parts(
            [p for s in samplers for p in s.params], [x for s in samplers for x in s.seeds],
            [g for s in samplers for g in s.generators], samplers[0].device,
        )

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
        if rest:
            tokens[torch.tensor(rest, device=logits.device)] = self._process(logits, rest, prompt_ids, output_ids)
        return tokens

    def _process(self, logits: Tensor, rows: list[int], prompt_ids, output_ids) -> Tensor:
        """The full rule for ``rows`` of ``logits``: penalties, NaN as the lowest score, then
        the argmax (greedy) or the seeded draw; the chosen tokens ``[len(rows)]``."""
        index = torch.tensor(rows, device=logits.device)
        params = [self.params[i] for i in rows]
        processed = apply_penalties(logits[index].float(), params, [prompt_ids[i] for i in rows],
                                    [output_ids[i] for i in rows])
        processed = torch.where(torch.isnan(processed), -math.inf, processed)   # NaN: the lowest score
        tokens = torch.argmax(processed, dim=-1)  # [r], greedy rows keep this
        sampled = [j for j, p in enumerate(params) if not p.is_greedy]
        if sampled:
            sub = torch.tensor(sampled, device=logits.device)
            chosen = [params[j] for j in sampled]
            temperature = torch.tensor([p.temperature for p in chosen], device=logits.device)
            scaled = processed[sub] / temperature.unsqueeze(1)  # [s, V]
            scaled = scaled.clamp(-LOGIT_BOUND, LOGIT_BOUND)    # finite; a no-op on ordinary logits
            if any(p.top_k > 0 or p.top_p_active for p in chosen):
                scaled = apply_top_k_top_p(
                    scaled,
                    torch.tensor([p.top_k for p in chosen]),
                    torch.tensor([p.top_p for p in chosen]),
                )
            probs = F.softmax(scaled.float(), dim=-1)  # [s, V]
            usable = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()  # [s]
            for k, j in enumerate(sampled):
                if not usable[k]:                      # degenerate distribution: its argmax
                    tokens[j] = torch.argmax(scaled[k])
                    continue
                i = rows[j]
                self.generators[i].manual_seed(step_seed(self.seeds[i], len(output_ids[i])))
                draw = torch.multinomial(probs[k : k + 1], 1, generator=self.generators[i])  # [1, 1]
                tokens[j] = draw.view(())
        return tokens

    def sample(
        self, logits: Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]]
    ) -> tuple[Tensor, Tensor]:
        """logits [b, V] -> (tokens LongTensor [b], logprobs FloatTensor [b]): ``choose``
        plus the ``log_softmax`` of the raw logits (before any processing) of each token."""
        tokens = self.choose(logits, prompt_ids, output_ids)
        logprobs = F.log_softmax(logits.float(), dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)  # [b]
        return tokens, logprobs
