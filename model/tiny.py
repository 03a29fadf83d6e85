"""Random checkpoints in the official layout, for tests and demos.

The global (TP=1) tensors are drawn deterministically from ``seed`` in a fixed key order and
then split with ``model.reshard``, so ``init_tiny(tp=1)`` resharded to 2 equals
``init_tiny(tp=2)`` bit for bit.

The initialisation is chosen so that bugs change the output and greedy decoding is stable:

* LayerNorm weights ~ 1 + N(0, 0.1²); every bias ~ N(0, 0.02²) (nonzero, so a dropped bias or
  a bias added on every rank shows up);
* linear weights ~ N(0, 1/fan_in), not the training-time 0.02: with 0.02 the attention and MLP
  branches are ~1% of the DeepNorm residual (α·x) and a broken mask or rotary barely moves the
  logits; at 1/fan_in each branch is about as large as the residual;
* word embedding ~ N(0, (4/√h)²): the LM head is tied and applied after the final LayerNorm
  (unit-scale rows), so the next-token logits have a std of about 4 units, peaked enough that
  greedy tokens do not hinge on near-ties.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import reshard
from model.checkpoint import CheckpointInfo, save_checkpoint
from model.config import GLMConfig

TOKENIZER_FILE = "ice_text.model"
EMBEDDING_SCALE = 4.0


def _draw(key: str, shape: tuple[int, ...], config: GLMConfig, gen: torch.Generator):
    """One global fp32 tensor for ``key``."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key == "transformer.word_embeddings.weight":
        return noise * (EMBEDDING_SCALE / config.hidden_size**0.5)
    if "layernorm" in key and key.endswith(".weight"):
        return 1.0 + 0.1 * noise
    if key.endswith(".bias"):
        return 0.02 * noise
    return noise / shape[1] ** 0.5  # linear weight [out, in]


def random_state(config: GLMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Global (TP=1) fp32 state dict, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key: _draw(key, shape, config, gen)
        for key, shape in reshard.global_shapes(config).items()
    }


def _write_tokenizer(directory: Path) -> None:
    try:
        from model.tokenizer import demo_tokenizer
    except ImportError:  # the tokenizer module is optional for checkpoint-only tests
        return
    demo_tokenizer().save(directory / TOKENIZER_FILE)


def init_tiny(
    directory: str | Path,
    preset: str | GLMConfig = "glm-tiny",
    tp: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    iteration: int = 1,
) -> CheckpointInfo:
    """Write a random ``tp``-way checkpoint (plus config.json and the demo tokenizer)."""
    config = preset if isinstance(preset, GLMConfig) else GLMConfig.from_name(preset)
    config.check_tp(tp)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.to(dtype) for key, value in random_state(config, seed).items()}
    shards = reshard.reshard_state([state], tp)
    del state
    info = save_checkpoint(directory, iteration, shards, config)
    config.write_json(directory)  # even for glm-130b shapes: a tiny checkpoint is explicit
    _write_tokenizer(directory)
    return info
