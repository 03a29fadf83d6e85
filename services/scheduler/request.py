"""One request inside a pool: its blanks, the tokens of the current one, its events.

A request fills the blanks of its generation mask left to right, one generation
phase per blank (the official ``fill_blanks``): when a blank ends, its content
ids (a trailing end token dropped) are spliced into the context and the next
blank of the same mask kind becomes a new phase. The next blank is searched
after the content just spliced in (``model.prompt.Blank.end``), so a mask id the
model generated is content, never a new blank: a request has at most as many
phases as its prompt has blanks (docs/model.md, "Generation"). Every event it appends gets
the next sequence number; ``tokens`` events carry tokens with exactly the text
they add (``text.BlankText``), then one ``blank`` event per blank, then exactly
one ``final`` or ``error``. Pure: the policy drives it, the loop publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Sequence

from model.config import END_IDS, EOS_ID
from model.prompt import Blank, generation_mask
from services.common.messages import (EVENT_BLANK, EVENT_ERROR, EVENT_FINAL, EVENT_TOKENS, Event, FinishReason,
                                      QueuedRequest)
from services.scheduler.text import BlankText


class RequestStatus(Enum):
    """Where a request is in its pool (never published: the events say the rest)."""

    WAITING = "waiting"        # its current phase waits for a prefill
    RUNNING = "running"        # its current phase is a row of a batch on the workers
    DONE = "done"              # its final or error event was emitted


class Cancellation(Enum):
    """Why a request is leaving before it ended by itself."""

    CALLER = "cancelled"       # its cancel key was set: ends with a final event, finish_reason cancelled
    DEADLINE = "deadline"      # its deadline passed: ends with a DEADLINE_EXCEEDED error
    TAKEN = "taken"            # another pool holds its entry now: leaves, and nothing it emits is published


@dataclass(frozen=True)
class Gen:
    """One generated token of a phase (from the shard protocol's ``Generation``)."""

    row_id: int                 # the phase's ``Request.id`` on the workers
    token_id: int
    logprob: float = 0.0
    top: tuple[tuple[int, float], ...] = ()
    finished: bool = False
    reason: FinishReason | None = None   # STOP | LENGTH when finished
    # A beam search that finished: every candidate, best first, (generated ids, score).
    candidates: tuple[tuple[tuple[int, ...], float], ...] = ()


@dataclass
class BlankDone:
    """A blank that ended: what was published for it and why it ended."""

    token_ids: list[int]        # published ids, the end token included when it stopped on one
    text: str
    finish_reason: FinishReason
    stop_sequence: str = ""
    candidates: tuple = ()      # a beam search's: ``Event.candidates`` of its blank event

    @property
    def content_ids(self) -> list[int]:
        return content_of(self.token_ids)


def content_of(ids: Sequence[int]) -> list[int]:
    """A blank's generated ids without the end token it stopped on (what fills the blank)."""
    return list(ids[:-1]) if ids and ids[-1] in END_IDS else list(ids)


@dataclass
class Outcome:
    """A request that ended: the loop acks its queue entry (and dead-letters it when ``dead``)."""

    request_id: str
    tag: Any
    code: str = ""              # "" = ended normally (final event), else the error's status name
    message: str = ""
    dead: bool = False          # poison: goes to the dead-letter stream


@dataclass
class RequestState:
    """One request inside a pool: its context, the current phase's tokens, its event counter."""

    req: QueuedRequest
    decode: Callable[[Sequence[int]], str]
    max_sequence_length: int
    max_total_tokens: int
    arrival: int = 0
    tag: Any = None                               # the queue entry id
    context: list[int] = field(default_factory=list)
    mask: int = 0
    search_from: int = 0                          # the current blank is the first mask at or after this
    done: list[BlankDone] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)      # current blank: every id received
    logprobs: list[float] = field(default_factory=list)
    tops: list[tuple] = field(default_factory=list)
    received: int = 0                             # tokens the workers generated for this phase
    text: BlankText | None = None
    seq: int = 0                                  # next event's sequence number
    index: int = 0                                # published tokens of the request
    status: RequestStatus = RequestStatus.WAITING
    row_id: int = 0                               # the current phase's ``Request.id`` on the workers
    cancelled: Cancellation | None = None         # set when it leaves before ending by itself
    solo: bool = False                            # prefill alone (a batch holding it was rejected)
    span: Any = None                              # the loop's scheduler.request span
    _candidates: tuple = ()                       # a beam search's, until its blank event takes them

    def __post_init__(self) -> None:
        if not self.context:
            self.context = list(self.req.prompt_ids)
            self.mask = generation_mask(self.context) or 0
        self.text = BlankText(self.decode, self.req.stop)

    @property
    def id(self) -> str:
        return self.req.id

    # -- the current phase ----------------------------------------------------------------
    @property
    def blank(self) -> Blank:
        return Blank.first(self.context, self.mask, self.search_from)

    @property
    def input_len(self) -> int:
        return len(self.context) + 1                               # + sop

    @property
    def allowed(self) -> int:
        """New tokens this blank may have: max_new_tokens, clamped to the sequence and total limits."""
        room = min(self.max_sequence_length, self.max_total_tokens) - self.input_len
        return max(0, min(self.req.max_new_tokens, room))

    @property
    def remaining(self) -> int:
        """Tokens the workers may still generate for this phase (their KV accounting)."""
        return max(0, self.allowed - self.received)

    @property
    def prefill_width(self) -> int:
        return self.input_len + len(self.tokens)

    @property
    def phase_complete(self) -> bool:
        return (bool(self.tokens) and self.tokens[-1] in END_IDS) or len(self.tokens) >= self.allowed

    # -- events ----------------------------------------------------------------------------
    def _event(self, kind: str, **fields) -> Event:
        event = Event(kind, self.seq, **fields)
        self.seq += 1
        return event

    def _tokens_event(self, start: int, n: int, text: str) -> list[Event]:
        if n == 0 and not text:
            return []
        ids = self.tokens[start:start + n]
        event = self._event(
            EVENT_TOKENS, blank=len(self.done), index=self.index, token_ids=tuple(ids), text=text,
            logprobs=tuple(self.logprobs[start:start + n]) if self.req.logprobs else (),
            top_logprobs=tuple(self.tops[start:start + n]) if self.req.top_logprobs else ())
        self.index += n
        return [event]

    def on_token(self, gen: Gen) -> tuple[list[Event], bool]:
        """Take one generated token; (events to publish, whether this blank ended)."""
        if self.req.beam is not None:
            return self._beam_step(gen)
        self.tokens.append(gen.token_id)
        self.received += 1
        self.logprobs.append(gen.logprob)
        self.tops.append(tuple(tuple(t) for t in gen.top))
        if gen.token_id in END_IDS:
            return self.end_blank(FinishReason.STOP, end_token_new=True), True
        start = self.text.emitted_tokens
        release = self.text.push(gen.token_id)
        events = self._tokens_event(start, release.tokens, release.text)
        if release.stop:
            keep = self.text.emitted_tokens
            self.tokens, self.logprobs, self.tops = self.tokens[:keep], self.logprobs[:keep], self.tops[:keep]
            return events + self._blank_event(FinishReason.STOP, release.stop), True
        if gen.finished or self.received >= self.allowed:
            return events + self.end_blank(gen.reason or FinishReason.LENGTH), True
        return events, False

    def _beam_step(self, gen: Gen) -> tuple[list[Event], bool]:
        """A beam search step: nothing is published until the search ends; then the blank is
        its best candidate (one ``tokens`` event) and the ``blank`` event lists every one."""
        self.received += 1
        if not gen.finished:
            return [], False
        if not gen.candidates:
            raise ValueError(f"row {gen.row_id}: a finished beam search came without its candidates")
        best = list(gen.candidates[0][0])
        self.tokens, self.logprobs, self.tops = best, [0.0] * len(best), [()] * len(best)
        self._candidates = tuple(self._candidate(ids, score) for ids, score in gen.candidates)
        content = content_of(best)
        has_end = len(content) < len(best)
        text = "".join(self.text.push(t).text for t in content)       # no stop texts with a beam search
        text += self.text.finish(content).text
        reason = FinishReason.STOP if has_end else FinishReason.LENGTH
        return self._tokens_event(0, len(best), text) + self._blank_event(reason), True

    def _candidate(self, ids: Sequence[int], score: float) -> dict:
        """One beam candidate as the events carry it: its text, and the output with it spliced."""
        content = content_of(ids)
        return {"token_ids": list(ids), "text": self.decode(content), "score": float(score),
                "finish_reason": (FinishReason.STOP if len(content) < len(ids) else FinishReason.LENGTH).value,
                "output_text": self._output_text(self.blank.splice(content))}

    def _output_text(self, output: Sequence[int]) -> str:
        """The text of the prompt with its blanks filled, a trailing eos dropped."""
        return self.decode(output[:-1] if output and output[-1] == EOS_ID else output)

    def end_blank(self, reason: FinishReason, end_token_new: bool = False) -> list[Event]:
        """The blank ended on an end token or its length: publish what was held, then the blank."""
        start = self.text.emitted_tokens
        release = self.text.finish(content_of(self.tokens))
        n = release.tokens + (1 if end_token_new else 0)
        return self._tokens_event(start, n, release.text) + self._blank_event(reason)

    def _blank_event(self, reason: FinishReason, stop: str = "") -> list[Event]:
        done = BlankDone(list(self.tokens), self.text.text, reason, stop, self._candidates)
        self._candidates = ()
        self.done.append(done)
        return [self._event(EVENT_BLANK, blank=len(self.done) - 1, text=done.text, token_ids=tuple(done.token_ids),
                            finish_reason=reason, stop_sequence=stop, candidates=done.candidates)]

    def next_phase(self) -> bool:
        """Splice the finished blank; True when another blank of the mask kind is left."""
        blank, content = self.blank, self.done[-1].content_ids
        self.context = blank.splice(content)
        self.search_from = blank.end(content)
        self.tokens, self.logprobs, self.tops, self.received = [], [], [], 0
        self.text = BlankText(self.decode, self.req.stop)
        return self.mask in self.context[self.search_from:]

    def final(self) -> Event:
        last = self.done[-1] if self.done else BlankDone([], "", FinishReason.LENGTH)
        self.status = RequestStatus.DONE
        return self._event(
            EVENT_FINAL, finish_reason=last.finish_reason, stop_sequence=last.stop_sequence,
            text="".join(b.text for b in self.done), blanks=tuple(b.text for b in self.done),
            output_text=self._output_text(self.context), prompt_tokens=len(self.req.prompt_ids),
            generated_tokens=sum(len(b.token_ids) for b in self.done), seed=self.req.sampling.seed,
            candidates=self._final_candidates(last))

    def _final_candidates(self, last: BlankDone) -> tuple:
        """A beam search's candidates of its last blank, each text with the earlier blanks' first."""
        before = "".join(b.text for b in self.done[:-1])
        return tuple(dict(c, text=before + c["text"]) for c in last.candidates)

    def cancelled_final(self) -> Event:
        """The caller went away: what was published stays; the stream ends with finish_reason cancelled."""
        self.status = RequestStatus.DONE
        return self._event(
            EVENT_FINAL, finish_reason=FinishReason.CANCELLED, text="".join(b.text for b in self.done) + self.text.text,
            blanks=tuple(b.text for b in self.done), prompt_tokens=len(self.req.prompt_ids),
            generated_tokens=self.index, seed=self.req.sampling.seed)

    def error(self, code: str, message: str) -> Event:
        self.status = RequestStatus.DONE
        return self._event(EVENT_ERROR, code=code, message=message)
