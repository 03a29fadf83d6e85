"""Model hyper-parameters: one frozen dataclass, presets found by name, and the
checkpoint's ``config.json`` (official hyper-parameter names in snake_case)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Ids fixed by the official icetk GLM-130B tokenizer (docs/model.md "Special tokens").
MASK_ID = 150000
GMASK_ID = 150001
SMASK_ID = 150002
EOD_ID = 150003
SOP_ID = 150004
EOP_ID = 150005
EOS_ID = 20002
MASK_IDS = (MASK_ID, SMASK_ID, GMASK_ID)
END_IDS = (EOP_ID, EOS_ID)

CONFIG_FILE = "config.json"
_JSON_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "inner_hidden_size",
    "vocab_size",
    "max_sequence_length",
)


@dataclass(frozen=True)
class GLMConfig:
    """Shape of a GLM network. Names follow the official command-line flags."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    inner_hidden_size: int
    vocab_size: int
    max_sequence_length: int
    layernorm_epsilon: float = 1e-5
    rotary_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in _JSON_KEYS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"config: head dim {self.head_dim} must be even for rotary embedding")
        if self.vocab_size <= EOP_ID:
            raise ValueError(
                f"config: vocab_size {self.vocab_size} must cover the special ids up to eop ({EOP_ID})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def alpha(self) -> float:
        """DeepNorm residual scale, sqrt(2 * num_layers) (docs/model.md "DeepNorm")."""
        return math.sqrt(2 * self.num_layers)

    def check_tp(self, tp: int) -> None:
        """Raise ValueError naming the dimension that ``tp`` does not divide."""
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor-parallel size must be a positive integer, got {tp!r}")
        for what, n in (
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("inner_hidden_size", self.inner_hidden_size),
        ):
            if n % tp:
                raise ValueError(f"tensor-parallel size {tp} does not divide {what} ({n})")

    def to_json_dict(self) -> dict:
        return {name: getattr(self, name) for name in _JSON_KEYS}

    @classmethod
    def from_json_dict(cls, data: dict, source: str = "config") -> "GLMConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object")
        missing = [k for k in _JSON_KEYS if k not in data]
        if missing:
            raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_name(cls, name: str) -> "GLMConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}"
            ) from None

    @classmethod
    def for_checkpoint(cls, directory: str | Path) -> "GLMConfig":
        """The config beside ``latest`` in a checkpoint folder, or the glm-130b preset."""
        path = Path(directory) / CONFIG_FILE
        if not path.exists():
            return PRESETS["glm-130b"]
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_json_dict(data, source=str(path))

    def write_json(self, directory: str | Path) -> None:
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    def describe(self) -> dict:
        return asdict(self)


PRESETS: dict[str, GLMConfig] = {
    # Official GLM-130B (docs/model.md, the 130B configuration).
    "glm-130b": GLMConfig(70, 12288, 96, 32768, 150528, 2048),
    # Same architecture, small enough for a laptop CPU. Inner sizes are ~8/3 h and
    # divisible by 8 so TP 1/2/4/8 all work; the vocabulary keeps the official id
    # layout (specials at 150000..150007), padded to a multiple of 128.
    "glm-small": GLMConfig(4, 256, 8, 688, 150528, 2048),
    "glm-tiny": GLMConfig(2, 64, 4, 176, 150528, 512),
}


# Where a model's weights come from: ``auto`` = its checkpoint; ``dummy`` = random weights
# drawn in memory for a preset (``model.dummy``), as vLLM's ``--load-format dummy``.
LOAD_FORMATS = ("auto", "dummy")
DEFAULT_DUMMY_PRESET = "glm-small"   # the demo's shape


def dummy_config(preset: str | None, num_layers: int | None = None) -> GLMConfig:
    """The shape of a dummy model: ``preset`` (default glm-small) with ``num_layers`` of its
    layers (default all); ValueError naming the flag for an unknown preset or a bad count."""
    name = preset or DEFAULT_DUMMY_PRESET
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: unknown model preset; known: {', '.join(sorted(PRESETS))}")
    config = PRESETS[name]
    if num_layers is None:
        return config
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= config.num_layers:
        raise ValueError(f"--num-layers {num_layers!r}: {name} has {config.num_layers} layers; "
                         f"choose 1 to {config.num_layers}")
    return dataclasses.replace(config, num_layers=num_layers)


def check_model_source(load_format: str, checkpoint: str | None, preset: str | None,
                       num_layers: int | None) -> None:
    """ValueError naming the flags of a contradictory model source: dummy weights with a
    checkpoint, a preset or layer count without dummy weights, an unknown preset or format."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"--load-format {load_format!r}: choose from {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        if checkpoint:
            raise ValueError(f"--load-format dummy draws random weights for --preset; it reads no "
                             f"checkpoint, drop --checkpoint {checkpoint}")
        dummy_config(preset, num_layers)
    elif preset is not None or num_layers is not None:
        given = " and ".join(f for f, v in (("--preset", preset), ("--num-layers", num_layers)) if v is not None)
        raise ValueError(f"{given} only apply to --load-format dummy: add it, or drop {given}")
