"""Shared fixtures: random checkpoints in the official layout, written once per session
for each (preset, partitions, seed) and never modified by a test (tests that break a
checkpoint copy it first); each module's own database of the machine's Redis
(tests/redis_harness.py)."""

from __future__ import annotations

import pytest

from model.tiny import init_tiny
from redis_harness import SKIP_REASON, RedisDb, reachable


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(preset="glm-tiny", tp=1, seed=0) -> str``: a folder holding that model."""
    made: dict[tuple[str, int, int], str] = {}

    def get(preset: str = "glm-tiny", tp: int = 1, seed: int = 0) -> str:
        key = (preset, tp, seed)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{preset}-tp{tp}-seed{seed}")
            init_tiny(folder, preset=preset, tp=tp, seed=seed)
            made[key] = str(folder)
        return made[key]

    return get


@pytest.fixture(scope="module")
def redis_db(request):
    """This module's own database of the machine's Redis (``RedisDb``), flushed before its
    first test and after its last; the module's tests are skipped when no Redis answers."""
    if not reachable():
        pytest.skip(SKIP_REASON)
    db = RedisDb(request.module.__name__)
    db.flush()
    yield db
    db.flush()
    db.close()
