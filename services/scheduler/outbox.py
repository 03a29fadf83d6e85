"""A pool's events on their way to Redis, in order, through Redis failures
(``docs/architecture.md``, "Redis contract").

``Outbox`` holds the step outputs not yet published and publishes them oldest
first, all those waiting in one script call; one that fails stays at the head
and is retried, so events are never dropped and never reordered. A retry after a lost reply writes nothing twice:
``PoolQueue.publish`` appends only past the stream's length. ``Flusher`` runs those
publishes, behind the next Decode or at once. ``Backoff`` is the capped exponential
delay between tries while Redis fails.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Callable

from services.common.messages import Event
from services.scheduler.queue import REDIS_ERRORS, PoolQueue, transient
from services.scheduler.request import Outcome


MAX_EVENTS = 2048                     # events of one publish call at most (after an outage: several)


class Backoff:
    """Capped exponential backoff: ``failed`` doubles the delay (from ``first_s`` up to
    ``cap_s``), ``ok`` resets it; ``ready`` says whether the next try is due."""

    def __init__(self, first_s: float, cap_s: float) -> None:
        self.first_s, self.cap_s = first_s, cap_s
        self.delay_s = 0.0
        self.retry_at = 0.0
        self.failures = 0                 # consecutive failures

    @property
    def failing(self) -> bool:
        return self.failures > 0

    @property
    def ready(self) -> bool:
        return time.monotonic() >= self.retry_at

    def failed(self) -> None:
        self.failures += 1
        self.delay_s = min(self.cap_s, max(self.first_s, self.delay_s * 2))
        self.retry_at = time.monotonic() + self.delay_s

    def ok(self) -> None:
        self.failures, self.delay_s, self.retry_at = 0, 0.0, 0.0


@dataclass(frozen=True)
class _Batch:
    events: tuple[tuple[str, Event], ...]
    ended: tuple[Outcome, ...]
    raw: dict[str, str]                   # request id -> queue document (dead letters)
    tags: dict[str, str]                  # request id -> queue entry id


class Outbox:
    """Step outputs waiting to be published, oldest first (see the module docstring)."""

    def __init__(self, queue: PoolQueue) -> None:
        self.queue = queue
        self._batches: collections.deque[_Batch] = collections.deque()

    def __len__(self) -> int:
        return len(self._batches)

    def put(self, events, ended, raw: dict[str, str], tags: dict[str, str]) -> None:
        if events or ended:
            self._batches.append(_Batch(tuple(events), tuple(ended), dict(raw), dict(tags)))

    async def flush(self, taken: set[str]) -> None:
        """Publish every waiting output in order, those waiting together in one call (up to
        ``MAX_EVENTS`` events); the requests another pool holds now are added to ``taken``.
        A Redis error propagates with the failed outputs (and every later one) still waiting."""
        while self._batches:
            head, events = [], 0
            for batch in self._batches:
                if head and events + len(batch.events) > MAX_EVENTS:
                    break
                head.append(batch)
                events += len(batch.events)
            raw, tags = {}, {}
            for batch in head:
                raw.update(batch.raw)
                tags.update(batch.tags)
            taken |= await self.queue.publish([e for b in head for e in b.events],
                                              [o for b in head for o in b.ended], raw, tags)
            for _ in head:                # outputs put meanwhile stay, after these
                self._batches.popleft()


class Flusher:
    """Publishes an ``Outbox`` for the loop: ``behind()`` in a background task, one at a time
    (a running one takes what was queued since), so a step's events go out while the next
    Decode runs; ``now()`` after that task. A transient Redis failure goes to ``failed``
    (the loop's recovery, which flushes first); while ``recovering()`` nothing is tried."""

    def __init__(self, outbox: Outbox, taken: set[str], *, failed: Callable[[BaseException], None],
                 recovering: Callable[[], bool]) -> None:
        self.outbox, self.taken = outbox, taken
        self._failed, self._recovering = failed, recovering
        self.task: asyncio.Task | None = None

    @property
    def idle(self) -> bool:
        return self.task is None or self.task.done()

    def behind(self) -> None:
        if self.outbox and not self._recovering() and self.idle:
            self.task = asyncio.ensure_future(self._later(self.task))

    async def now(self) -> None:
        await self.wait()
        await self.publish()

    async def wait(self) -> None:
        """Until the background publish is done; raises what it raised (a bug, not Redis)."""
        task, self.task = self.task, None
        if task is not None:
            await task

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _later(self, previous: asyncio.Task | None) -> None:
        if previous is not None:
            await previous             # done; its failure, if any, is raised here: the loop sees it
        for _ in range(3):             # the Decode just started goes out first (its gRPC
            await asyncio.sleep(0)     # send runs in tasks of its own)
        await self.publish()

    async def publish(self) -> None:
        """One flush of the outbox; a transient Redis failure starts the recovery."""
        if self._recovering():
            return                     # the recovery flushes first
        try:
            await self.outbox.flush(self.taken)
        except REDIS_ERRORS as exc:
            if not transient(exc):
                raise
            self._failed(exc)
