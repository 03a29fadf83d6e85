"""The scheduler's side of the Redis contract (``docs/architecture.md``, "Redis
contract"; the keys: ``services.common.redis_keys``).

A pool reads requests from ``glm:queue:{model}`` as consumer ``pool_id`` of the
group ``pools``, appends events to ``glm:req:{id}:events``, and when a request
ends XACKs + XDELs its entry and lets its keys expire after ``RESULT_TTL_S``.
Delivery is at least once: ``refresh`` re-claims the entries this pool still
holds (one Lua script: one XPENDING over their id range names the owner, one
XCLAIM JUSTID resets the idle time without counting a delivery) and returns those another pool took;
``claim_idle`` takes the entries of a dead pool (XAUTOCLAIM; Redis 6.2 replies
with two elements, 7.x with three) together with their delivery counts.

A request id is opaque here (the gateway's tenant-namespaced id); every key comes from
``redis_keys``, which escapes it, so no id can name another request's key.
``publish`` is one Lua script per step too, for every request of the step, so
ownership and writing are atomic: a request's events are appended only while its
entry is pending under this pool (one XPENDING for all of them; a pool that lost
the claim writes nothing, so a stream never gets a second final event), each
under the stream id ``0-{seq+1}``, so a publish retried after a lost reply writes
nothing twice (XADD refuses an id at or below the stream's top). A request's first
publish, and its first after any Redis failure, also compares the stream's length
(XLEN) with its next ``seq``: a stream found shorter (a restarted server lost writes)
counts as taken, and the request is claimed again and resumed from its events. The step's final
events, acks (one XACK, one XDEL) and expiry go in the same call. Expiry is set
once per request: on its first event (``ACTIVE_TTL_S``, a bound on a lost
request) and at its end (``result_ttl_s``), never per token. So a step of ``n``
rows costs the script call, one XPENDING and ``n`` XADDs (and an XLEN per request
at its first step).

``transient`` names the Redis failures a pool rides through (connection lost,
timeouts, LOADING/BUSY, OOM under ``maxmemory``, a restarted server that lost
the group: NOGROUP); the loop retries them with backoff.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

import redis.asyncio as aioredis
from redis.exceptions import (BusyLoadingError, ConnectionError as RedisConnectionError, MasterDownError,
                              OutOfMemoryError, ReadOnlyError, RedisError, ResponseError,
                              TimeoutError as RedisTimeoutError, TryAgainError)

from services.common import redis_keys as keys
from services.common.messages import Event, QueuedRequest
from services.scheduler.request import Outcome


REDIS_ERRORS = (RedisError, OSError)   # what a Redis call raises; ``transient`` tells which to ride through
_TRANSIENT_TYPES = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OutOfMemoryError, ReadOnlyError,
                   TryAgainError, MasterDownError, OSError)
_TRANSIENT_PREFIXES = ("NOGROUP", "BUSY", "LOADING", "OOM", "MISCONF", "MASTERDOWN", "READONLY", "TRYAGAIN")

# ``allow-oom`` (Redis >= 7.0): the requests a pool runs finish even at maxmemory (the
# overshoot is bounded by their tokens), while the gateway's writes, and so new requests,
# are refused. On an older server, the same script without the flag.
OOM_FLAG = "#!lua flags=allow-oom\n"

# The entries of ``ids`` pending under ``pool`` (a set), found with one XPENDING over
# their id range filtered by consumer (more only when this pool holds more than ``batch``
# entries in that range). ``lo``/``hi``: the smallest and largest id of ``ids``.
OWNED_LUA = """
local function owned_of(queue, group, pool, lo, hi, batch)
  local owned, start = {}, lo
  while lo ~= '' do
    local rows = redis.call('XPENDING', queue, group, start, hi, batch, pool)
    for _, row in ipairs(rows) do owned[row[1]] = true end
    if #rows < batch then break end
    start = '(' .. rows[#rows][1]
  end
  return owned
end
"""

# KEYS: queue, dead letters, then per request its events stream and its idempotency record.
# ARGV: group, pool, field, active ttl, result ttl, dead maxlen, n, lo, hi, batch; per
# request: entry id ("" = none), seq of its first event, event count, ended ("0"/"1"),
# dead-letter document ("" = none), check ("1": compare the stream's length first), then
# its events. An event's stream id is 0-(seq+1), so XADD refuses one written before (a
# retry after a lost reply): then XLEN says whether it is there (a stream an older pool
# wrote with time ids takes it with an automatic id). A checked stream shorter than the
# first seq (Redis lost writes) counts as not held: nothing is written, the pool drops the
# request and it is claimed again and resumed from what the stream holds. Returns the
# 1-based indices of the requests this pool no longer holds (nothing written).
PUBLISH_SCRIPT = OWNED_LUA + """
local group, pool, field = ARGV[1], ARGV[2], ARGV[3]
local active_ttl, result_ttl, dead_max, n = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local owned = owned_of(KEYS[1], group, pool, ARGV[8], ARGV[9], tonumber(ARGV[10]))
local a, lost, done = 11, {}, {}
for i = 1, n do
  local ev, req = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local entry, first, count = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local ended, dead, check = ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local at = a + 6
  a = at + count
  if (entry ~= '' and not owned[entry]) or (check == '1' and count > 0 and redis.call('XLEN', ev) < first) then
    table.insert(lost, i)
  else
    for j = 0, count - 1 do
      local seq = first + j
      local added = redis.pcall('XADD', ev, '0-' .. (seq + 1), field, ARGV[at + j])
      if type(added) == 'table' and added.err then
        if not string.find(added.err, 'equal or smaller', 1, true) then return redis.error_reply(added.err) end
        if redis.call('XLEN', ev) <= seq then redis.call('XADD', ev, '*', field, ARGV[at + j]) end
      end
    end
    if first == 0 and count > 0 and ended ~= '1' then redis.call('EXPIRE', ev, active_ttl) end
    if ended == '1' then
      if dead ~= '' then redis.call('XADD', KEYS[2], 'MAXLEN', '~', dead_max, '*', field, dead) end
      if entry ~= '' then table.insert(done, entry) end
      redis.call('EXPIRE', ev, result_ttl)
      redis.call('EXPIRE', req, result_ttl)
    end
  end
end
if #done > 0 then
  redis.call('XACK', KEYS[1], group, unpack(done))
  redis.call('XDEL', KEYS[1], unpack(done))
end
return lost
"""

# KEYS: queue. ARGV: group, pool, lo, hi, batch, entry ids. Re-claims (idle time 0, no
# delivery counted; one XCLAIM) the entries still pending under this pool; returns the
# others (another pool took them).
REFRESH_SCRIPT = OWNED_LUA + """
local owned = owned_of(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))
local claim, lost = {KEYS[1], ARGV[1], ARGV[2], 0}, {}
for i = 6, #ARGV do
  if owned[ARGV[i]] then table.insert(claim, ARGV[i]) else table.insert(lost, ARGV[i]) end
end
if #claim > 4 then
  table.insert(claim, 'JUSTID')
  redis.call('XCLAIM', unpack(claim))
end
return lost
"""


def id_range(entry_ids) -> list:
    """``lo, hi, batch`` of the owner check for these stream ids ("", "", 1 for none)."""
    ids = sorted({e for e in entry_ids if e}, key=lambda s: tuple(map(int, s.split("-"))))
    if not ids:
        return ["", "", 1]
    return [ids[0], ids[-1], len(ids) + 16]


def transient(exc: BaseException) -> bool:
    """A Redis failure to ride through (retry with backoff), not a bug to stop on."""
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_PREFIXES)


def lost_group(exc: BaseException) -> bool:
    """The server no longer has the consumer group (it restarted without its data)."""
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


@dataclass(frozen=True)
class Entry:
    """One queue entry as this pool read or claimed it."""

    entry_id: str
    request: QueuedRequest | None     # None when the document does not parse
    raw: str
    deliveries: int = 1
    problem: str = ""                 # why ``request`` is None
    pending: bool = False             # re-read from this pool's own pending entries: may have events


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(entry_id, fields, deliveries: int = 1, pending: bool = False) -> Entry:
    fields = {_text(k): v for k, v in (fields or {}).items()}
    raw = _text(fields.get(keys.FIELD, b""))
    try:
        return Entry(_text(entry_id), QueuedRequest.from_json(raw), raw, deliveries, pending=pending)
    except (ValueError, TypeError, KeyError) as exc:
        return Entry(_text(entry_id), None, raw, deliveries, f"malformed queue entry: {exc}", pending)


class PoolQueue:
    """One pool's calls on its model's queue, the requests' events and its heartbeat."""

    def __init__(self, redis: aioredis.Redis, model: str, pool_id: str, *,
                 claim_idle_ms: int = keys.CLAIM_IDLE_MS, result_ttl_s: int = keys.RESULT_TTL_S) -> None:
        self.redis, self.model, self.pool_id = redis, model, pool_id
        self.stream = keys.queue(model)
        self.claim_idle_ms = claim_idle_ms
        self.result_ttl_s = result_ttl_s
        self._claim_cursor = "0-0"
        self._publish = redis.register_script(OOM_FLAG + PUBLISH_SCRIPT)
        self._publish_plain = redis.register_script(PUBLISH_SCRIPT)
        self._refresh = redis.register_script(REFRESH_SCRIPT)
        self._checked: set[str] = set()   # requests whose stream length was checked since the last failure

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
        return self._new_entries(reply)

    @staticmethod
    def _new_entries(reply) -> list[Entry]:
        out = []
        for _stream, entries in reply or []:
            out.extend(_entry(eid, fields) for eid, fields in entries)
        return out

    async def poll(self, request_ids: Sequence[str], count: int,
                   block_ms: int | None) -> tuple[list[bool], list[Entry]]:
        """The cancel flags of ``request_ids`` (``cancelled``) and, when ``count``, up to
        ``count`` new entries (``read``), in one round trip when both are asked."""
        if not (request_ids and count):
            flags = await self.cancelled(request_ids)
            return flags, (await self.read(count, block_ms) if count else [])
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget([keys.cancel(r) for r in request_ids])
        pipe.xreadgroup(keys.GROUP, self.pool_id, {self.stream: ">"}, count=count, block=block_ms)
        values, reply = await pipe.execute()
        return [v is not None for v in values], self._new_entries(reply)

    async def read_own(self, count: int) -> list[Entry]:
        """The entries pending under this pool (XREADGROUP from ``0``): after a Redis
        failure, those whose delivery reply was lost on the way."""
        reply = await self.redis.xreadgroup(keys.GROUP, self.pool_id, {self.stream: "0"}, count=count)
        out = []
        for _stream, entries in reply or []:
            out.extend(_entry(eid, fields, pending=True) for eid, fields in entries if fields)
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

    async def refresh(self, entry_ids: Sequence[str]) -> set[str]:
        """Reset the idle time of the entries this pool still holds (not a new delivery);
        the ids of those another pool took (this pool must stop generating them)."""
        if not entry_ids:
            return set()
        lost = await self._refresh(keys=[self.stream],
                                   args=[keys.GROUP, self.pool_id, *id_range(entry_ids), *entry_ids])
        return {_text(e) for e in lost or ()}

    async def events(self, request_id: str) -> list[Event]:
        return [Event.from_json(fields[keys.FIELD.encode()] if keys.FIELD.encode() in fields else fields[keys.FIELD])
                for _eid, fields in await self.redis.xrange(keys.events(request_id))]

    async def cancelled(self, request_ids: Sequence[str]) -> list[bool]:
        if not request_ids:
            return []
        values = await self.redis.mget([keys.cancel(r) for r in request_ids])
        return [v is not None for v in values]

    async def publish(self, events: Sequence[tuple[str, Event]], ended: Sequence[Outcome] = (),
                      entries: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> set[str]:
        """Append events, then end requests (ack, delete, expire; dead-letter the poison),
        in one script, request by request, only for entries this pool still holds.
        ``tags``: request id -> its queue entry id (an ``Outcome`` names its own). Returns
        the requests another pool holds now: nothing was written for them."""
        if not events and not ended:
            return set()
        tags = dict(tags or {})
        order: list[str] = []
        grouped: dict[str, list[Event]] = {}
        for request_id, event in events:
            if request_id not in grouped:
                order.append(request_id)
                grouped[request_id] = []
            grouped[request_id].append(event)
        done = {}
        for outcome in ended:
            done[outcome.request_id] = outcome
            if outcome.tag:
                tags[outcome.request_id] = outcome.tag
            if outcome.request_id not in grouped:
                order.append(outcome.request_id)
                grouped[outcome.request_id] = []
        script_keys = [self.stream, keys.dead_letter(self.model)]
        args = [keys.GROUP, self.pool_id, keys.FIELD, keys.ACTIVE_TTL_S, self.result_ttl_s, keys.DEAD_MAXLEN,
                len(order), *id_range(tags.get(r) for r in order)]
        for request_id in order:
            evs, outcome = grouped[request_id], done.get(request_id)
            dead = ""
            if outcome is not None and outcome.dead:
                dead = json.dumps({"request_id": request_id, "entry_id": outcome.tag, "code": outcome.code,
                                   "reason": outcome.message, "pool": self.pool_id, "at": time.time(),
                                   "request": (entries or {}).get(request_id, "")})
            script_keys += [keys.events(request_id), keys.request(request_id)]
            args += [tags.get(request_id) or "", evs[0].seq if evs else 0, len(evs),
                     "1" if outcome is not None else "0", dead, "0" if request_id in self._checked else "1",
                     *(e.to_json() for e in evs)]
        try:
            lost = await self._publish(keys=script_keys, args=args)
        except ResponseError as exc:
            if self._publish is self._publish_plain or "compil" not in str(exc).lower():
                raise
            self._publish = self._publish_plain          # Redis < 7.0: no script flags
            lost = await self._publish(keys=script_keys, args=args)
        lost = {order[int(i) - 1] for i in lost or ()}
        self._checked.update(r for r in order if r not in lost and r not in done)
        self._checked.difference_update(done)
        return lost

    def failed(self) -> None:
        """A Redis call failed: the server may have restarted and lost writes, so each
        request's next publish compares its stream's length again (once, then never per
        token)."""
        self._checked.clear()

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
