"""The KV footprint of a batch: the one formula workers and schedulers share.

Torch-free on purpose: the scheduler imports it (``tests/test_layering.py``
allows it), so the workers' refusal and the scheduler's admission can never
disagree. Two caches: the dense, left-padded one (``model.kv_cache``, kept for
``glm generate`` and CUDA graphs), where every row of a batch holds as many
slots as the widest row and grows by one slot per decode step until the longest
remaining generation is done; and the block-paged pool of the workers
(``model.paged_kv``), where a row holds ``blocks_for(its tokens)`` blocks.
"""

from __future__ import annotations


def padded_kv_slots(rows: int, width: int, longest_remaining: int) -> int:
    """Slots a dense, left-padded batch of ``rows`` rows holds once every row has
    generated what it may: ``rows x (width + longest remaining generation)``."""
    if rows < 0 or width < 0 or longest_remaining < 0:
        raise ValueError(f"rows, width and longest_remaining must be >= 0, got {rows}, {width}, {longest_remaining}")
    return rows * (width + longest_remaining)


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of ``block_size`` slots that a row of ``tokens`` cached tokens holds."""
    return -(-tokens // block_size)
