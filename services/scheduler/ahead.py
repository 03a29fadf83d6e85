"""Steps sent ahead: the core's side (``docs/architecture.md``, "Scheduler", step 6).

Over paged workers, while a Decode runs, the loop may send the next Decode of the same
batch before the reply comes (``DecodeRequest.ahead``), so the workers never wait on the
scheduler between two steps. The next step is then planned before the reply of the one
in flight, so it may only be the plain continuation: the same rows, each fed its pending
token, nothing filtered, nothing admitted. ``RunAhead.ahead`` says when that is the
step the plan would choose anyway:

- every row it would run is still running here: none cancelled, past its deadline,
  ended on a stop text (the workers do not know: it needs a FilterBatch) or a beam search
  (its beams fork and merge rows);
- no waiting phase could be admitted now (it would wait a step more) and none waiting
  is cancelled or past its deadline (its final event would wait on the next plan);
- the pool holds every row's next token (an upper bound: rows may finish before).

A row that finishes on the workers in the step in flight (its length, an end token)
leaves their batch there; the step sent ahead skips it, and a batch left empty is
skipped altogether (an empty reply). Rows whose length ends in the step in flight are
known here and not counted.

The rows of a step are ``{row id: (tokens in KV, tokens it may still generate)}``, once
the step fed it: what the next step sent ahead starts from.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from model.kv_footprint import blocks_for
from services.scheduler.ops import BatchView
from services.scheduler.request import RequestState, RequestStatus

Rows = dict[int, tuple[int, int]]


class RunAhead:
    """The ``Scheduler`` methods for steps sent ahead (see the module docstring)."""

    def rows_after(self, views: Sequence[BatchView]) -> Rows:
        """The rows of a Decode of ``views`` just sent (nothing admitted), once it has run:
        each row's KV one token longer, one token fewer to generate (those left with none
        finish in it and are left out)."""
        rows: Rows = {}
        for v in views:
            for r in v.row_ids:
                if r in self._row_tokens and r in self._row_remaining and self._row_remaining[r] > 1:
                    rows[r] = (self._row_tokens[r] + 1, self._row_remaining[r] - 1)
        return rows

    def ahead(self, rows: Rows, now: float) -> Rows | None:
        """The rows of the next Decode sent ahead of the reply of the step whose rows (after
        it) are ``rows``, once that Decode has run; None: plan the next step after the reply."""
        if not self.paged or not rows:
            return None
        live: Rows = {}
        for r, after in rows.items():
            if r not in self._row_tokens:
                continue                                 # it finished on the workers (its reply came)
            state = self._by_row.get(r)
            if state is None or state.status is not RequestStatus.RUNNING or r in self._row_beams \
                    or _ends(state, now):
                return None
            live[r] = after
        if not live or any(_ends(s, now) for s in self._waiting) or self._could_admit(list(live)):
            return None
        if sum(blocks_for(tokens + 1, self.block_size) for tokens, _ in live.values()) > self.num_blocks:
            return None
        return {r: (tokens + 1, left - 1) for r, (tokens, left) in live.items() if left > 1}

    def row_request_ids(self, rows: Iterable[int]) -> list[str]:
        """The requests of ``rows`` still running here (in ``rows``' order)."""
        return [self._by_row[r].id for r in rows if r in self._by_row]

    def _could_admit(self, keep: list[int]) -> bool:
        """A waiting phase that the plan would admit beside the rows ``keep``."""
        return not self._admission_closed(len(keep)) and bool(self._admissible(keep))


def _ends(state: RequestState, now: float) -> bool:
    """The next plan ends ``state``: cancelled, or past its deadline."""
    return state.cancelled is not None or state.req.expired(now)
