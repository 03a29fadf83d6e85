"""Rewrite a checkpoint for another number of tensor-parallel partitions.

The offline counterpart of the on-the-fly resharding in ``model.checkpoint``: output ranks are
built one at a time from memory-mapped sources, so the converter needs one output shard of
RAM, not the whole model. ``latest``'s iteration and ``config.json`` are carried over;
``latest`` is written last, so an interrupted conversion leaves no loadable checkpoint.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from model.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    expected_shapes,
    holds_checkpoint,
    inspect_checkpoint,
    read_rank_state,
    write_metadata,
    write_shard,
)
from model.config import CONFIG_FILE


def convert_checkpoint(
    input_dir: str | Path, output_dir: str | Path, target_tp: int, progress: bool = True
) -> CheckpointInfo:
    """Write ``input_dir`` resharded to ``target_tp`` partitions into ``output_dir``."""
    info = inspect_checkpoint(input_dir)
    output_dir = Path(output_dir)
    if output_dir.resolve() == info.directory.resolve():
        raise CheckpointError(f"{output_dir}: output folder is the input folder")
    if holds_checkpoint(output_dir):
        raise CheckpointError(f"{output_dir} already holds a checkpoint; refusing to overwrite")
    keys = expected_shapes(info.config, target_tp)  # CheckpointError if target_tp is invalid
    output_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=len(keys) * target_tp,
        unit="tensor",
        desc=f"TP {info.num_partitions}->{target_tp}",
        file=sys.stderr,
        disable=not progress,
    )
    with bar:
        for rank in range(target_tp):
            bar.set_postfix_str(f"rank {rank}")
            state = read_rank_state(
                info, target_tp, rank, on_copy=lambda _key, _t: bar.update()
            )
            write_shard(output_dir, info.iteration, rank, state)
            del state  # one output shard in memory at a time

    source_config = info.directory / CONFIG_FILE
    if source_config.exists():
        shutil.copyfile(source_config, output_dir / CONFIG_FILE)
    write_metadata(output_dir, info.iteration, info.config)
    return inspect_checkpoint(output_dir)

