"""The models a gateway serves: each one's shape (``config.json``) and tokenizer.

The gateway reads nothing else of a checkpoint: no weights, no torch. A model is
named on the command line as ``NAME=CHECKPOINT_DIR``; the first one named is the
default for a request with an empty ``model`` field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from model.config import GLMConfig
from model.tokenizer import GLMTokenizer
from services.common.errors import ServiceError
from services.proto_gen.glm.v1 import generation_pb2 as pb

TOKENIZER_FILE = "ice_text.model"   # beside the checkpoint, as the official layout has it


class NotFound(ServiceError):
    """An unknown model name."""

    code = grpc.StatusCode.NOT_FOUND


@dataclass(frozen=True)
class Limits:
    """Per-request limits the gateway enforces (the same for every model)."""

    max_new_tokens_limit: int = 2048
    default_max_new_tokens: int = 128
    max_stop_sequences: int = 8
    max_stop_chars: int = 256
    max_top_logprobs: int = 5
    max_n: int = 16                 # samples of one request (GenerateRequest.n)
    max_beams: int = 16             # beams of one beam search (the official LAMBADA protocol uses 16)


@dataclass(frozen=True)
class ServedModel:
    """A model the gateway serves: its name, config, tokenizer and request limits (no weights)."""

    name: str
    config: GLMConfig
    tokenizer: GLMTokenizer
    limits: Limits

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.config.max_sequence_length

    def spec(self) -> pb.ModelSpec:
        return pb.ModelSpec(
            name=self.name,
            max_sequence_length=self.max_sequence_length,
            vocab_size=self.vocab_size,
            default_max_new_tokens=self.limits.default_max_new_tokens,
            max_new_tokens_limit=self.limits.max_new_tokens_limit,
            max_stop_sequences=self.limits.max_stop_sequences,
            max_n=self.limits.max_n,
            max_beams=self.limits.max_beams,
        )


def parse_model_arg(text: str) -> tuple[str, str]:
    """``NAME=CHECKPOINT_DIR`` -> (name, dir); raises ValueError naming ``--model``."""
    name, sep, directory = text.partition("=")
    name, directory = name.strip(), directory.strip()
    if not sep or not name or not directory:
        raise ValueError(f"--model {text!r}: expected NAME=CHECKPOINT_DIR")
    if any(c in name for c in "{}: \t"):
        raise ValueError(f"--model {text!r}: the name may not hold braces, colons or spaces")
    return name, directory


def load_model(name: str, directory: str | Path, limits: Limits,
               tokenizer: str | Path | None = None) -> ServedModel:
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ValueError(f"--model {name}={directory}: not a directory")
    config = GLMConfig.for_checkpoint(directory)
    tok_path = Path(tokenizer).expanduser() if tokenizer else directory / TOKENIZER_FILE
    return ServedModel(name, config, GLMTokenizer.from_file(tok_path), limits)


class Catalog:
    """Models by name; the first is the default."""

    def __init__(self, models: list[ServedModel]) -> None:
        if not models:
            raise ValueError("the gateway needs at least one --model NAME=CHECKPOINT_DIR")
        self._models: dict[str, ServedModel] = {}
        for served in models:
            if served.name in self._models:
                raise ValueError(f"--model {served.name}: named twice")
            self._models[served.name] = served
        self.default = models[0].name

    def get(self, name: str) -> ServedModel:
        served = self._models.get(name or self.default)
        if served is None:
            raise NotFound(f"model {name!r} is not served here; known: {', '.join(self._models)}")
        return served

    def __iter__(self):
        return iter(self._models.values())
