"""Weight-only quantization of a GLM shard: which weights, in what layout, and how a
16-bit shard is quantized while it loads.

Only the four linears of each layer are quantized (``docs/model.md`` "Quantization"); embedding,
LayerNorms and biases stay 16-bit. The layout is the official pre-quantized one:
``<key>`` holds int8 values (``[out, in]`` for INT8, two INT4 values per byte
``[out, in/2]``) and ``<key>_scale`` the fp16 scales (``[out]`` per row, the
official scheme; ``[out, in/group]`` for the optional group-wise scheme).
Quantization always happens *after* sharding, on the rank's own fp16 shard.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZED_SUFFIXES = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)
ROW_PARALLEL_SUFFIXES = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class QuantSpec:
    """INT8 or INT4 weights with per-row (``group_size`` None) or group-wise scales."""

    bits: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"quantization bit width must be 4 or 8, got {self.bits}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"quantization group size must be an even number >= 2, got {self.group_size}")

    @classmethod
    def parse(cls, name: str | None, group_size: int | None = None) -> "QuantSpec | None":
        """``None``/``none``/``fp16`` → no quantization; ``int8``/``int4``/``8``/``4`` → a spec."""
        if name is None or str(name).lower() in ("none", "fp16", "bf16", ""):
            if group_size is not None:
                raise ValueError("a quantization group size needs --quant int8 or int4")
            return None
        key = str(name).lower().removeprefix("int")
        if key not in ("8", "4"):
            raise ValueError(f"unknown quantization {name!r}; choose int8 or int4")
        return cls(int(key), group_size)

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")

    def packed_columns(self, in_features: int) -> int:
        return in_features if self.bits == 8 else in_features // 2

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        if self.group_size is None:
            return (out_features,)
        return (out_features, in_features // self.group_size)

    def check_shard(self, what: str, in_features: int) -> None:
        """Raise ValueError when a local input width cannot hold this layout."""
        if self.bits == 4 and in_features % 2:
            raise ValueError(f"{what}: INT4 packing needs an even input width, got {in_features}")
        if self.group_size is not None and in_features % self.group_size:
            raise ValueError(
                f"{what}: group size {self.group_size} does not divide the shard's input width {in_features}")


def layer_suffix(key: str) -> str:
    """``attention.dense.weight`` of ``transformer.layers.3.attention.dense.weight``."""
    parts = key.split(".", 3)
    return parts[3] if len(parts) == 4 and parts[:2] == ["transformer", "layers"] else key


def is_quantized_weight(key: str) -> bool:
    return key.startswith("transformer.layers.") and layer_suffix(key) in QUANTIZED_SUFFIXES


def is_scale(key: str) -> bool:
    return key.endswith(SCALE_SUFFIX) and is_quantized_weight(key[: -len(SCALE_SUFFIX)])
