"""One blocking XREAD for every event stream a gateway's calls wait on (``docs/architecture.md``,
"Redis contract"): a pool publishes a step's events of all its requests in one script call, so
one XREAD wakes with all of them, not one XREAD per call and token.

``StreamReader.subscribe`` gives a call a ``Subscription`` on its request's stream; the reader
task (one per gateway, started with the first subscription, ending with the last) holds one
connection of the gateway's pool (and its unblocking, one more at most) and reads every subscribed stream from the oldest position a
subscription still needs; each subscription gets the entries past its own position, in order.
A new stream is read at once: a subscription made while the XREAD blocks unblocks it (CLIENT
UNBLOCK from another connection), and the next XREAD includes it.

A Redis failure of the XREAD reaches every subscription as that exception; the reader tries
again after ``retry_s`` on a new connection, reading on from where each subscription stood.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("glm.gateway")


def _stream_id(value: bytes) -> tuple[int, int]:
    ms, _, seq = value.partition(b"-")
    return int(ms), int(seq or 0)


class Subscription:
    """One call's view of its request's stream: entries past ``last``, or a Redis failure."""

    def __init__(self, key: bytes, last: bytes = b"0-0") -> None:
        self.key = key
        self.last = last
        self.items: asyncio.Queue = asyncio.Queue()    # (entry id, fields) or an exception

    async def next(self, timeout_s: float):
        """The next entry or failure; None when none came within ``timeout_s``."""
        try:
            return await asyncio.wait_for(self.items.get(), timeout_s)
        except asyncio.TimeoutError:
            return None


class StreamReader:
    """The gateway's one reader of the requests' event streams (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, *, block_ms: int, count: int, retry_s: float) -> None:
        self.redis = client
        self.block_ms, self.count, self.retry_s = block_ms, count, retry_s
        self._subs: dict[bytes, list[Subscription]] = {}
        self._task: asyncio.Task | None = None
        self._conn: aioredis.Redis | None = None
        self._client_id: int | None = None
        self._reading: set[bytes] = set()      # the streams of the XREAD in flight (empty: none)
        self._unblocking: asyncio.Task | None = None   # one at a time: it wakes the XREAD for all new ones

    def subscribe(self, key: bytes | str) -> Subscription:
        key = key.encode() if isinstance(key, str) else key
        sub = Subscription(key)
        self._subs.setdefault(key, []).append(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        elif self._reading and key not in self._reading and (self._unblocking is None or self._unblocking.done()):
            self._unblocking = asyncio.ensure_future(self._unblock())
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._subs.pop(sub.key, None)

    async def close(self) -> None:
        """Stop reading (the subscriptions left get nothing more)."""
        self._subs.clear()
        for task in (self._task, self._unblocking):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, RedisError, OSError):
                    pass
        self._task = self._unblocking = None

    async def _unblock(self) -> None:
        """Make the blocked XREAD return, so the next one reads the new stream too. The
        unblock may reach Redis before the XREAD itself: then it is tried again."""
        for _ in range(100):
            if not self._reading or self._client_id is None:
                return
            try:
                if await self.redis.client_unblock(self._client_id):
                    return
            except (RedisError, OSError):
                return                 # the XREAD fails too and is retried with the new stream
            await asyncio.sleep(0.001)

    async def _run(self) -> None:
        try:
            while self._subs:
                await self._read_once()
        finally:
            if self._conn is not None:
                conn, self._conn, self._client_id = self._conn, None, None
                try:
                    await conn.aclose()
                except (RedisError, OSError):
                    pass
            if self._subs and self._task is asyncio.current_task():
                self._task = asyncio.ensure_future(self._run())   # subscribed while it was closing

    async def _read_once(self) -> None:
        streams = {key: min((s.last for s in subs), key=_stream_id) for key, subs in self._subs.items() if subs}
        try:
            if self._conn is None:
                self._conn = aioredis.Redis(connection_pool=self.redis.connection_pool,
                                            single_connection_client=True)
            if self._client_id is None:
                self._client_id = int(await self._conn.client_id())
            self._reading = set(streams)
            try:
                reply = await self._conn.xread(streams, count=self.count, block=self.block_ms)
            finally:
                self._reading = set()
        except (RedisError, OSError) as exc:
            for subs in self._subs.values():
                for sub in subs:
                    sub.items.put_nowait(exc)
            conn, self._conn, self._client_id = self._conn, None, None
            if conn is not None:
                try:
                    await conn.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(self.retry_s)
            return
        for key, entries in reply or ():
            key = key.encode() if isinstance(key, str) else key
            for sub in self._subs.get(key, []):
                at = _stream_id(sub.last)
                for entry_id, fields in entries:
                    if _stream_id(entry_id) > at:
                        sub.items.put_nowait((entry_id, fields))
                        sub.last = entry_id
