"""The machine's Redis for the tests: one database number per test module, in one table.

The services build every key from ``services.common.redis_keys``, which has one fixed
prefix (``glm:``) and no way to configure another, so the isolation between modules
is the database: no two modules share one, and a module flushes only its own (before
its first test and after its last). Inside a module, tests keep apart by model name
(a fresh uuid each) and request ids. No Redis answering on 127.0.0.1:6379: the tests
that need it are skipped with ``SKIP_REASON``.
"""

from __future__ import annotations

import redis

HOST, PORT = "127.0.0.1", 6379
SKIP_REASON = f"no Redis server on {HOST}:{PORT}: start one or run .ci/run"

# module name -> its database (0 is left to people and to `glm serve --redis-url` defaults)
DATABASES = {
    "test_gateway": 1,
    "test_scheduler_redis": 2,
    "test_serving_e2e": 3,
    "test_tenants": 4,
    "test_gateway_tenants": 5,
    "test_edges_gateway": 12,
    "test_isolation": 11,
    "test_serving_beam_failover": 13,
}


def database(module: str) -> int:
    """The database of test module ``module`` (``tests.test_x`` or ``test_x``)."""
    name = module.rsplit(".", 1)[-1]
    if name not in DATABASES:
        raise KeyError(f"{name} has no Redis database: add it to DATABASES in tests/redis_harness.py")
    return DATABASES[name]


def url(module: str) -> str:
    return f"redis://{HOST}:{PORT}/{database(module)}"


def reachable() -> bool:
    try:
        client = redis.Redis(host=HOST, port=PORT, socket_connect_timeout=2, socket_timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


class RedisDb:
    """One module's database: its ``url`` (for the services) and a ``client``."""

    def __init__(self, module: str) -> None:
        self.number = database(module)
        self.url = url(module)
        self.client = redis.Redis.from_url(self.url)

    def flush(self) -> None:
        self.client.flushdb()

    def close(self) -> None:
        self.client.close()
