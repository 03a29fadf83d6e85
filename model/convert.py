"""Rewrite a checkpoint for another number of tensor-parallel partitions, optionally
quantizing it into the official pre-quantized layout.

The offline counterpart of the on-the-fly resharding in ``model.checkpoint``: output ranks are
built one at a time from memory-mapped sources, tensor by tensor, so the converter needs one
output shard of RAM, not the whole model. ``latest``'s iteration and ``config.json`` are
carried over; ``latest`` is written last, so an interrupted conversion leaves no loadable
checkpoint.

Quantization (``quant``) follows the official ``convert_tp.py``: after resharding, each output
rank's four linears per layer are quantized from its own fp16 shard and written as ``<key>``
(int8) plus ``<key>_scale`` (fp16). A pre-quantized input is resharded as it is: output rows
of column-parallel weights split exactly; the per-row scales of row-parallel weights belong to
their shard, so splitting keeps each source shard's scales (the dequantized weights, and so
the outputs, are unchanged), while merging is refused (it would mean re-quantizing).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tqdm import tqdm

import kernels
from model.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    check_reshard,
    expected_shapes,
    holds_checkpoint,
    inspect_checkpoint,
    iter_rank_tensors,
    write_metadata,
    write_shard,
)
from model.config import CONFIG_FILE

TOKENIZER_FILE = "ice_text.model"
from model.quantization import SCALE_SUFFIX, QuantSpec, is_quantized_weight


def convert_checkpoint(
    input_dir: str | Path, output_dir: str | Path, target_tp: int, progress: bool = True,
    quant: QuantSpec | None = None,
) -> CheckpointInfo:
    """Write ``input_dir`` resharded to ``target_tp`` partitions (and quantized with
    ``quant``) into ``output_dir``."""
    info = inspect_checkpoint(input_dir)
    output_dir = Path(output_dir)
    if output_dir.resolve() == info.directory.resolve():
        raise CheckpointError(f"{output_dir}: output folder is the input folder")
    if holds_checkpoint(output_dir):
        raise CheckpointError(f"{output_dir} already holds a checkpoint; refusing to overwrite")
    if info.quant is not None and quant is not None and quant != info.quant:
        raise CheckpointError(
            f"{info.directory} is already quantized as {info.quant.name}; re-quantizing it as "
            f"{quant.name} would compound the error: convert the 16-bit checkpoint instead")
    if info.quant is not None:
        quant = None                      # already in the quantized layout: reshard only
    keys = expected_shapes(info.config, target_tp, info.quant)  # CheckpointError if invalid
    check_reshard(info, target_tp)
    if quant is not None:
        for key, shape in keys.items():
            if is_quantized_weight(key):
                try:
                    quant.check_shard(key, shape[1])
                except ValueError as exc:
                    raise CheckpointError(str(exc)) from None
    output_dir.mkdir(parents=True, exist_ok=True)
    what = f"TP {info.num_partitions}->{target_tp}" + (f", {quant.name}" if quant else "")
    bar = tqdm(total=len(keys) * target_tp, unit="tensor", desc=what, file=sys.stderr,
               disable=not progress)
    with bar:
        for rank in range(target_tp):
            bar.set_postfix_str(f"rank {rank}")
            state = {}
            for key, tensor in iter_rank_tensors(info, target_tp, rank):
                if quant is not None and is_quantized_weight(key):
                    qw = kernels.quantize(tensor, quant.bits, quant.group_size)
                    state[key], state[key + SCALE_SUFFIX] = qw.values, qw.scale
                else:
                    state[key] = tensor
                bar.update()
            write_shard(output_dir, info.iteration, rank, state)
            del state  # one output shard in memory at a time

    for name in (CONFIG_FILE, TOKENIZER_FILE):     # the tokenizer travels with a demo checkpoint
        if (info.directory / name).exists():
            shutil.copyfile(info.directory / name, output_dir / name)
    write_metadata(output_dir, info.iteration, info.config)
    return inspect_checkpoint(output_dir)
