"""Random checkpoints in the official layout, for tests and demos.

The global (TP=1) tensors are drawn deterministically from ``seed`` in a fixed key order and
then split with ``model.reshard``, so ``init_tiny(tp=1)`` resharded to 2 equals
``init_tiny(tp=2)`` bit for bit.

The initialisation is chosen so that bugs change the output and greedy decoding is stable:

* LayerNorm weights ~ 1 + N(0, 0.1²); every bias ~ N(0, 0.02²) (nonzero, so a dropped bias or
  a bias added on every rank shows up);
* linear weights ~ N(0, (2/√fan_in)²), not the training-time 0.02: with small weights the
  attention and MLP branches vanish next to the DeepNorm residual (α·x), the tied head then
  returns the input token every step, and a broken mask or rotary barely moves the logits;
  at this scale each branch outweighs the residual and greedy decoding wanders;
* word embedding ~ N(0, (4/√h)²): the LM head is tied and applied after the final LayerNorm
  (unit-scale rows), so the next-token logits have a std of about 4 units, peaked enough that
  greedy tokens do not hinge on near-ties. Rows of ids the demo tokenizer cannot show as text
  (image ids, unused text ids, vocabulary padding) are scaled down 4x so that the demo model
  mostly writes (random) words.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import reshard
from model.checkpoint import CheckpointInfo, save_checkpoint
from model.config import EOP_ID, EOS_ID, MASK_ID, GLMConfig
from model.tokenizer import NUM_IMAGE_TOKENS, demo_tokenizer

TOKENIZER_FILE = "ice_text.model"
EMBEDDING_SCALE = 4.0
BRANCH_GAIN = 2.0
QUIET_ROW_SCALE = 0.25


def _draw(key: str, shape: tuple[int, ...], config: GLMConfig, gen: torch.Generator):
    """One global fp32 tensor for ``key``."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key == "transformer.word_embeddings.weight":
        return noise * (EMBEDDING_SCALE / config.hidden_size**0.5)
    if "layernorm" in key and key.endswith(".weight"):
        return 1.0 + 0.1 * noise
    if key.endswith(".bias"):
        return 0.02 * noise
    return noise * (BRANCH_GAIN / shape[1] ** 0.5)  # linear weight [out, in]


def random_state(config: GLMConfig, seed: int = 0, text_ids: range | None = None) -> dict[str, torch.Tensor]:
    """Global (TP=1) fp32 state dict, deterministic in ``seed``. With ``text_ids``, the
    embedding rows of every other id except the specials are scaled down."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        key: _draw(key, shape, config, gen)
        for key, shape in reshard.global_shapes(config).items()
    }
    if text_ids is not None:
        quiet = torch.ones(config.vocab_size, dtype=torch.bool)
        quiet[text_ids.start: text_ids.stop] = False
        quiet[MASK_ID: EOP_ID + 1] = False
        quiet[EOS_ID] = False
        state["transformer.word_embeddings.weight"][quiet] *= QUIET_ROW_SCALE
    return state


def _text_ids() -> range:
    tokenizer = demo_tokenizer()
    return range(NUM_IMAGE_TOKENS, NUM_IMAGE_TOKENS + tokenizer.num_text_tokens)


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
    state = random_state(config, seed, _text_ids())
    state = {key: value.to(dtype) for key, value in state.items()}
    shards = reshard.reshard_state([state], tp)
    del state
    info = save_checkpoint(directory, iteration, shards, config)
    config.write_json(directory)  # even for glm-130b shapes: a tiny checkpoint is explicit
    demo_tokenizer().save(directory / TOKENIZER_FILE)
    return info
