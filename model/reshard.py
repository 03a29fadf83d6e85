"""Tensor-parallel slicing rules of the official GLM-130B checkpoint (``docs/model.md``
"Checkpoint layout", "GeGLU").

Every key is either replicated (each rank holds the whole tensor) or partitioned along one
dim in ``groups`` groups. The *logical* global tensor of a partitioned key is, for each group,
the concatenation over ranks of that rank's chunk of the group; rank ``r`` of ``tp`` holds,
within every group, the logical range ``[r*n_g/tp, (r+1)*n_g/tp)``. ``groups`` is 2 for the
GeGLU ``dense_h_to_4h`` weight/bias (each shard is ``[x1 of its units; x2 of its units]``) and
1 otherwise, which makes this rule identical to the official ``convert_tp.py`` merge/split.

A resharding from ``P`` source partitions to ``T`` target partitions is therefore a list of
``Piece``s per target rank: contiguous runs copied from one source shard to one offset of the
target shard, along the split dim. Nothing here touches files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from model.config import GLMConfig
from model.quantization import (
    QUANTIZED_SUFFIXES, ROW_PARALLEL_SUFFIXES, SCALE_SUFFIX, QuantSpec, is_scale, layer_suffix,
)


@dataclass(frozen=True)
class Split:
    """A partitioned key: split along ``dim``, in ``groups`` independently split groups.

    ``per_shard`` marks the per-row scales of a pre-quantized row-parallel weight: each
    rank's tensor belongs to its shard (computed from that shard's input slice) and has no
    dim to split or merge along. A target rank may take it whole from its single source
    rank (splitting keeps the dequantized weights exact); merging would need re-quantizing.
    """

    dim: int
    groups: int = 1
    per_shard: bool = False


PER_SHARD = Split(0, per_shard=True)


# Per-layer key suffixes (after ``transformer.layers.{i}.``); None = replicated.
LAYER_KEYS: dict[str, Split | None] = {
    "input_layernorm.weight": None,
    "input_layernorm.bias": None,
    "attention.query_key_value.weight": Split(0),
    "attention.query_key_value.bias": Split(0),
    "attention.dense.weight": Split(1),
    "attention.dense.bias": None,
    "post_attention_layernorm.weight": None,
    "post_attention_layernorm.bias": None,
    "mlp.dense_h_to_4h.weight": Split(0, groups=2),
    "mlp.dense_h_to_4h.bias": Split(0, groups=2),
    "mlp.dense_4h_to_h.weight": Split(1),
    "mlp.dense_4h_to_h.bias": None,
}
TOP_KEYS: dict[str, Split | None] = {
    "transformer.word_embeddings.weight": Split(0),
    "transformer.final_layernorm.weight": None,
    "transformer.final_layernorm.bias": None,
}
# May be present in official shards (replicated); never loaded, RoPE is recomputed.
OPTIONAL_LAYER_KEY = "attention.rotary_emb.inv_freq"

_LAYER_RE = re.compile(r"transformer\.layers\.(\d+)\.(.+)")


def is_optional_key(key: str, num_layers: int) -> bool:
    """True for the ignorable ``rotary_emb.inv_freq`` buffers of existing layers."""
    match = _LAYER_RE.fullmatch(key)
    return bool(match) and match[2] == OPTIONAL_LAYER_KEY and int(match[1]) < num_layers


def split_of(key: str, quant: QuantSpec | None = None) -> Split | None:
    """The split of a checkpoint key (None = replicated); KeyError for an unknown key.
    ``quant`` describes the scales of a pre-quantized checkpoint."""
    if quant is not None and is_scale(key):
        weight = layer_suffix(key[: -len(SCALE_SUFFIX)])
        if weight not in ROW_PARALLEL_SUFFIXES:
            return LAYER_KEYS[weight]            # per-row scales follow the output rows
        return Split(1) if quant.group_size else PER_SHARD
    if key in TOP_KEYS:
        return TOP_KEYS[key]
    match = _LAYER_RE.fullmatch(key)
    if match and match[2] in LAYER_KEYS:
        return LAYER_KEYS[match[2]]
    if match and match[2] == OPTIONAL_LAYER_KEY:
        return None
    raise KeyError(key)


def global_shapes(config: GLMConfig, quant: QuantSpec | None = None) -> dict[str, tuple[int, ...]]:
    """Logical (TP=1) shape of every required key, in a fixed order. With ``quant``, the
    four linears hold packed int8 values followed by their ``_scale`` keys (per-row scales
    of row-parallel weights are per shard: their "global" shape is the local one)."""
    h, inner = config.hidden_size, config.inner_hidden_size
    layer = {
        "input_layernorm.weight": (h,),
        "input_layernorm.bias": (h,),
        "attention.query_key_value.weight": (3 * h, h),
        "attention.query_key_value.bias": (3 * h,),
        "attention.dense.weight": (h, h),
        "attention.dense.bias": (h,),
        "post_attention_layernorm.weight": (h,),
        "post_attention_layernorm.bias": (h,),
        "mlp.dense_h_to_4h.weight": (2 * inner, h),
        "mlp.dense_h_to_4h.bias": (2 * inner,),
        "mlp.dense_4h_to_h.weight": (h, inner),
        "mlp.dense_4h_to_h.bias": (h,),
    }
    if quant is not None:
        for name in QUANTIZED_SUFFIXES:
            out, in_ = layer[name]
            layer[name] = (out, quant.packed_columns(in_))
            layer[name + SCALE_SUFFIX] = quant.scale_shape(out, in_)
    shapes = {"transformer.word_embeddings.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        shapes.update({f"transformer.layers.{i}.{name}": s for name, s in layer.items()})
    shapes["transformer.final_layernorm.weight"] = (h,)
    shapes["transformer.final_layernorm.bias"] = (h,)
    return shapes


def local_shape(shape: tuple[int, ...], split: Split | None, tp: int) -> tuple[int, ...]:
    if split is None or split.per_shard:
        return tuple(shape)
    out = list(shape)
    out[split.dim] //= tp
    return tuple(out)


@dataclass(frozen=True)
class Piece:
    """Copy ``length`` rows (along the split dim) from source shard ``source`` at
    ``src_start`` to the target shard at ``dst_start``."""

    source: int
    src_start: int
    dst_start: int
    length: int


def plan(length: int, split: Split, sources: int, targets: int, rank: int) -> list[Piece]:
    """Pieces that build target ``rank`` of ``targets`` from ``sources`` shards of a key whose
    global length along ``split.dim`` is ``length``."""
    n_g = length // split.groups
    if length % split.groups or n_g % sources or n_g % targets:
        raise ValueError(
            f"length {length} in {split.groups} group(s) is not divisible by "
            f"{sources} source and {targets} target partitions"
        )
    src, dst = n_g // sources, n_g // targets
    pieces = []
    for g in range(split.groups):
        lo, hi = rank * dst, (rank + 1) * dst  # logical range within group g
        for s in range(lo // src, (hi - 1) // src + 1):
            a, b = max(lo, s * src), min(hi, (s + 1) * src)
            pieces.append(Piece(s, g * src + a - s * src, g * dst + a - lo, b - a))
    return pieces


def source_ranks(sources: int, targets: int, rank: int) -> list[int]:
    """Source shards that target ``rank`` reads (the same for every partitioned key)."""
    return sorted({p.source for p in plan(sources * targets, Split(0), sources, targets, rank)})


def copy_pieces(
    dest: torch.Tensor, shards: Mapping[int, torch.Tensor], split: Split | None, pieces: list[Piece]
) -> None:
    """Fill ``dest`` from source shard tensors, slice by slice (``copy_`` converts dtype and
    device; no merged temporary is ever built)."""
    if split is None or split.per_shard:  # replicated, or the single source's own
        dest.copy_(shards[min(shards)])
        return
    for p in pieces:
        src = shards[p.source].narrow(split.dim, p.src_start, p.length)
        dest.narrow(split.dim, p.dst_start, p.length).copy_(src)


def reshard_tensor(shards: Sequence[torch.Tensor], key: str, tp: int) -> list[torch.Tensor]:
    """The ``tp`` target shards of ``key`` built from its source shards (in memory)."""
    split = split_of(key)
    if split is None:  # from the first source a target reads, as convert_tp.py does
        return [shards[source_ranks(len(shards), tp, r)[0]].clone() for r in range(tp)]
    length = shards[0].shape[split.dim] * len(shards)
    shape = local_shape(tuple(shards[0].shape), Split(split.dim), 1)
    out = []
    for rank in range(tp):
        target = list(shape)
        target[split.dim] = length // tp
        dest = torch.empty(target, dtype=shards[0].dtype)
        pieces = plan(length, split, len(shards), tp, rank)
        copy_pieces(dest, dict(enumerate(shards)), split, pieces)
        out.append(dest)
    return out


def reshard_state(shards: Sequence[Mapping[str, torch.Tensor]], tp: int) -> list[dict]:
    """Reshard whole in-memory state dicts (all keys must be known; used for small models)."""
    out: list[dict] = [{} for _ in range(tp)]
    for key in shards[0]:
        for rank, tensor in enumerate(reshard_tensor([sd[key] for sd in shards], key, tp)):
            out[rank][key] = tensor
    return out
