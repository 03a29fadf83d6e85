"""Per-rank batch state: the contract between the RPC layer and the model.

A ``ShardBatch`` is a list of requests (one blank each) plus, once prefilled,
their KV cache rows, their samplers and the token each row chose last (chosen,
returned, not yet fed). Four methods make the whole contract, as in TGI's shard
server: ``from_pb`` (validate a ``Batch``), ``to_pb`` (its ``CachedBatch``),
``filter`` and ``concatenate``. Rows stay aligned: row ``i`` of the cache, the
sampler and ``pending`` is ``requests[i]``.

Prefill is whole-prompt and left-padded (GLM's prefix-LM attention forbids
chunking): ``context`` attends bidirectionally, ``sop + generated_ids`` causally,
with the positions of ``model.prompt.Blank``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.config import END_IDS, GLMConfig
from model.kv_cache import KVCache
from model.kv_footprint import padded_kv_slots
from model.prompt import Blank, PromptError, check_ids, check_length, generation_mask
from model.sampling import Sampler, SamplingParams
from services.common.errors import InvalidArgument
from services.proto_gen.glm.v1 import shard_pb2 as pb

MAX_TOP_LOGPROBS = 20


def sampling_from_pb(msg: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields take the ``SamplingParams`` defaults; bad values raise ValueError."""
    kwargs = dict(greedy=msg.greedy, top_k=msg.top_k, presence_penalty=msg.presence_penalty,
                  frequency_penalty=msg.frequency_penalty)
    for name in ("temperature", "top_p", "repetition_penalty", "seed"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    return SamplingParams(**kwargs)


@dataclass
class RequestState:
    """One request in a batch: its blank, how it samples, and what it generated."""

    id: int
    blank: Blank
    params: SamplingParams
    allowed: int            # tokens it may generate in all (generated_ids included)
    min_new: int
    top_n: int
    generated: list[int] = field(default_factory=list)

    @classmethod
    def from_pb(cls, msg: pb.Request, config: GLMConfig) -> "RequestState":
        where = f"request {msg.id}"
        ids, generated = list(msg.input_ids), list(msg.generated_ids)
        try:
            check_ids(ids, config.vocab_size)
            if generation_mask(ids) is None:
                raise PromptError("input_ids hold no mask id ([MASK] 150000, [sMASK] 150002 or [gMASK] 150001)")
            check_length(ids, config.max_sequence_length)
            for i, t in enumerate(generated):
                if t >= config.vocab_size:
                    raise PromptError(f"generated_ids[{i}] = {t} is outside the vocabulary [0, {config.vocab_size})")
            params = sampling_from_pb(msg.sampling)
        except ValueError as exc:
            raise InvalidArgument(f"{where}: {exc}", request_id=msg.id) from None
        stop = msg.stopping
        if stop.max_new_tokens < 1:
            raise InvalidArgument(f"{where}: stopping.max_new_tokens must be >= 1, got {stop.max_new_tokens}",
                                  request_id=msg.id)
        if msg.top_logprobs > MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"{where}: top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {msg.top_logprobs}",
                                  request_id=msg.id)
        blank = Blank.first(ids)
        allowed = min(stop.max_new_tokens, config.max_sequence_length - len(blank.input_ids))
        if any(t in END_IDS for t in generated):
            raise InvalidArgument(f"{where}: generated_ids hold an end token (eop/eos): nothing left to generate",
                                  request_id=msg.id)
        if len(generated) >= allowed:
            raise InvalidArgument(
                f"{where}: nothing left to generate: {len(generated)} generated_ids, max_new_tokens "
                f"{stop.max_new_tokens}, room for {allowed} new tokens within max_sequence_length")
        return cls(msg.id, blank, params, allowed, stop.min_new_tokens, msg.top_logprobs, generated)

    @property
    def prefill_ids(self) -> list[int]:
        return self.blank.input_ids + self.generated

    @property
    def prefill_positions(self) -> list[int]:
        return self.blank.context_positions() + [self.blank.position(k) for k in range(len(self.generated) + 1)]

    @property
    def remaining(self) -> int:
        """Tokens still to be fed to the model (an upper bound on KV slots it will claim)."""
        return self.allowed - len(self.generated)


@dataclass
class ShardBatch:
    id: int
    requests: list[RequestState]
    cache: KVCache | None = None        # None until prefilled
    sampler: Sampler | None = None
    pending: torch.Tensor | None = None  # [b] last chosen token of each row, not yet in the cache

    # -- RPC edge ----------------------------------------------------------------------
    @classmethod
    def from_pb(cls, msg: pb.Batch, config: GLMConfig) -> "ShardBatch":
        if not msg.requests:
            raise InvalidArgument(f"batch {msg.id}: empty batch (no requests)")
        seen: set[int] = set()
        requests = []
        for req in msg.requests:
            if req.id in seen:
                raise InvalidArgument(f"batch {msg.id}: request id {req.id} appears twice")
            seen.add(req.id)
            requests.append(RequestState.from_pb(req, config))
        return cls(msg.id, requests)

    def to_pb(self) -> pb.CachedBatch:
        return pb.CachedBatch(id=self.id, request_ids=self.request_ids, size=len(self.requests),
                              max_tokens=self.max_tokens, width=self.width)

    # -- accounting ----------------------------------------------------------------------
    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

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
        """Padded KV slots once every row runs to its limit: rows x (width + longest remaining)."""
        return padded_kv_slots(len(self.requests), self.width, self.max_remaining)

    # -- contract ----------------------------------------------------------------------
    def filter(self, keep_ids: list[int]) -> "ShardBatch | None":
        """The batch with only ``keep_ids`` (in this batch's row order); None if none is kept."""
        index = {r.id: i for i, r in enumerate(self.requests)}
        unknown = [i for i in keep_ids if i not in index]
        if unknown:
            raise InvalidArgument(f"batch {self.id}: unknown request id(s) {unknown} (holds {self.request_ids})")
        rows = sorted({index[i] for i in keep_ids})
        if not rows:
            return None
        return self.rows(rows)

    def rows(self, rows: list[int]) -> "ShardBatch":
        if rows == list(range(len(self.requests))):
            return self
        requests = [self.requests[i] for i in rows]
        if self.cache is None:
            return ShardBatch(self.id, requests)
        index = torch.tensor(rows, dtype=torch.long, device=self.pending.device)
        cache = self.cache.select(index)
        cache.reserve(max(r.remaining for r in requests))
        return ShardBatch(self.id, requests, cache, self.sampler.rows(rows), self.pending[index])

    @staticmethod
    def concatenate(batches: list["ShardBatch"]) -> "ShardBatch":
        """Rows of ``batches`` in order, under the first batch's id; caches left-padded."""
        if not batches:
            raise InvalidArgument("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        if any(b.cache is None for b in batches):
            raise ValueError("only prefilled batches can be concatenated")
        requests = [r for b in batches for r in b.requests]
        cache = KVCache.concatenate([b.cache for b in batches])
        cache.reserve(max(r.remaining for r in requests))
        return ShardBatch(batches[0].id, requests, cache, Sampler.concatenate([b.sampler for b in batches]),
                          torch.cat([b.pending for b in batches]))

    # -- model inputs ----------------------------------------------------------------------
    def prefill_inputs(self, device: torch.device):
        """Left-padded ``ids``, ``positions`` ``[b, w]`` and slot flags ``valid``, ``prefix``."""
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
