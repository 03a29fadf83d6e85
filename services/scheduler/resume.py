"""Rebuild a request's state from the events a previous pool published
(``docs/architecture.md``, "Redis contract").

A pool that died leaves its queue entries pending; the pool that claims one
reads the request's event stream and continues it: completed blanks (``blank``
events) are spliced into the context, the current blank's published tokens
become ``Request.generated_ids``, and the next event gets the next sequence
number, so the caller's stream has no gap and no duplicate. Tokens the dead pool
generated but had not published yet (held-back text) are generated again.
"""

from __future__ import annotations

from enum import Enum
from typing import Sequence

from model.config import END_IDS
from services.common.messages import EVENT_BLANK, EVENT_TOKENS, Event
from services.scheduler.request import BlankDone, RequestState


class Resumed(Enum):
    """What replaying a request's published events left to do."""

    CONTINUES = "continues"          # nothing or part of it was published: generate the rest
    ENDED = "ended"                  # a final or error event is there: nothing to do but ack
    FINAL_MISSING = "final_missing"  # every blank is done; only the final event is missing


class ResumeError(ValueError):
    """The event stream does not fit the request (gap in seq, unknown blank...)."""


def apply_events(state: RequestState, events: Sequence[Event]) -> Resumed:
    """Replay ``events`` into a fresh ``state``."""
    if not events:
        return Resumed.CONTINUES
    for expected, event in enumerate(events):
        if event.seq != expected:
            raise ResumeError(f"event seq {event.seq} where {expected} was expected")
    if any(e.terminal for e in events):
        return Resumed.ENDED
    more = True
    for event in events:
        if event.type == EVENT_TOKENS:
            if event.blank != len(state.done) or not more:
                raise ResumeError(f"tokens of blank {event.blank} while blank {len(state.done)} is open")
            n = len(event.token_ids)
            state.tokens += list(event.token_ids)
            state.logprobs += list(event.logprobs) or [0.0] * n
            state.tops += list(event.top_logprobs) or [()] * n
            state.index += n
        elif event.type == EVENT_BLANK:
            if event.blank != len(state.done) or list(event.token_ids) != state.tokens:
                raise ResumeError(f"blank event {event.blank} does not match the published tokens")
            state.done.append(BlankDone(list(event.token_ids), event.text, event.finish_reason,
                                        event.stop_sequence, event.candidates))
            more = state.next_phase()
    state.seq = len(events)
    if not more:
        return Resumed.FINAL_MISSING
    state.received = len(state.tokens)
    content = [t for t in state.tokens if t not in END_IDS]
    state.text.replay(content)
    return Resumed.CONTINUES
