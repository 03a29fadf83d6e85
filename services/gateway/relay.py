"""A request's events folded into the public responses. Pure: no Redis, no gRPC context.

``Relay.accept`` drops an event whose ``seq`` is not past the last one accepted
(a repeat after a pool failover, or an out-of-order entry), and a ``tokens`` event
whose tokens were all delivered already; every event that survives is new to the
caller. ``tokens`` events become ``GenerateStreamResponse`` messages; ``final``
becomes the stream's last message and the unary ``GenerateResponse``; ``error``
raises ``EventError`` with the gRPC code the pool named. A beam search's ``final`` brings
its candidates (``GenerateResponse.candidates``). ``Samples`` merges the relays of a
call's ``n`` samples: each is one request, and candidate ``i`` is sample ``i``'s output.
"""

from __future__ import annotations

import grpc

from model.tokenizer import GLMTokenizer
from services.common.errors import ServiceError
from services.common.messages import EVENT_BLANK, EVENT_ERROR, EVENT_FINAL, EVENT_TOKENS, Event, FinishReason
from services.proto_gen.glm.v1 import generation_pb2 as pb


def finish_reason_text(reason: FinishReason | None) -> str:
    """The public API's ``finish_reason`` string ("" while nothing has ended)."""
    return reason.value if reason is not None else ""


class EventError(ServiceError):
    """An ``error`` event: the generation failed in the pool."""

    def __init__(self, code_name: str, message: str) -> None:
        super().__init__(message or code_name)
        self.code = getattr(grpc.StatusCode, code_name, None)
        if not isinstance(self.code, grpc.StatusCode) or self.code is grpc.StatusCode.OK:
            self.code = grpc.StatusCode.INTERNAL


class Relay:
    """Turns one request's events into the caller's replies, in sequence order: stream
    messages as they come, or one ``GenerateResponse`` at the end."""

    def __init__(self, request_id: str, model: str, tokenizer: GLMTokenizer, *,
                 logprobs: bool, prompt_tokens: int, seed: int) -> None:
        self.request_id = request_id
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.prompt_tokens = prompt_tokens
        self.seed = seed
        self.last_seq = -1
        self.token_ids: list[int] = []
        self.texts: list[str] = []
        self.tokens: list[pb.GeneratedToken] = []
        self.blanks: list[pb.BlankDetail] = []
        self.final: Event | None = None
        self.failed = False               # an error event was seen
        self.score = 0.0                  # summed log-probs of the tokens (when the pool sent them)

    @property
    def ended(self) -> bool:
        """The pool has finished the request (final or error event)."""
        return self.final is not None or self.failed

    def accept(self, event: Event) -> bool:
        """Record ``event``; False when it is a repeat the caller has seen."""
        if event.seq <= self.last_seq:
            return False
        if event.type == EVENT_TOKENS and event.index + len(event.token_ids) <= len(self.token_ids):
            self.last_seq = event.seq
            return False
        self.last_seq = event.seq
        if event.type == EVENT_ERROR:
            self.failed = True
            raise EventError(event.code, event.message)
        if event.type == EVENT_TOKENS:
            self.token_ids.extend(event.token_ids)
            self.texts.append(event.text)
            self.score += sum(event.logprobs)
            if self.logprobs:
                self.tokens.extend(self._detail(event))
        elif event.type == EVENT_BLANK:
            self.blanks.append(pb.BlankDetail(text=event.text, token_ids=event.token_ids,
                                              finish_reason=finish_reason_text(event.finish_reason),
                                              stop_sequence=event.stop_sequence))
        elif event.type == EVENT_FINAL:
            self.final = event
            if event.seed:
                self.seed = event.seed
        return True

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], strict=False)

    def _detail(self, event: Event) -> list[pb.GeneratedToken]:
        out = []
        for i, token_id in enumerate(event.token_ids):
            token = pb.GeneratedToken(token_id=token_id, text=self._piece(token_id))
            if i < len(event.logprobs):
                token.logprob = event.logprobs[i]
            if i < len(event.top_logprobs):
                token.top_logprobs.extend(
                    pb.TokenLogprob(token_id=int(alt), text=self._piece(int(alt)), logprob=lp)
                    for alt, lp in event.top_logprobs[i])
            out.append(token)
        return out

    # ---- GenerateStream ----------------------------------------------------------
    def stream_message(self, event: Event) -> pb.GenerateStreamResponse | None:
        """The message for an accepted event (None for events the stream does not show)."""
        if event.type == EVENT_TOKENS:
            message = pb.GenerateStreamResponse(
                request_id=self.request_id, token_ids=event.token_ids, text=event.text,
                index=event.index, blank_index=event.blank)
            if self.logprobs:
                message.tokens.extend(self._detail(event))
            return message
        if event.type == EVENT_FINAL:
            message = pb.GenerateStreamResponse(
                request_id=self.request_id, index=len(self.token_ids),
                blank_index=max(len(self.blanks) - 1, 0),
                finish_reason=finish_reason_text(event.finish_reason),
                usage=self._usage(), output_text=event.output_text, seed=self.seed)
            message.candidates.extend(self.beam_candidates())
            return message
        return None

    def beam_candidates(self) -> list[pb.Candidate]:
        """A beam search's candidates, best first (none for other requests)."""
        final = self.final
        if final is None:
            return []
        return [pb.Candidate(index=i, text=c["text"], token_ids=c["token_ids"], finish_reason=c["finish_reason"],
                             score=c["score"], seed=self.seed, output_text=c["output_text"],
                             generated_tokens=len(c["token_ids"]))
                for i, c in enumerate(final.candidates)]

    def candidate(self, index: int) -> pb.Candidate:
        """This request's output as candidate ``index`` of a call of several samples."""
        final = self.final or Event(type=EVENT_FINAL, seq=-1)
        return pb.Candidate(index=index, text=final.text or "".join(self.texts), token_ids=self.token_ids,
                            finish_reason=finish_reason_text(final.finish_reason), score=self.score,
                            seed=self.seed, output_text=final.output_text,
                            generated_tokens=self._usage().generated_tokens,
                            tokens=self.tokens if self.logprobs else [])

    # ---- Generate -----------------------------------------------------------------
    def _usage(self) -> pb.Usage:
        final = self.final
        return pb.Usage(
            prompt_tokens=(final.prompt_tokens if final and final.prompt_tokens else self.prompt_tokens),
            generated_tokens=(final.generated_tokens if final and final.generated_tokens
                              else len(self.token_ids)))

    def response(self) -> pb.GenerateResponse:
        final = self.final or Event(type=EVENT_FINAL, seq=-1)
        response = pb.GenerateResponse(
            request_id=self.request_id, model=self.model,
            text=final.text or "".join(self.texts), token_ids=self.token_ids,
            finish_reason=finish_reason_text(final.finish_reason), usage=self._usage(),
            output_text=final.output_text, seed=self.seed, stop_sequence=final.stop_sequence)
        response.blanks.extend(final.blanks or [b.text for b in self.blanks])
        response.blank_details.extend(self.blanks)
        response.candidates.extend(self.beam_candidates())
        if self.logprobs:
            response.tokens.extend(self.tokens)
            response.logprobs.extend(t.logprob for t in self.tokens)
        return response


class Samples:
    """The relays of one call: its one request, or its ``n`` samples (``GenerateRequest.n``)
    merged: relay ``i`` gets sample ``i``'s events; with several, the reply's top-level fields
    are sample 0's, ``candidates`` every sample's, and ``usage`` counts the prompt once and
    every sample's tokens. With one, the replies are that relay's own."""

    def __init__(self, relays: list[Relay]) -> None:
        self.relays = relays
        self.several = len(relays) > 1

    @property
    def ended(self) -> bool:
        return all(r.ended for r in self.relays)

    def accept(self, index: int, event: Event) -> bool:
        return self.relays[index].accept(event)

    def candidates(self) -> list[pb.Candidate]:
        return [r.candidate(i) for i, r in enumerate(self.relays)]

    def _usage(self) -> pb.Usage:
        usages = [r._usage() for r in self.relays]
        return pb.Usage(prompt_tokens=usages[0].prompt_tokens, generated_tokens=sum(u.generated_tokens for u in usages))

    def stream_message(self, index: int, event: Event) -> pb.GenerateStreamResponse | None:
        """Sample ``index``'s message for an accepted event, tagged with its index; the stream's
        last message (the last sample's final) also carries every candidate and the total usage."""
        message = self.relays[index].stream_message(event)
        if message is None:
            return None
        message.candidate = index
        if event.type == EVENT_FINAL and self.several and self.ended:
            message.candidates.extend(self.candidates())
            message.usage.CopyFrom(self._usage())
        return message

    def response(self) -> pb.GenerateResponse:
        response = self.relays[0].response()
        if self.several:
            response.candidates.extend(self.candidates())
            response.usage.CopyFrom(self._usage())
        return response

