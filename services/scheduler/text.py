"""The text of one blank, token by token: incremental detokenization and stop texts.

``IncrementalDecoder`` is TGI's offset trick: decode a short window of ids twice
(with and without the newest tokens) and emit the difference, so a
sentencepiece leading space or a multi-token UTF-8 character comes out right
without re-decoding the whole blank each step. Text that ends in an incomplete
UTF-8 piece (``"\\ufffd"``) is held until the character completes.

``BlankText`` adds stop texts and publishing: tokens are published together with
the text they add, at token boundaries; text that could be the start of a stop
text is held back; when a stop text appears the blank ends just before it, and
tokens whose text starts at or after it are never published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

REPLACEMENT = "\ufffd"

Decode = Callable[[Sequence[int]], str]


class IncrementalDecoder:
    """The text each new token adds, decoded over a short window (TGI's offsets)."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.prefix = 0      # window start: the first token of the last emitted group
        self.read = 0        # tokens whose text has been emitted

    def push(self, token_id: int) -> str:
        """The new complete text ``token_id`` adds ("" while a character is incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


@dataclass(frozen=True)
class Release:
    """What to publish now: ``tokens`` more tokens (counted from the last release) and ``text``."""

    tokens: int = 0
    text: str = ""
    stop: str = ""           # set when a stop text ended the blank


class BlankText:
    """One blank's published text and tokens, with its stop texts held back and applied."""

    def __init__(self, decode: Decode, stops: Sequence[str] = ()) -> None:
        self._decode = decode
        self.decoder = IncrementalDecoder(decode)
        self.stops = tuple(s for s in stops if s)
        self.stable = ""                 # decoded text of complete characters
        self.starts: list[int] = []      # per token: where its text starts in ``stable`` (-1: not yet)
        self.ends: list[int] = []        # per token: where it ends
        self.emitted_chars = 0
        self.emitted_tokens = 0
        self.stopped = ""

    @property
    def text(self) -> str:
        """The text published so far."""
        return self.stable[: self.emitted_chars]

    def push(self, token_id: int) -> Release:
        """Take one generated (non-end) token; what it lets us publish."""
        if self.stopped:
            raise ValueError("blank already ended on a stop text")
        before = len(self.stable)
        delta = self.decoder.push(token_id)
        self.starts.append(-1)
        self.ends.append(-1)
        if delta:
            self.stable += delta
            for i in range(len(self.ends) - 1, -1, -1):
                if self.ends[i] != -1:
                    break
                self.starts[i], self.ends[i] = before, len(self.stable)
        if self.stops:
            hit = self._find_stop()
            if hit is not None:
                return self._release_stop(*hit)
        return self._release(len(self.stable) - self._held_suffix())

    def replay(self, token_ids: Sequence[int]) -> None:
        """Rebuild the state after ``token_ids`` were all published (a resumed blank)."""
        for t in token_ids:
            self.push(t)
        self.emitted_tokens = len(self.ends)
        self.emitted_chars = max([e for e in self.ends if e != -1], default=0)

    def finish(self, content_ids: Sequence[int]) -> Release:
        """The blank ended (end token or length): publish every held token and the rest of
        its text; the blank's text is then ``decode(content_ids)`` whenever that extends
        what was published."""
        full = self._decode(list(content_ids))
        published = self.text
        rest = full[len(published):] if full.startswith(published) else self.stable[self.emitted_chars:]
        release = Release(len(self.ends) - self.emitted_tokens, rest)
        self.emitted_tokens = len(self.ends)
        self.stable = published + rest
        self.emitted_chars = len(self.stable)
        return release

    # -- internals ----------------------------------------------------------------------
    def _find_stop(self) -> tuple[int, str] | None:
        best = None
        for stop in self.stops:
            at = self.stable.find(stop, self.emitted_chars)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _held_suffix(self) -> int:
        """Length of the longest tail of the unpublished text that starts a stop text."""
        tail = self.stable[self.emitted_chars:]
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, limit: int) -> Release:
        """Publish the tokens whose text ends within ``limit``, with exactly their text."""
        n, end = 0, self.emitted_chars
        for i in range(self.emitted_tokens, len(self.ends)):
            if self.ends[i] == -1 or self.ends[i] > limit:
                break
            n, end = n + 1, self.ends[i]
        text = self.stable[self.emitted_chars:end]
        self.emitted_tokens += n
        self.emitted_chars = end
        return Release(n, text)

    def _release_stop(self, at: int, stop: str) -> Release:
        """The blank ends before ``at``: tokens whose text starts before it are published."""
        n = 0
        for i in range(self.emitted_tokens, len(self.ends)):
            if self.ends[i] == -1 or self.starts[i] >= at:
                break
            n += 1
        text = self.stable[self.emitted_chars:at]
        self.emitted_tokens += n
        self.emitted_chars = at
        self.stable = self.stable[:at]
        self.stopped = stop
        return Release(n, text, stop)
