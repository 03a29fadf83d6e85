"""Reading and writing checkpoints in the official GLM-130B layout (``docs/model.md``
"Checkpoint layout").

    DIR/latest                                   text: the iteration, e.g. ``49300``
    DIR/<iteration>/mp_rank_XX_model_states.pt   torch.save({"module": state_dict})
    DIR/config.json                              optional; absent means the glm-130b preset

A rank loads its own shard for any runtime TP size ``tp``, whatever the number of partitions
``P`` on disk (resharding on the fly with the rules of ``model.reshard``). Source files are
memory-mapped (``torch.load(mmap=True)``) and every needed slice is copied straight into the
preallocated destination tensor, so a rank needs its own shard of host memory plus a constant,
never the whole checkpoint. Legacy (pre-zip, torch<1.6) files cannot be memory-mapped and are
refused with a message saying how to re-save them.

Every failure raises ``CheckpointError`` with one line naming the file, key or shape.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from model import reshard
from model.config import CONFIG_FILE, PRESETS, GLMConfig
from model.quantization import SCALE_SUFFIX, QuantSpec, is_quantized_weight, is_scale

LATEST_FILE = "latest"
_RANK_RE = re.compile(r"mp_rank_(\d{2})_model_states\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file/key/shape."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``inspect_checkpoint`` found in a checkpoint folder: its iteration, files, config
    and, for a pre-quantized one, the quantization scheme."""

    directory: Path
    iteration: int
    num_partitions: int
    files: tuple[Path, ...]
    config: GLMConfig
    quant: QuantSpec | None = None  # set for a pre-quantized checkpoint


def rank_file_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


def _check_tp(config: GLMConfig, tp: int, what: str) -> None:
    try:
        config.check_tp(tp)
    except ValueError as exc:
        raise CheckpointError(f"{what}: {exc}") from None


def inspect_checkpoint(directory: str | Path) -> CheckpointInfo:
    """Validate the layout (folder, ``latest``, rank files, config) without reading weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    latest = directory / LATEST_FILE
    if not latest.is_file():
        raise CheckpointError(f"{latest}: missing (expected a file holding the iteration)")
    text = latest.read_text(errors="replace").strip()
    if not text.isdigit():
        raise CheckpointError(f"{latest}: expected an iteration number, got {text[:40]!r}")
    folder = directory / text
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: iteration folder named by {latest} does not exist")
    ranks = sorted(int(m[1]) for p in folder.iterdir() if (m := _RANK_RE.fullmatch(p.name)))
    if not ranks:
        raise CheckpointError(f"{folder}: no mp_rank_XX_model_states.pt files")
    missing = sorted(set(range(ranks[-1] + 1)) - set(ranks))
    if missing:
        raise CheckpointError(
            f"{folder}: {rank_file_name(missing[0])} is missing "
            f"(found ranks {ranks}, expected 0..{ranks[-1]})"
        )
    try:
        config = GLMConfig.for_checkpoint(directory)
    except ValueError as exc:
        raise CheckpointError(f"bad {CONFIG_FILE}: {exc}") from None
    _check_tp(config, len(ranks), f"{folder} has {len(ranks)} partitions")
    files = tuple(folder / rank_file_name(r) for r in ranks)
    quant = detect_quantization(files[0], config, len(ranks))
    return CheckpointInfo(directory, int(text), len(ranks), files, config, quant)


def detect_quantization(path: Path, config: GLMConfig, tp: int) -> QuantSpec | None:
    """The layout of a pre-quantized rank file (``<key>_scale`` keys), from its shapes."""
    module = open_shard(path)
    key = "transformer.layers.0.attention.query_key_value.weight"
    if key + SCALE_SUFFIX not in module:
        return None
    weight, scale = module.get(key), module[key + SCALE_SUFFIX]
    h = config.hidden_size
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
        raise CheckpointError(f"{path}: {key} has a scale but is not a 2-D int8 tensor")
    bits = {h: 8, h // 2: 4}.get(weight.shape[1])
    if bits is None:
        raise CheckpointError(f"{path}: {key} has {weight.shape[1]} columns, neither INT8 ({h}) nor INT4 ({h // 2})")
    group = None
    if scale.dim() == 2:
        if scale.shape[1] == 0 or h % scale.shape[1]:
            raise CheckpointError(f"{path}: {key}{SCALE_SUFFIX} has {scale.shape[1]} groups for {h} columns")
        group = h // scale.shape[1]
    try:
        return QuantSpec(bits, group)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def expected_shapes(config: GLMConfig, tp: int, quant: QuantSpec | None = None) -> dict[str, tuple[int, ...]]:
    """Local shape of every required key on each rank of a ``tp``-way checkpoint."""
    _check_tp(config, tp, "expected_shapes")
    return {
        key: reshard.local_shape(shape, reshard.split_of(key, quant), tp)
        for key, shape in reshard.global_shapes(config, quant).items()
    }


def check_reshard(info: CheckpointInfo, tp: int) -> None:
    """Refuse a TP change that a pre-quantized layout cannot express exactly."""
    if info.quant is None or info.quant.group_size is not None or tp % info.num_partitions == 0:
        return
    raise CheckpointError(
        f"{info.directory}: {info.quant.name} checkpoint with {info.num_partitions} partitions cannot be "
        f"loaded at tensor-parallel size {tp}: the per-row scales of attention.dense and mlp.dense_4h_to_h "
        f"belong to each {info.num_partitions}-way shard and merging them would mean re-quantizing; use a "
        f"multiple of {info.num_partitions}, or the 16-bit checkpoint with quantization at load"
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def open_shard(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map one rank file and return its ``module`` dict (tensors share the mapping)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({_first_line(exc)})") from None
    if magic[:2] != b"PK" and magic[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: legacy (non-zip) torch.save format cannot be memory-mapped; re-save it "
            f"with torch.save(torch.load(path), path) on a machine with enough RAM"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError…
        raise CheckpointError(f"{path}: truncated or corrupt ({_first_line(exc)})") from None
    if not isinstance(data, dict) or "module" not in data:
        raise CheckpointError(f"{path}: not a checkpoint shard (no 'module' entry)")
    module = data["module"]
    if not isinstance(module, dict):
        raise CheckpointError(f"{path}: 'module' is a {type(module).__name__}, not a state dict")
    return module


def validate_shard(path: Path, module: Mapping, config: GLMConfig, tp: int,
                   quant: QuantSpec | None = None) -> None:
    """Check a rank's keys and shapes against ``config`` at ``tp`` partitions."""
    expected = expected_shapes(config, tp, quant)
    name = path.name.removesuffix("_model_states.pt")
    for key in module:
        if key not in expected and not reshard.is_optional_key(key, config.num_layers):
            raise CheckpointError(f"{path}: unexpected key {key}")
    for key, shape in expected.items():
        if key not in module:
            raise CheckpointError(f"{path}: missing key {key}")
        value = module[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key} in {name}: a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"{key} in {name}: shape {list(value.shape)} but config expects {list(shape)}"
            )
        if quant is not None and is_quantized_weight(key) and value.dtype != torch.int8:
            raise CheckpointError(f"{key} in {name}: {value.dtype} but a quantized weight must be int8")
        if quant is not None and is_scale(key) and not value.is_floating_point():
            raise CheckpointError(f"{key} in {name}: {value.dtype} but a scale must be floating point")


def _open_sources(info: CheckpointInfo, tp: int, rank: int) -> dict[int, dict]:
    _check_tp(info.config, tp, f"runtime tensor-parallel size for {info.directory}")
    if not 0 <= rank < tp:
        raise CheckpointError(f"rank {rank} is out of range for tensor-parallel size {tp}")
    check_reshard(info, tp)
    sources = {}
    for s in reshard.source_ranks(info.num_partitions, tp, rank):
        module = open_shard(info.files[s])
        validate_shard(info.files[s], module, info.config, info.num_partitions, info.quant)
        sources[s] = module
    return sources


CopyHook = Callable[[str, torch.Tensor], None]


def _copy_keys(
    info: CheckpointInfo, tp: int, rank: int, sources: dict[int, dict], dest: Mapping,
    keys, on_copy: CopyHook | None = None,
) -> None:
    shapes = reshard.global_shapes(info.config, info.quant)
    for key in keys:
        split = reshard.split_of(key, info.quant)
        pieces = []
        if split is not None and not split.per_shard:
            pieces = reshard.plan(shapes[key][split.dim], split, info.num_partitions, tp, rank)
        with torch.no_grad():
            reshard.copy_pieces(dest[key], {s: m[key] for s, m in sources.items()}, split, pieces)
        if on_copy is not None:
            on_copy(key, dest[key])


def _copy_all(
    info: CheckpointInfo, tp: int, rank: int, sources: dict[int, dict], dest: Mapping,
    on_copy: CopyHook | None,
) -> None:
    _copy_keys(info, tp, rank, sources, dest, reshard.global_shapes(info.config, info.quant), on_copy)


def load_rank_into(
    info: CheckpointInfo,
    tp: int,
    rank: int,
    dest: Mapping[str, torch.Tensor],
    on_copy: CopyHook | None = None,
) -> None:
    """Fill ``dest`` (preallocated, any dtype/device) with rank ``rank`` of a ``tp``-way split.

    ``dest`` must hold exactly the checkpoint's keys (a ``rotary_emb.inv_freq`` buffer is
    allowed and left alone) at the shapes of ``expected_shapes(info.config, tp)``. All needed
    source files are opened and validated before anything is copied.
    """
    _check_tp(info.config, tp, f"runtime tensor-parallel size for {info.directory}")
    expected = expected_shapes(info.config, tp, info.quant)
    for key in dest:
        if key not in expected and not reshard.is_optional_key(key, info.config.num_layers):
            raise CheckpointError(f"destination key {key} is not in the checkpoint")
    for key, shape in expected.items():
        if key not in dest:
            raise CheckpointError(f"destination is missing key {key}")
        if tuple(dest[key].shape) != shape:
            raise CheckpointError(
                f"destination {key}: shape {list(dest[key].shape)} but tp={tp} "
                f"rank {rank} needs {list(shape)}"
            )
    sources = _open_sources(info, tp, rank)
    _copy_all(info, tp, rank, sources, dest, on_copy)


def read_rank_state(
    info: CheckpointInfo,
    tp: int,
    rank: int,
    dtype: torch.dtype | None = None,
    on_copy: CopyHook | None = None,
) -> dict[str, torch.Tensor]:
    """Allocate and fill rank ``rank``'s state dict for a ``tp``-way split (CPU tensors;
    ``dtype`` None keeps the checkpoint's dtype)."""
    sources = _open_sources(info, tp, rank)
    first = sources[min(sources)]
    dest = {
        key: torch.empty(shape, dtype=dtype or first[key].dtype)
        for key, shape in expected_shapes(info.config, tp, info.quant).items()
    }
    _copy_all(info, tp, rank, sources, dest, on_copy)
    return dest


def iter_rank_tensors(info: CheckpointInfo, tp: int, rank: int):
    """Yield ``(key, tensor)`` of rank ``rank``'s shard one key at a time, each freshly
    assembled in the checkpoint's dtype: peak extra memory is one tensor (used to quantize
    a 16-bit shard while loading it)."""
    sources = _open_sources(info, tp, rank)
    first = sources[min(sources)]
    for key, shape in expected_shapes(info.config, tp, info.quant).items():
        dest = {key: torch.empty(shape, dtype=first[key].dtype)}
        _copy_keys(info, tp, rank, sources, dest, [key])
        yield key, dest.pop(key)


# ---------------------------------------------------------------- writing


def holds_checkpoint(directory: str | Path) -> bool:
    """True when ``directory`` has a ``latest`` file or any rank file one level down."""
    directory = Path(directory)
    if (directory / LATEST_FILE).exists():
        return True
    return directory.is_dir() and any(directory.glob("*/mp_rank_*_model_states.pt"))


def write_shard(directory: str | Path, iteration: int, rank: int, state: Mapping) -> Path:
    """Write one rank file; tensors that view a larger storage are compacted first (torch.save
    would otherwise write the whole storage)."""
    folder = Path(directory) / str(iteration)
    folder.mkdir(parents=True, exist_ok=True)
    module = {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        if value.untyped_storage().nbytes() != value.nbytes:
            value = value.clone()
        module[key] = value
    path = folder / rank_file_name(rank)
    torch.save({"module": module}, path)
    return path


def write_metadata(directory: str | Path, iteration: int, config: GLMConfig) -> None:
    """Write ``config.json`` (unless glm-130b) and, last, ``latest`` (atomically)."""
    directory = Path(directory)
    if config != PRESETS["glm-130b"]:
        config.write_json(directory)
    tmp = directory / f".{LATEST_FILE}.tmp"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, directory / LATEST_FILE)


def save_checkpoint(
    directory: str | Path, iteration: int, shards: list[Mapping], config: GLMConfig
) -> CheckpointInfo:
    """Write a complete ``len(shards)``-way checkpoint into a folder holding none yet."""
    directory = Path(directory)
    if holds_checkpoint(directory):
        raise CheckpointError(f"{directory} already holds a checkpoint; refusing to overwrite")
    _check_tp(config, len(shards), "save_checkpoint")
    for rank, state in enumerate(shards):
        write_shard(directory, iteration, rank, state)
    write_metadata(directory, iteration, config)
    return inspect_checkpoint(directory)
