"""The gateway's side of the Redis contract (``docs/architecture.md`` "Redis contract",
``services.common.redis_keys``).

* ``submit``: one Lua script, so it is atomic: an existing idempotency record means
  a retry (same fingerprint: re-attach; else ALREADY_EXISTS); a queue at its depth
  limit refuses (RESOURCE_EXHAUSTED, nothing written); otherwise it creates the
  consumer group if missing, writes ``glm:req:{id}`` and appends the request.
* ``events``: ``glm:req:{id}:events`` from the start, until a terminal event or the
  caller's deadline, through the gateway's one ``StreamReader`` (one blocking XREAD
  for every stream its calls wait on, ``services/gateway/reader.py``). It rides
  through a Redis restart for ``reconnect_s`` (reading on from the last entry it
  saw), then fails UNAVAILABLE; a request whose record vanished (a restart that lost
  the data) fails UNAVAILABLE at once, never waits.
* ``cancel``: ``glm:req:{id}:cancel``, read by the scheduler every step.
* ``live_models``: the models that have a pool heartbeat (``glm:pool:*``, which
  expire ``POOL_TTL_S`` after a pool's last one), for the health status.

Redis being unreachable is never a hang: the client has short connect/read
timeouts and no retries, and every failure becomes UNAVAILABLE (a Redis at its
``maxmemory``: RESOURCE_EXHAUSTED, saying so).

Connections: a generation call holds at most one at a time (the submit script, an
EXISTS check of its record), the reader two (its XREAD, and one CLIENT UNBLOCK at a time),
cancel keys are written by at most ``CANCEL_WRITERS`` tasks at once (the others wait
their turn holding none), and the health check pings on one; ``pool_size(max_calls)``
is their sum, so a gateway that
admits at most ``max_calls`` calls (``service.CallLimit``) never runs out of
connections. The pool waits for a connection rather than failing, should one be
late in coming back.

``{id}`` above is the namespaced request id (``redis_keys.namespaced``); messages
to the caller name its own ``request_id`` (``redis_keys.caller_id``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import grpc
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common import redis_keys as keys
from services.common.errors import ResourceExhausted, ServiceError, Unavailable
from services.common.messages import Event, QueuedRequest
from services.gateway.reader import StreamReader

log = logging.getLogger("glm.gateway")
# The requests of one call (one, or the n samples of GenerateRequest.n), all or none: KEYS[1]
# is the queue, KEYS[1 + i] request i's record; ARGV: ttl, depth limit, group, field, then the
# fingerprint and document of each request. Every request already recorded is a retry (its
# fingerprint is checked by the caller); the others are appended only if they all fit in the queue.
SUBMIT_SCRIPT = """
local out, new = {}, 0
for i = 2, #KEYS do
  local existing = redis.call('GET', KEYS[i])
  if existing then out[i - 1] = existing else out[i - 1] = false; new = new + 1 end
end
if new > 0 and redis.call('XLEN', KEYS[1]) + new > tonumber(ARGV[2]) then return {'full'} end
if new > 0 then redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[3], '0', 'MKSTREAM') end
local result = {'ok'}
for i = 2, #KEYS do
  if out[i - 1] then
    result[#result + 1] = 'attached'; result[#result + 1] = out[i - 1]
  else
    redis.call('SET', KEYS[i], ARGV[3 + 2 * (i - 1)], 'EX', tonumber(ARGV[1]))
    result[#result + 1] = 'queued'
    result[#result + 1] = redis.call('XADD', KEYS[1], '*', ARGV[4], ARGV[4 + 2 * (i - 1)])
  end
end
return result
"""
READ_COUNT = 256
CANCEL_WRITERS = 8           # cancel keys written at once; each holds one connection
MONITOR_CONNECTIONS = 1      # the health check's ping
READER_CONNECTIONS = 2       # the StreamReader's blocking XREAD, and its CLIENT UNBLOCK
RECONNECT_S = 30.0          # a call waiting for events rides through a Redis outage this long
RECORD_CHECK_EVERY = 4      # empty XREADs between two checks that the request's record exists


class AlreadyExists(ServiceError):
    """A ``request_id`` already names a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed while its events were awaited."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass(frozen=True)
class Submitted:
    """The outcome of ``Broker.submit``: enqueued now, or attached to the same request
    enqueued by an earlier call."""

    request_id: str
    attached: bool          # True: a retry of a request already enqueued; nothing was added
    entry_id: str = ""      # the queue entry, when this call enqueued it


def pool_size(max_calls: int) -> int:
    """The Redis connections a gateway admitting ``max_calls`` concurrent calls can hold."""
    return max_calls + CANCEL_WRITERS + MONITOR_CONNECTIONS + READER_CONNECTIONS


def connect(url: str, timeout_s: float = 2.0, *, max_connections: int) -> aioredis.Redis:
    """A client that fails fast: short timeouts, no retries (the caller retries), at most
    ``max_connections`` connections (``pool_size``)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s,
        socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), retry_on_timeout=False, decode_responses=False)
    return aioredis.Redis.from_pool(pool)


class Broker:
    """The gateway's Redis client: idempotent enqueue with a queue-depth limit, event
    reading, cancellation; Redis failures become UNAVAILABLE."""

    def __init__(self, client: aioredis.Redis, *, max_queue_depth: int, timeout_s: float = 2.0,
                 on_failure=None, reconnect_s: float = RECONNECT_S) -> None:
        self.redis = client
        self.max_queue_depth = max_queue_depth
        self.reconnect_s = reconnect_s
        # A blocking XREAD must return before the socket read timeout fires.
        self.block_ms = max(10, min(1000, int(timeout_s * 500)))
        self._submit = client.register_script(SUBMIT_SCRIPT)
        self.reader = StreamReader(client, block_ms=self.block_ms, count=READ_COUNT,
                                   retry_s=min(1.0, self.block_ms / 1000.0))
        self._on_failure = on_failure or (lambda exc: None)   # e.g. flip health
        self._cancel_writers = asyncio.Semaphore(CANCEL_WRITERS)

    def _unavailable(self, exc: RedisError) -> ServiceError:
        if isinstance(exc, OutOfMemoryError):
            return ResourceExhausted("the request queue (Redis) is full: it reached its maxmemory; new "
                                     "requests are refused until finished results expire; retry later")
        self._on_failure(exc)
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
            return Unavailable(f"the request queue (Redis) is unreachable: {exc}")
        return ServiceError(f"Redis: {exc}")

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    async def submit(self, queued: QueuedRequest, fingerprint: str) -> Submitted:
        return (await self.submit_all([queued], [fingerprint]))[0]

    async def submit_all(self, requests: Sequence[QueuedRequest], fingerprints: Sequence[str]) -> list[Submitted]:
        """Enqueue the requests of one call (one, or its samples) atomically: every new one is
        enqueued, or (the queue lacks room for them all) none is; a retry re-attaches to those
        recorded, and a recorded id with another fingerprint is ALREADY_EXISTS."""
        args: list = [keys.ACTIVE_TTL_S, self.max_queue_depth, keys.GROUP, keys.FIELD]
        for queued, print_ in zip(requests, fingerprints):
            args += [print_, queued.to_json()]
        model = requests[0].model
        try:
            reply = await self._submit(keys=[keys.queue(model), *(keys.request(q.id) for q in requests)], args=args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None
        if reply[0].decode() == "full":
            if len(requests) == 1:
                raise ResourceExhausted(f"the queue of model {model!r} is full "
                                        f"({self.max_queue_depth} requests waiting); retry later")
            raise ResourceExhausted(f"the queue of model {model!r} has no room for {len(requests)} "
                                    f"samples ({self.max_queue_depth} requests at most); retry later")
        out = []
        for queued, print_, status, value in zip(requests, fingerprints, reply[1::2], reply[2::2]):
            if status.decode() == "attached":
                if value.decode() != print_:
                    raise AlreadyExists(f"request_id: {keys.caller_id(queued.id).split(keys.SAMPLE_SEPARATOR)[0]!r} is already used by "
                                        "a different request; use a new id")
                out.append(Submitted(queued.id, attached=True))
            else:
                out.append(Submitted(queued.id, attached=False, entry_id=value.decode()))
        return out

    async def events(self, request_id: str, deadline: float | None = None) -> AsyncIterator[Event]:
        """Every event of the request from the first one, until a terminal event.

        ``deadline`` is ``time.monotonic()`` seconds; past it, ``DeadlineExceeded``."""
        sub = self.reader.subscribe(keys.events(request_id))
        try:
            async for event in self._events(sub, request_id, deadline):
                yield event
                if event.terminal:
                    return
        finally:
            self.reader.unsubscribe(sub)

    async def _events(self, sub, request_id: str, deadline: float | None) -> AsyncIterator[Event]:
        failing_since, empty = None, 0
        while True:
            block = self.block_ms
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"request {keys.caller_id(request_id)}: deadline passed")
                block = max(1, min(block, int(left * 1000)))
            try:
                item = await sub.next(block / 1000.0)
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    empty += 1
                    if empty % RECORD_CHECK_EVERY == 0 and not await self.redis.exists(keys.request(request_id)):
                        raise Unavailable(f"request {request_id}: its record is gone from Redis (a restart "
                                          "without persistence, or expired); submit it again")
                    continue
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.reconnect_s:
                    raise self._unavailable(exc) from None
                self._on_failure(exc)
                continue               # the reader tries again after its own pause
            except RedisError as exc:
                raise self._unavailable(exc) from None
            failing_since = None
            _entry_id, fields = item
            yield Event.from_json(fields[keys.FIELD.encode()])

    async def cancel(self, request_id: str) -> None:
        async with self._cancel_writers:
            try:
                await self.redis.set(keys.cancel(request_id), b"1", ex=keys.CANCEL_TTL_S)
            except (RedisError, OSError) as exc:
                raise self._unavailable(exc) from None

    async def live_models(self) -> set[str]:
        """The models with at least one pool whose heartbeat has not expired."""
        try:
            names = [key async for key in self.redis.scan_iter(match=keys.pool_pattern(), count=256)]
            if not names:
                return set()
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hget(name, "model")
            return {m.decode() for m in await pipe.execute() if m}
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    async def queue_depth(self, model: str) -> int:
        try:
            return int(await self.redis.xlen(keys.queue(model)))
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    async def close(self) -> None:
        await self.reader.close()
        await self.redis.aclose()


async def cancel_quietly(broker: Broker, request_id: str) -> None:
    """Best effort: a cancel that cannot reach Redis is logged, not raised."""
    try:
        await broker.cancel(request_id)
    except (ServiceError, asyncio.CancelledError) as exc:
        log.warning("request %s: could not set the cancel key: %s", request_id, exc)
