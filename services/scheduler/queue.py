"""The scheduler's side of the Redis contract (``docs/architecture.md``, "Redis
contract"; the keys: ``services.common.redis_keys``).

A pool reads requests from ``glm:queue:{model}`` as consumer ``pool_id`` of the
group ``pools``, appends events to ``glm:req:{id}:events``, and when a request
ends XACKs + XDELs its entry and lets its keys expire after ``RESULT_TTL_S``.
Delivery is at least once: ``refresh`` re-claims the entries this pool holds
(XCLAIM JUSTID, which does not count as a delivery) so they never look idle;
``claim_idle`` takes the entries of a dead pool (XAUTOCLAIM; Redis 6.2 replies
with two elements, 7.x with three) together with their delivery counts.

A request id is opaque here (the gateway's tenant-namespaced id); every key comes from
``redis_keys``, which escapes it, so no id can name another request's key.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.common import redis_keys as keys
from services.common.messages import Event, QueuedRequest
from services.scheduler.request import Outcome


@dataclass(frozen=True)
class Entry:
    """One queue entry as this pool read or claimed it."""

    entry_id: str
    request: QueuedRequest | None     # None when the document does not parse
    raw: str
    deliveries: int = 1
    problem: str = ""                 # why ``request`` is None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(entry_id, fields, deliveries: int = 1) -> Entry:
    fields = {_text(k): v for k, v in (fields or {}).items()}
    raw = _text(fields.get(keys.FIELD, b""))
    try:
        return Entry(_text(entry_id), QueuedRequest.from_json(raw), raw, deliveries)
    except (ValueError, TypeError, KeyError) as exc:
        return Entry(_text(entry_id), None, raw, deliveries, f"malformed queue entry: {exc}")


class PoolQueue:
    """One pool's calls on its model's queue, the requests' events and its heartbeat."""

    def __init__(self, redis: aioredis.Redis, model: str, pool_id: str, *,
                 claim_idle_ms: int = keys.CLAIM_IDLE_MS) -> None:
        self.redis, self.model, self.pool_id = redis, model, pool_id
        self.stream = keys.queue(model)
        self.claim_idle_ms = claim_idle_ms
        self._claim_cursor = "0-0"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this pool (XREADGROUP ``>``), at most ``count``."""
        reply = await self.redis.xreadgroup(keys.GROUP, self.pool_id, {self.stream: ">"}, count=count,
                                            block=block_ms)
        out = []
        for _stream, entries in reply or []:
            out.extend(_entry(eid, fields) for eid, fields in entries)
        return out

    async def lag(self) -> int:
        """Entries no pool has taken yet: the group's ``lag`` (Redis >= 7.0), else what
        is neither acked (acked entries are deleted) nor pending: XLEN - pending."""
        for group in await self.redis.xinfo_groups(self.stream):
            if _text(group.get("name", b"")) == keys.GROUP:
                if group.get("lag") is not None:
                    return int(group["lag"])
                return max(0, int(await self.redis.xlen(self.stream)) - int(group.get("pending", 0)))
        return int(await self.redis.xlen(self.stream))

    async def claim_idle(self, count: int) -> list[Entry]:
        """Entries idle longer than ``claim_idle_ms`` (a dead pool's), now ours."""
        reply = await self.redis.xautoclaim(self.stream, keys.GROUP, self.pool_id, self.claim_idle_ms,
                                            start_id=self._claim_cursor, count=count)
        self._claim_cursor = _text(reply[0]) if reply else "0-0"
        claimed = list(reply[1]) if len(reply) > 1 else []      # 6.2: [next, entries]; 7.x: + deleted ids
        gone = [_text(eid) for eid, fields in claimed if not fields]
        if gone:                                                 # 6.2 lists deleted entries with nil fields
            await self.redis.xack(self.stream, keys.GROUP, *gone)
        claimed = [(eid, fields) for eid, fields in claimed if fields]
        if not claimed:
            return []
        counts = {}
        ids = sorted((_text(eid) for eid, _ in claimed), key=lambda s: tuple(map(int, s.split("-"))))
        for row in await self.redis.xpending_range(self.stream, keys.GROUP, min=ids[0], max=ids[-1],
                                                   count=len(ids) * 4 + 10, consumername=self.pool_id):
            counts[_text(row["message_id"])] = int(row["times_delivered"])
        return [_entry(eid, fields, counts.get(_text(eid), 1)) for eid, fields in claimed]

    async def refresh(self, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of the entries this pool holds (not a new delivery)."""
        if entry_ids:
            await self.redis.xclaim(self.stream, keys.GROUP, self.pool_id, 0, list(entry_ids), justid=True)

    async def events(self, request_id: str) -> list[Event]:
        return [Event.from_json(fields[keys.FIELD.encode()] if keys.FIELD.encode() in fields else fields[keys.FIELD])
                for _eid, fields in await self.redis.xrange(keys.events(request_id))]

    async def cancelled(self, request_ids: Sequence[str]) -> list[bool]:
        if not request_ids:
            return []
        values = await self.redis.mget([keys.cancel(r) for r in request_ids])
        return [v is not None for v in values]

    async def publish(self, events: Sequence[tuple[str, Event]], ended: Sequence[Outcome] = (),
                      entries: dict[str, str] | None = None) -> None:
        """Append events (then end requests: ack, delete, expire; dead-letter the poison) in one
        ordered pipeline."""
        if not events and not ended:
            return
        pipe = self.redis.pipeline(transaction=False)
        touched = []
        for request_id, event in events:
            pipe.xadd(keys.events(request_id), {keys.FIELD: event.to_json()})
            if request_id not in touched:
                touched.append(request_id)
        finished = {o.request_id for o in ended}
        for request_id in touched:
            if request_id not in finished:
                pipe.expire(keys.events(request_id), keys.ACTIVE_TTL_S)
                pipe.expire(keys.request(request_id), keys.ACTIVE_TTL_S)
        for outcome in ended:
            if outcome.dead:
                doc = {"request_id": outcome.request_id, "entry_id": outcome.tag, "code": outcome.code,
                       "reason": outcome.message, "pool": self.pool_id, "at": time.time(),
                       "request": (entries or {}).get(outcome.request_id, "")}
                pipe.xadd(keys.dead_letter(self.model), {keys.FIELD: json.dumps(doc)},
                          maxlen=keys.DEAD_MAXLEN, approximate=True)
            if outcome.tag:
                pipe.xack(self.stream, keys.GROUP, outcome.tag)
                pipe.xdel(self.stream, outcome.tag)
            pipe.expire(keys.events(outcome.request_id), keys.RESULT_TTL_S)
            pipe.expire(keys.request(outcome.request_id), keys.RESULT_TTL_S)
        await pipe.execute()

    async def drop_malformed(self, entry: Entry) -> None:
        """A queue entry that is not a request: dead-letter it and ack it."""
        doc = {"entry_id": entry.entry_id, "code": "INVALID_ARGUMENT", "reason": entry.problem,
               "pool": self.pool_id, "at": time.time(), "request": entry.raw}
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(keys.dead_letter(self.model), {keys.FIELD: json.dumps(doc)}, maxlen=keys.DEAD_MAXLEN,
                  approximate=True)
        pipe.xack(self.stream, keys.GROUP, entry.entry_id)
        pipe.xdel(self.stream, entry.entry_id)
        await pipe.execute()

    async def heartbeat(self, fields: dict) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.pool(self.pool_id), mapping={**fields, "updated_at": time.time()})
        pipe.expire(keys.pool(self.pool_id), keys.POOL_TTL_S)
        await pipe.execute()

    async def leave(self) -> None:
        await self.redis.delete(keys.pool(self.pool_id))
