"""The worker's protobuf edge of the decoding engine (``model.engine``).

The engine owns the batch (rows, cache, samplers, pending tokens), the decoding
rules and the step; this module only translates: ``from_pb`` validates a
``Batch`` into engine rows (a refusal names the request: ``InvalidArgument`` with
``request_id``), ``to_pb`` gives the ``CachedBatch`` (``width``, ``max_tokens``),
``generations_pb`` turns a step's output into ``Generation`` messages and
``failures_pb`` its failed rows into ``RowFailure`` messages, and
``filter`` refuses unknown request ids as INVALID_ARGUMENT. The contract follows
TGI's shard server: ``from_pb``, ``to_pb``, ``filter`` and ``concatenate``
(docs/architecture.md, "Shard protocol").
"""

from __future__ import annotations

import math
from typing import Sequence

from model.config import GLMConfig
from model.config import GMASK_ID, MASK_IDS
from model.engine import (LENGTH, STOP, Batch, BeamOptions, RequestState, StepOutput, UnknownRequest,
                          allowed_new_tokens)
from model.prompt import Blank, PromptError, check_ids, check_length, generation_mask
from model.sampling import SamplingParams
from services.common.errors import InvalidArgument
from services.proto_gen.glm.v1 import shard_pb2 as pb

MAX_TOP_LOGPROBS = 20
MAX_BEAMS = 64          # rows one beam search may hold (the scheduler's max_batch_size bounds it too)
FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, STOP: pb.FINISH_REASON_STOP, LENGTH: pb.FINISH_REASON_LENGTH}


def sampling_from_pb(msg: pb.SamplingParameters) -> SamplingParams:
    """Unset optional fields take the ``SamplingParams`` defaults; bad values raise ValueError."""
    kwargs = dict(greedy=msg.greedy, top_k=msg.top_k, presence_penalty=msg.presence_penalty,
                  frequency_penalty=msg.frequency_penalty)
    for name in ("temperature", "top_p", "repetition_penalty", "seed"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    return SamplingParams(**kwargs)


def request_from_pb(msg: pb.Request, config: GLMConfig) -> RequestState:
    """One engine row from a ``Request``; anything malformed is ``InvalidArgument`` naming it."""
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
    blank = blank_of(msg, ids)
    allowed = allowed_new_tokens(blank, stop.max_new_tokens, config.max_sequence_length)
    beam = beam_from_pb(msg) if msg.HasField("beam") else None
    if beam is not None:                    # its rows choose no token of their own: an argmax
        params = SamplingParams(greedy=True)    # (and beam_from_pb refused log-probs for it)
    try:                                    # the engine refuses rows with nothing left to generate
        return RequestState(msg.id, blank, params, allowed, stop.min_new_tokens, msg.top_logprobs, generated,
                            logprobs=msg.logprobs, beam=beam)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {exc}", request_id=msg.id) from None


def beam_from_pb(msg: pb.Request) -> BeamOptions:
    """``Request.beam`` as engine options; a bad one is ``InvalidArgument`` naming the field."""
    b, where = msg.beam, f"request {msg.id}: beam"
    if not 2 <= b.num_beams <= MAX_BEAMS:
        raise InvalidArgument(f"{where}.num_beams must be in [2, {MAX_BEAMS}], got {b.num_beams}", request_id=msg.id)
    if not math.isfinite(b.length_penalty):
        raise InvalidArgument(f"{where}.length_penalty must be finite, got {b.length_penalty}", request_id=msg.id)
    if msg.generated_ids:
        raise InvalidArgument(f"{where}: a beam search cannot resume from generated_ids (it restarts from its "
                              "blank)", request_id=msg.id)
    if msg.top_logprobs or msg.logprobs:
        raise InvalidArgument(f"{where}: logprobs and top_logprobs do not apply to a beam search (each "
                              "candidate carries its score)", request_id=msg.id)
    return BeamOptions(b.num_beams, b.length_penalty, b.no_repeat_ngram_size, b.deterministic,
                       b.seed if b.HasField("seed") else None)


def blank_of(msg: pb.Request, ids: list[int]) -> Blank:
    """The blank ``mask_position`` names (a mask id must be there), else the first one."""
    if not msg.HasField("mask_position"):
        return Blank.first(ids)
    pos = msg.mask_position
    if pos >= len(ids) or ids[pos] not in MASK_IDS:
        raise InvalidArgument(f"request {msg.id}: mask_position {pos} does not hold a mask id in input_ids",
                              request_id=msg.id)
    return Blank(tuple(ids), pos, ids[pos] == GMASK_ID)


class ShardBatch(Batch):
    """An engine ``Batch`` with the shard protocol's edge: built from a ``Batch`` message,
    described by a ``CachedBatch``, filtered by request ids with a typed refusal."""

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
            requests.append(request_from_pb(req, config))
        return cls(msg.id, requests)

    def to_pb(self) -> pb.CachedBatch:
        return pb.CachedBatch(id=self.id, request_ids=self.request_ids, size=len(self.requests),   # rows
                              max_tokens=self.max_tokens, width=self.width)

    def filter(self, keep_ids: Sequence[int]) -> "ShardBatch | None":
        """``Batch.filter``; an unknown request id is INVALID_ARGUMENT."""
        try:
            return super().filter(keep_ids)
        except UnknownRequest as exc:
            raise InvalidArgument(str(exc)) from None

    @classmethod
    def concatenate(cls, batches: Sequence[Batch]) -> "ShardBatch":
        """``Batch.concatenate``; an empty list is INVALID_ARGUMENT."""
        if not batches:
            raise InvalidArgument("nothing to concatenate")
        return super().concatenate(batches)


def generations_pb(step: StepOutput) -> list[pb.Generation]:
    """One ``Generation`` per row of the step, in the batch's row order."""
    out = []
    for t in step.tokens:
        gen = pb.Generation(request_id=t.request.id, token_id=t.token_id, logprob=t.logprob,
                            finished=t.finish_reason is not None, finish_reason=FINISH_REASONS[t.finish_reason],
                            generated_tokens=t.generated_tokens)
        gen.top_tokens.extend(pb.TopToken(token_id=i, logprob=v) for i, v in t.top_tokens)
        gen.candidates.extend(pb.BeamCandidate(token_ids=ids, score=score) for ids, score in t.candidates)
        out.append(gen)
    return out


def failures_pb(step: StepOutput) -> list[pb.RowFailure]:
    """One ``RowFailure`` per row that failed in the step (it left the batch)."""
    return [pb.RowFailure(request_id=f.request.id, message=f.message) for f in step.failed]
