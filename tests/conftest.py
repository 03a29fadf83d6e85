"""Shared fixtures: random checkpoints in the official layout, written once per session
for each (preset, partitions, seed) and never modified by a test (tests that break a
checkpoint copy it first)."""

from __future__ import annotations

import pytest

from model.tiny import init_tiny


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
