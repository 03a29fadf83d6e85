"""The rows the decoding engine (``model.engine``) works on: a request's row
(``RequestState``, a beam search's ``BeamOptions``), a batch of them with its cache, its
samplers and its pending tokens (``Batch``: filter, rows, concatenate, model inputs), and
what one step gives back (``StepToken``, ``RowFailure``, ``StepOutput``); the finish
reasons and the token budget of a blank (``allowed_new_tokens``). Also the row groupings a
step needs: the admitted rows that share one prompt (``shared_prefills``) and the rows of
each beam search (``beam_groups``). ``model.engine`` re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from model.config import END_IDS
from model.kv_cache import DecodeCache
from model.kv_footprint import padded_kv_slots
from model.paged_kv import PagedCache
from model.prompt import Blank
from model.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from model.engine import BeamGroup

STOP = "stop"        # the row chose eop or eos
LENGTH = "length"    # the row generated every token it is allowed
FAILED = -1          # the id rank 0 broadcasts for a row whose sampling failed


def allowed_new_tokens(blank: Blank, max_new_tokens: int, max_sequence_length: int) -> int:
    """Tokens a blank may generate in all: ``max_new_tokens`` cut to the room left in
    ``max_sequence_length`` after ``context + sop`` (never below 0)."""
    return max(0, min(max_new_tokens, max_sequence_length - len(blank.input_ids)))


class UnknownRequest(ValueError):
    """``Batch.filter`` was asked to keep a request id the batch does not hold."""


@dataclass(frozen=True)
class BeamOptions:
    """A request decoded by the official ``BeamSearchStrategy`` (``model.beam_search``) with
    ``consider_end`` as ``generate.py``: ``num_beams`` (>= 2) rows, ``length_penalty`` (GNMT,
    over the full length), ``no_repeat_ngram_size``; ``deterministic``: candidates by top-k of
    the scores (the official evaluation), else drawn by multinomial seeded with ``seed``."""

    num_beams: int
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    deterministic: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.num_beams < 2:
            raise ValueError(f"beam search needs num_beams >= 2, got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


@dataclass
class RequestState:
    """One row of a batch: its blank, how it samples, and what it generated so far.

    ``allowed`` counts every token the row may generate, ``generated`` included (a
    resumed row arrives with some); ``logprobs``: whether it wants the log-prob of each
    chosen token; ``top_n``: how many top log-probs it wants (either costs a log-softmax
    over the vocabulary for this row, on rank 0 only; without them a step costs a greedy
    row one argmax). ``beam``: the request is a beam search; its rows share ``group`` and
    carry each beam's own ``generated`` (they choose no token of their own: the group does).
    """

    id: int
    blank: Blank
    params: SamplingParams
    allowed: int
    min_new: int = 0
    top_n: int = 0
    generated: list[int] = field(default_factory=list)
    logprobs: bool = True
    beam: BeamOptions | None = None     # set: the request is a beam search (``BeamGroup``)
    group: "BeamGroup | None" = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(t in END_IDS for t in self.generated):
            raise ValueError("generated ids hold an end token (eop/eos): nothing left to generate")
        if len(self.generated) >= self.allowed:
            raise ValueError(f"nothing left to generate: {len(self.generated)} generated ids, {self.allowed} "
                             "allowed by max_new_tokens within max_sequence_length")

    @property
    def prefill_ids(self) -> list[int]:
        """``context + sop + generated``: what the row's prefill reads."""
        return self.blank.input_ids + self.generated

    @property
    def prefill_positions(self) -> list[int]:
        """The 2-D GLM positions of ``prefill_ids``, flattened as ``Blank`` gives them."""
        return self.blank.context_positions() + [self.blank.position(k) for k in range(len(self.generated) + 1)]

    @property
    def remaining(self) -> int:
        """Tokens still to be fed to the model (an upper bound on KV slots it will claim)."""
        return self.allowed - len(self.generated)


@dataclass
class Batch:
    """Rows decoded together plus, once prefilled, their cache rows, their samplers and
    the token each row chose last (``pending``: chosen, returned, not yet fed).

    Rows stay aligned: row ``i`` of the cache, the sampler and ``pending`` is
    ``requests[i]``. ``filter``, ``rows`` and ``concatenate`` return the caller's own
    subclass, so a service can add its edge (protobuf) without copying the batch logic.
    """

    id: int
    requests: list[RequestState]
    cache: DecodeCache | None = None     # None until prefilled
    sampler: Sampler | None = None
    pending: torch.Tensor | None = None  # [b] last chosen token of each row, not yet in the cache

    # -- accounting ----------------------------------------------------------------------
    @property
    def request_ids(self) -> list[int]:
        """Each request once, in row order (a beam search holds several consecutive rows)."""
        return list(dict.fromkeys(r.id for r in self.requests))

    @property
    def width(self) -> int:
        """Slots every row holds now (cache length), or the padded prefill width."""
        if self.cache is not None:
            return self.cache.length
        return max(len(r.prefill_ids) for r in self.requests)

    @property
    def max_remaining(self) -> int:
        return max(r.remaining for r in self.requests)

    @property
    def max_tokens(self) -> int:
        """KV slots the batch holds: a paged cache's blocks now, a dense one's once every row
        runs to its limit (``model.kv_footprint.padded_kv_slots``)."""
        if isinstance(self.cache, PagedCache):
            return self.cache.blocks * self.cache.pool.block_size
        return padded_kv_slots(len(self.requests), self.width, self.max_remaining)

    def release(self) -> None:
        """Give a paged cache's blocks back (the batch is dropped); a dense cache is freed
        with the batch."""
        if isinstance(self.cache, PagedCache):
            self.cache.release()

    # -- rows ------------------------------------------------------------------------------
    def filter(self, keep_ids: Sequence[int]) -> "Batch | None":
        """The batch with only the rows of ``keep_ids`` (in this batch's row order); None if none is kept."""
        held = set(r.id for r in self.requests)
        unknown = [i for i in keep_ids if i not in held]
        if unknown:
            raise UnknownRequest(f"batch {self.id}: unknown request id(s) {unknown} (holds {self.request_ids})")
        keep = set(keep_ids)
        rows = [i for i, r in enumerate(self.requests) if r.id in keep]   # every row of a kept request
        if not rows:
            self.release()
            return None
        return self.rows(rows)

    def rows(self, rows: list[int]) -> "Batch":
        """The batch of ``rows`` (indices, in that order); the cache is grown exactly to
        ``length + longest remaining`` so decoding never triggers its doubling growth."""
        if rows == list(range(len(self.requests))):
            return self
        requests = [self.requests[i] for i in rows]
        if self.cache is None:
            return type(self)(self.id, requests)
        index = torch.tensor(rows, dtype=torch.long, device=self.pending.device)
        cache = self.cache.select(index)
        cache.reserve(max(r.remaining for r in requests))
        return type(self)(self.id, requests, cache, self.sampler.rows(rows), self.pending[index])

    @classmethod
    def concatenate(cls, batches: Sequence["Batch"]) -> "Batch":
        """Rows of ``batches`` in order, under the first batch's id (caches concatenated by
        their own rule: the dense cache left-pads the shorter ones)."""
        if not batches:
            raise ValueError("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        if any(b.cache is None for b in batches):
            raise ValueError("only prefilled batches can be concatenated")
        requests = [r for b in batches for r in b.requests]
        cache = type(batches[0].cache).concatenate([b.cache for b in batches])
        cache.reserve(max(r.remaining for r in requests))
        return cls(batches[0].id, requests, cache, Sampler.concatenate([b.sampler for b in batches]),
                   torch.cat([b.pending for b in batches]))

    # -- model inputs ----------------------------------------------------------------------
    def prefill_inputs(self, device: torch.device):
        """Left-padded ``ids``, ``positions`` ``[b, w]`` and slot flags ``valid``, ``prefix``
        ``[b, w]`` (``w = width``; a row of ``n`` tokens fills its last ``n`` slots)."""
        b, w = len(self.requests), self.width
        ids = torch.zeros((b, w), dtype=torch.long)
        pos = torch.zeros((b, w), dtype=torch.long)
        valid = torch.zeros((b, w), dtype=torch.bool)
        prefix = torch.zeros((b, w), dtype=torch.bool)
        for row, req in enumerate(self.requests):
            seq = req.prefill_ids
            pad = w - len(seq)
            ids[row, pad:] = torch.tensor(seq)
            pos[row, pad:] = torch.tensor(req.prefill_positions)
            valid[row, pad:] = True
            prefix[row, pad: pad + req.blank.context_length] = True
        return ids.to(device), pos.to(device), valid.to(device), prefix.to(device)

    def decode_positions(self, device: torch.device) -> torch.Tensor:
        """Position of each row's pending token ``[b, 1]``."""
        pos = [r.blank.position(len(r.generated)) for r in self.requests]
        return torch.tensor(pos, dtype=torch.long, device=device)[:, None]


@dataclass(frozen=True)
class StepToken:
    """What one row got from a step: the token (as broadcast), its raw fp32 log-softmax,
    the top log-probs it asked for, and why it finished (None while it goes on)."""

    request: RequestState
    token_id: int
    logprob: float
    generated_tokens: int             # tokens the row has generated, this one included
    finish_reason: str | None
    top_tokens: tuple[tuple[int, float], ...] = ()
    # A beam search that finished (rank 0 only): every candidate, best first, as
    # (generated ids, the end token included when it ended on one; score).
    candidates: tuple[tuple[tuple[int, ...], float], ...] = ()


@dataclass(frozen=True)
class RowFailure:
    """A row that failed on its own in a step and left the batch: why (rank 0 only knows
    the message; the other ranks see ``FAILED`` broadcast and say so)."""

    request: RequestState
    message: str


@dataclass
class StepOutput:
    """One step of a batch: a ``StepToken`` per row that chose a token (in row order), the
    rows that failed, and the batch of the rows that go on (None when none does)."""

    batch: Batch | None
    tokens: list[StepToken]
    failed: list[RowFailure] = field(default_factory=list)


def shared_prefills(requests: Sequence[RequestState]) -> tuple[list[int], list[int]]:
    """Rows admitted together with the same prompt (``n`` samples of one, or any repeat:
    the same ids at the same positions) are prefilled once and share its KV blocks until
    they write: the rows to prefill, and for every row the index among them of its prompt."""
    first: dict[tuple, int] = {}
    unique, source = [], []
    for i, r in enumerate(requests):
        key = (tuple(r.prefill_ids), r.blank.mask_pos, r.blank.use_gmask, len(r.generated))
        if key not in first:
            first[key] = len(unique)
            unique.append(i)
        source.append(first[key])
    return unique, source


def beam_groups(requests: Sequence[RequestState]) -> dict[int, int]:
    """``{first row: rows}`` of every beam search among ``requests`` (its rows are consecutive)."""
    groups: dict[int, int] = {}
    row = 0
    while row < len(requests):
        req = requests[row]
        if req.beam is None:
            row += 1
            continue
        size = 1
        while row + size < len(requests) and requests[row + size].id == req.id:
            size += 1
        groups[row] = size
        row += size
    return groups
