"""What the scheduler's core (``services.scheduler.policy``) decides with and about: the
batching modes, a pool's admission limits, the workers' batches as the core sees them, and a
step's plan (the FilterBatch and the Prefill to send) and output (events, ended requests).
Pure data; ``policy`` re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from services.common.messages import Beam, Event, Sampling
from services.scheduler.request import Outcome


class BatchingMode(StrEnum):
    """How requests share the workers (the value is the ``--mode`` of ``glm scheduler``)."""

    CONTINUOUS = "continuous"  # phases join and leave the running batch between decode steps
    STATIC = "static"          # a batch is prefilled only when none is running, then runs out
    SEQUENTIAL = "sequential"  # one request at a time


MODES = tuple(mode.value for mode in BatchingMode)   # the --mode choices


@dataclass(frozen=True)
class Limits:
    """A pool's admission limits and batching mode (``mode`` may be given as its string)."""

    max_batch_size: int = 32
    max_input_tokens: int = 1024       # context + sop of one request
    max_total_tokens: int = 2048       # input + new tokens of one request (new tokens are clamped)
    max_prefill_tokens: int = 4096     # padded rows x width of one prefill (one phase always passes)
    max_waiting_tokens: int = 20       # decode steps after which waiting phases are forced in
    waiting_served_ratio: float = 0.3  # waiting phases per running row that justify a prefill
    mode: BatchingMode = BatchingMode.CONTINUOUS
    kv_watermark: float = 0.01         # paged pool: share of blocks admission leaves free for growth

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", BatchingMode(self.mode))
        except ValueError:
            raise ValueError(f"mode must be one of {', '.join(BatchingMode)}, got {self.mode!r}") from None
        for name in ("max_batch_size", "max_input_tokens", "max_total_tokens", "max_prefill_tokens",
                     "max_waiting_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_input_tokens < self.max_total_tokens:
            raise ValueError(f"max_input_tokens ({self.max_input_tokens}) must be < max_total_tokens "
                             f"({self.max_total_tokens})")
        if not 0 <= self.kv_watermark < 1:
            raise ValueError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")
        if self.waiting_served_ratio < 0:
            raise ValueError(f"waiting_served_ratio must be >= 0, got {self.waiting_served_ratio}")


@dataclass(frozen=True)
class BatchView:
    """A cached batch on the workers (``CachedBatch``)."""

    id: int
    row_ids: tuple[int, ...]   # in row order
    width: int                 # KV slots every row holds now, left padding included
    max_tokens: int            # the workers' footprint of it (reported in metrics, sent back in Decode)
    rows: int = 0              # the workers' rows (a beam search holds one per beam); 0: one per id

    def __post_init__(self) -> None:
        if not self.rows:
            object.__setattr__(self, "rows", len(self.row_ids))

    @property
    def size(self) -> int:
        """Phases (worker request ids) in the batch."""
        return len(self.row_ids)


@dataclass(frozen=True)
class Snapshot:
    """The core's counts, for the loop's metrics and heartbeat."""

    requests: int              # requests held, whatever their status
    running: int               # phases on the workers
    waiting: int               # phases waiting for a prefill
    batch_rows: int            # rows of the cached batches (one that stopped on a text stays until filtered)
    kv_slots: int              # the cached batches' footprint, as the workers report it


@dataclass(frozen=True)
class ShardRequest:
    """One phase as the workers get it (``shard.proto`` ``Request``)."""

    row_id: int
    input_ids: tuple[int, ...]
    generated_ids: tuple[int, ...]
    sampling: Sampling
    max_new_tokens: int
    min_new_tokens: int
    top_logprobs: int
    mask_position: int          # index in input_ids of the mask this phase fills
    logprobs: bool = False      # the chosen tokens' log-probs are wanted
    beam: Beam | None = None    # a beam search: its draws seeded with ``sampling.seed``


@dataclass(frozen=True)
class PrefillOp:
    """A ``Prefill`` to send: a new batch of waiting phases."""

    batch_id: int
    requests: tuple[ShardRequest, ...]
    request_ids: tuple[str, ...]

    @property
    def tokens(self) -> int:
        return len(self.requests) * max(len(r.input_ids) + 1 + len(r.generated_ids) for r in self.requests)


@dataclass(frozen=True)
class FilterOp:
    """A ``FilterBatch`` to send: the running batch's rows to keep."""

    batch_id: int
    keep: tuple[int, ...]


@dataclass
class StepOutput:
    """Events to append (request id, event), in order, and the requests that ended."""

    events: list[tuple[str, Event]] = field(default_factory=list)
    ended: list[Outcome] = field(default_factory=list)

    def merge(self, other: "StepOutput") -> "StepOutput":
        self.events += other.events
        self.ended += other.ended
        return self


@dataclass
class StepPlan(StepOutput):
    """The start of a step: its events, then at most one filter and one prefill to send."""

    filter: FilterOp | None = None
    prefill: PrefillOp | None = None
