"""The documents that cross Redis between the gateway and the pools' schedulers.

A ``QueuedRequest`` is what the gateway appends to ``glm:queue:{model}`` once it
has validated and tokenized a call. An ``Event`` is what a scheduler appends to
``glm:req:{id}:events``: token deltas with consecutive sequence numbers, a
``blank`` event when a blank is complete, then exactly one ``final`` or ``error``.
A pool that resumes a request after another pool died rebuilds its state from
these events (the tokens already published), so the caller's stream continues
with the next sequence number: no gap, no duplicate.

Both are JSON (compact keys would save little; clarity wins), stored under the
single field ``redis_keys.FIELD`` of a stream entry. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum


class FinishReason(StrEnum):
    """Why a blank or a request ended; the value is what the JSON and the public API carry."""

    STOP = "stop"              # eop/eos, or a stop text (then ``stop_sequence`` is set)
    LENGTH = "length"          # max_new_tokens, or the model's max_sequence_length
    CANCELLED = "cancelled"    # the caller went away (its cancel key was set)


EVENT_TOKENS = "tokens"
EVENT_BLANK = "blank"
EVENT_FINAL = "final"
EVENT_ERROR = "error"


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters of a request, as the gateway validated them."""

    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 0 or 1 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0                 # always set: the gateway draws one when the caller did not

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request with ``n`` samples: ``seed`` itself for the
    first (so ``n = 1`` is the plain request), then the first 8 bytes, little-endian, of
    blake2b over ``"{seed}/{index}"`` (any uint64, as a caller's seed may be)."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Beam:
    """A beam search (the official ``BeamSearchStrategy``), as the gateway validated it."""

    num_beams: int = 2
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    deterministic: bool = False


@dataclass(frozen=True)
class QueuedRequest:
    """A validated, tokenized request as the gateway appends it to the model's queue."""

    id: str
    model: str
    prompt_ids: tuple[int, ...]   # the context after the official wrapping; holds the mask(s)
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int = 128     # per blank
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = True
    beam: Beam | None = None      # set: a beam search (its draws seeded with ``sampling.seed``)
    traceparent: str = ""         # W3C trace context of the gateway span
    created_at: float = 0.0       # unix seconds
    deadline: float = 0.0         # unix seconds; 0 = none

    def expired(self, now: float) -> bool:
        """Its deadline (if any) has passed at unix time ``now``."""
        return bool(self.deadline) and now > self.deadline

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "QueuedRequest":
        data = json.loads(text)
        data["sampling"] = Sampling(**data.get("sampling", {}))
        if data.get("beam") is not None:
            data["beam"] = Beam(**data["beam"])
        data["prompt_ids"] = tuple(data["prompt_ids"])
        data["stop"] = tuple(data.get("stop", ()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Event:
    """One entry of a request's event stream.

    ``tokens``: ``blank`` (0-based), ``index`` (position of ``token_ids[0]`` among all
    generated tokens of the request), ``token_ids``, ``logprobs``, ``top_logprobs``
    (per token: [[id, logprob], ...]), ``text`` (the text these tokens add).
    ``blank``: ``blank``, ``text``, ``token_ids``, ``finish_reason``, ``stop_sequence``.
    ``final``: ``finish_reason``, ``stop_sequence``, ``text``, ``blanks`` (texts),
    ``output_text``, ``prompt_tokens``, ``generated_tokens``, ``seed``.
    ``error``: ``code`` (a gRPC status name), ``message``.
    A beam search's ``blank`` event and its ``final`` carry ``candidates``: every candidate
    of that (the last) blank, best first, each ``{"token_ids", "text", "score",
    "finish_reason", "output_text"}`` (``token_ids``: the end token included when it ended
    on one; the blank is filled with the first).
    ``finish_reason`` is a ``FinishReason`` (``None`` on events that do not end
    anything); a string given for it is converted, so the JSON stays the same.
    """

    type: str
    seq: int
    blank: int = 0
    index: int = 0
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple = ()
    text: str = ""
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    blanks: tuple[str, ...] = ()
    output_text: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seed: int = 0
    code: str = ""
    message: str = ""
    candidates: tuple = ()

    def __post_init__(self) -> None:
        if not isinstance(self.finish_reason, FinishReason):
            object.__setattr__(self, "finish_reason", FinishReason(self.finish_reason) if self.finish_reason else None)

    @property
    def terminal(self) -> bool:
        return self.type in (EVENT_FINAL, EVENT_ERROR)

    def to_json(self) -> str:
        """``type``, ``seq`` and every field that differs from its default (one event per
        generated token goes through here: no ``dataclasses.asdict`` deep copy)."""
        data = {"type": self.type, "seq": self.seq}
        for name, default in _EVENT_DEFAULTS:
            value = getattr(self, name)
            if value != default:
                data[name] = value
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Event":
        data = json.loads(text)
        for name in ("token_ids", "logprobs", "blanks", "candidates"):
            if name in data:
                data[name] = tuple(data[name])
        if "top_logprobs" in data:
            data["top_logprobs"] = tuple(tuple(map(tuple, row)) for row in data["top_logprobs"])
        return cls(**{k: v for k, v in data.items() if k in _EVENT_FIELDS})


_EVENT_DEFAULTS = tuple((f.name, f.default) for f in fields(Event) if f.name not in ("type", "seq"))
_EVENT_FIELDS = frozenset(f.name for f in fields(Event))
