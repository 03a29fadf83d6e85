"""A ``GenerateRequest`` checked, tokenized and turned into the ``QueuedRequest`` a
pool runs. Pure: no Redis, no gRPC context; every failure is an ``InvalidArgument``
whose message starts with the field at fault (``sampling.top_p: ...``).

Text prompts get the official wrapping (``model.prompt.prepare_text_ids``: ``[gMASK]``
appended when there is no mask, then ``eos`` when the ids do not end with a mask);
``prompt_token_ids`` are taken as the context itself and must hold a mask id.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from dataclasses import asdict, dataclass, replace

from model.config import MASK_IDS
from model.limits import (PENALTY_RANGE, TOP_P_RANGE, blanks_problem, range_problem, repetition_penalty_problem,
                          temperature_problem)
from model.prompt import generation_mask, prepare_text_ids
from services.common import redis_keys as keys
from services.common.errors import InvalidArgument
from services.common.messages import Beam, QueuedRequest, Sampling, sample_seed
from services.gateway.catalog import ServedModel
from services.proto_gen.glm.v1 import generation_pb2 as pb

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SEED_BITS = 64                       # a drawn seed: any uint64, as a caller may give (the workers take all)


MAX_NGRAM = 16
LENGTH_PENALTY_RANGE = (-10.0, 10.0)


@dataclass(frozen=True)
class Admission:
    """A valid call: what to enqueue, and how to recognise a retry of it. With ``n`` > 1 the
    call is ``n`` requests, ``samples`` (ids ``{id}#{i}``, seeds ``sample_seed(seed, i)``),
    each enqueued and recognised on its own; otherwise ``samples`` is ``(queued,)``."""

    queued: QueuedRequest
    fingerprint: str                 # the same call (request_id aside) gives the same value
    seed_drawn: bool                 # the caller gave no seed; the gateway drew one
    samples: tuple[QueuedRequest, ...] = ()
    fingerprints: tuple[str, ...] = ()
    logprobs: bool = False           # the caller asked for per-token log-probs

    @property
    def n(self) -> int:
        return len(self.samples)


def request_id_of(request: pb.GenerateRequest) -> str:
    if not request.request_id:
        return uuid.uuid4().hex
    if not REQUEST_ID.fullmatch(request.request_id):
        raise InvalidArgument(
            f"request_id: {request.request_id[:40]!r} does not match [A-Za-z0-9._:-]{{1,128}}")
    return request.request_id


def prompt_ids_of(request: pb.GenerateRequest, served: ServedModel) -> list[int]:
    """The context the model sees; the field named in errors is the one the caller set."""
    if request.prompt and request.prompt_token_ids:
        raise InvalidArgument("prompt, prompt_token_ids: give exactly one of them, not both")
    if request.prompt:
        field = "prompt"
        ids = prepare_text_ids(served.tokenizer.tokenize(request.prompt))
    elif request.prompt_token_ids:
        field = "prompt_token_ids"
        ids = list(request.prompt_token_ids)
        for i, token in enumerate(ids):
            if token >= served.vocab_size:
                raise InvalidArgument(f"prompt_token_ids[{i}]: unknown token id {token}, "
                                      f"outside the vocabulary [0, {served.vocab_size})")
        if not any(mask in ids for mask in MASK_IDS):
            raise InvalidArgument("prompt_token_ids: hold no mask id "
                                  "([MASK] 150000, [gMASK] 150001 or [sMASK] 150002)")
    else:
        raise InvalidArgument("prompt: empty; give prompt or prompt_token_ids")
    blanks = blanks_problem(ids.count(generation_mask(ids)))
    if blanks:
        raise InvalidArgument(f"{field}: {blanks}")
    if len(ids) + 1 > served.max_sequence_length:
        raise InvalidArgument(f"{field}: too long: {len(ids)} tokens + sop exceed the model's "
                              f"max_sequence_length {served.max_sequence_length}")
    return ids


def _float(value: float) -> float:
    """proto floats are float32: 0.7 arrives as 0.699999988; keep what the caller meant."""
    return float(f"{value:.7g}")


def _checked(field: str, value: float, problem: str) -> float:
    """``value`` as the caller meant it, or INVALID_ARGUMENT naming ``field`` with the
    ``model.limits`` problem (the workers check the same ranges)."""
    if problem:
        raise InvalidArgument(f"{field}: {value:g} {problem}")
    return _float(value)


def sampling_of(options: pb.SamplingOptions, served: ServedModel) -> tuple[Sampling, bool]:
    temperature = options.temperature if options.HasField("temperature") else 1.0
    temperature = _checked("sampling.temperature", temperature, temperature_problem(_float(temperature)))
    top_p = options.top_p if options.HasField("top_p") else 1.0
    top_p = _checked("sampling.top_p", top_p, range_problem(_float(top_p), *TOP_P_RANGE))
    if options.top_k > served.vocab_size:
        raise InvalidArgument(
            f"sampling.top_k: {options.top_k} exceeds the vocabulary size {served.vocab_size}")
    repetition = options.repetition_penalty if options.HasField("repetition_penalty") else 1.0
    repetition = _checked("sampling.repetition_penalty", repetition,
                          repetition_penalty_problem(_float(repetition)))
    presence = _checked("sampling.presence_penalty", options.presence_penalty,
                        range_problem(_float(options.presence_penalty), *PENALTY_RANGE))
    frequency = _checked("sampling.frequency_penalty", options.frequency_penalty,
                         range_problem(_float(options.frequency_penalty), *PENALTY_RANGE))
    drawn = not options.HasField("seed")
    seed = secrets.randbits(SEED_BITS) if drawn else options.seed
    return Sampling(temperature, options.top_k, top_p, repetition, presence, frequency,
                    seed), drawn


def stopping_of(options: pb.StoppingOptions, served: ServedModel,
                prompt_len: int) -> tuple[int, int, tuple[str, ...]]:
    limits = served.limits
    room = served.max_sequence_length - prompt_len - 1      # after context + sop
    if options.HasField("max_new_tokens"):
        max_new = options.max_new_tokens
        if max_new == 0:
            raise InvalidArgument("stopping.max_new_tokens: must be >= 1")
        if max_new > limits.max_new_tokens_limit:
            raise InvalidArgument(f"stopping.max_new_tokens: {max_new} exceeds the limit "
                                  f"{limits.max_new_tokens_limit}")
        if max_new > room:
            raise InvalidArgument(
                f"stopping.max_new_tokens: {max_new} + prompt {prompt_len} tokens + sop exceed "
                f"the model's max_sequence_length {served.max_sequence_length} (room for {room})")
    else:
        max_new = max(1, min(limits.default_max_new_tokens, room))
    if options.min_new_tokens > max_new:
        raise InvalidArgument(f"stopping.min_new_tokens: {options.min_new_tokens} exceeds "
                              f"max_new_tokens {max_new}")
    stops = tuple(options.stop)
    if len(stops) > limits.max_stop_sequences:
        raise InvalidArgument(f"stopping.stop: {len(stops)} stop sequences, at most "
                              f"{limits.max_stop_sequences}")
    for i, text in enumerate(stops):
        if not text:
            raise InvalidArgument(f"stopping.stop[{i}]: empty")
        if len(text) > limits.max_stop_chars:
            raise InvalidArgument(f"stopping.stop[{i}]: {len(text)} characters, at most "
                                  f"{limits.max_stop_chars}")
    return max_new, options.min_new_tokens, stops


def beam_of(request: pb.GenerateRequest, served: ServedModel, n: int) -> Beam | None:
    """``beam_search`` checked (None: no beam search); what does not apply to one is refused."""
    opts = request.beam_search
    if opts.num_beams < 2:
        if opts.HasField("length_penalty") or opts.no_repeat_ngram_size or opts.deterministic:
            raise InvalidArgument(f"beam_search.num_beams: {opts.num_beams}; the other beam_search options "
                                  "need num_beams >= 2")
        return None
    if opts.num_beams > served.limits.max_beams:
        raise InvalidArgument(f"beam_search.num_beams: {opts.num_beams} exceeds {served.limits.max_beams}")
    penalty = opts.length_penalty if opts.HasField("length_penalty") else 1.0
    penalty = _checked("beam_search.length_penalty", penalty, range_problem(_float(penalty), *LENGTH_PENALTY_RANGE))
    if opts.no_repeat_ngram_size > MAX_NGRAM:
        raise InvalidArgument(f"beam_search.no_repeat_ngram_size: {opts.no_repeat_ngram_size} exceeds {MAX_NGRAM}")
    if n > 1:
        raise InvalidArgument(f"n: {n} with beam_search: a beam search returns its num_beams candidates; "
                              "leave n unset")
    if request.stopping.stop:
        raise InvalidArgument("stopping.stop: stop texts do not apply to beam_search (its candidates end on "
                              "eop/eos or max_new_tokens)")
    if request.output.logprobs or request.output.top_logprobs:
        raise InvalidArgument("output.logprobs: per-token log-probs do not apply to beam_search (each "
                              "candidate carries its score)")
    return Beam(opts.num_beams, penalty, opts.no_repeat_ngram_size, opts.deterministic)


def fingerprint(queued: QueuedRequest, seed_drawn: bool) -> str:
    """What makes two calls "the same request": everything the generation depends on,
    with the seed as the caller gave it (a drawn seed differs on every retry)."""
    doc = asdict(queued)
    for volatile in ("id", "stream", "traceparent", "created_at", "deadline"):
        doc.pop(volatile)
    if seed_drawn:
        doc["sampling"]["seed"] = None
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def admit(request: pb.GenerateRequest, served: ServedModel, request_id: str) -> Admission:
    ids = prompt_ids_of(request, served)
    sampling, drawn = sampling_of(request.sampling, served)
    max_new, min_new, stops = stopping_of(request.stopping, served, len(ids))
    top_logprobs = request.output.top_logprobs
    if top_logprobs > served.limits.max_top_logprobs:
        raise InvalidArgument(f"output.top_logprobs: {top_logprobs} exceeds "
                              f"{served.limits.max_top_logprobs}")
    n = request.n or 1
    if n > served.limits.max_n:
        raise InvalidArgument(f"n: {n} exceeds {served.limits.max_n}")
    beam = beam_of(request, served, n)
    logprobs = request.output.logprobs or top_logprobs > 0
    queued = QueuedRequest(
        id=request_id, model=served.name, prompt_ids=tuple(ids), sampling=sampling,
        max_new_tokens=max_new, min_new_tokens=min_new, stop=stops,
        logprobs=logprobs, top_logprobs=top_logprobs, beam=beam,
        stream=True,   # both RPCs relay token events; a retry may come through either
    )
    if n == 1:
        return Admission(queued, fingerprint(queued, drawn), drawn, (queued,), (fingerprint(queued, drawn),),
                         logprobs)
    # Each sample's log-probs are computed (its candidate's score), shown only when asked for.
    samples = tuple(replace(queued, id=f"{request_id}{keys.SAMPLE_SEPARATOR}{i}", logprobs=True,
                            sampling=replace(sampling, seed=sample_seed(sampling.seed, i))) for i in range(n))
    prints = tuple(fingerprint(s, drawn) + f"/{i}/{n}" for i, s in enumerate(samples))
    return Admission(samples[0], prints[0], drawn, samples, prints, logprobs)
