"""``GatewayOptions``: the settings of ``glm gateway``, declared once (flags, ``GLM_``
variables, validation, argv; see ``services.common.options``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from services.common.options import Options, non_negative_int, option, positive_int
from services.gateway.auth import read_keys_file
from services.gateway.catalog import Limits, parse_model_arg

MAX_PORT = 65535
MAX_CONCURRENT_CALLS = 256   # the default: Redis connections 256 + a few, well under its maxclients


def _model_text(model: tuple[str, str]) -> str:
    return f"{model[0]}={model[1]}"


@dataclass(frozen=True, kw_only=True)
class GatewayOptions(Options):
    """``glm gateway``: the public API over the Redis queue. ``--api-keys-file`` is read by
    ``from_args`` into ``api_keys``."""

    models: tuple[tuple[str, str], ...] = option(
        name="--model", repeat=True, parse=parse_model_arg, render=_model_text, metavar="NAME=CHECKPOINT_DIR",
        env="GLM_GATEWAY_MODEL",
        help="a model to serve (repeatable; the first is the default; only the checkpoint's config.json "
             "and ice_text.model are read)")
    tokenizer: str | None = option(None, help="ice_text.model (default: the one beside the checkpoint; "
                                              "for every model)")
    host: str = option("0.0.0.0", help="the gateway's listen address")
    port: int = option(50051, type=non_negative_int, help="the gateway's port (0 = any free port)")
    redis_url: str = option("redis://127.0.0.1:6379/0", help="Redis URL of the queue")
    redis_timeout_s: float = option(2.0, type=float,
                                    help="Redis connect/read timeout; past it calls fail with UNAVAILABLE")
    max_queue_depth: int = option(1024, type=positive_int,
                                  help="requests waiting per model (XLEN of its queue) before RESOURCE_EXHAUSTED")
    max_concurrent_calls: int = option(
        MAX_CONCURRENT_CALLS, type=positive_int,
        help="Generate/GenerateStream calls served at once; one more gets RESOURCE_EXHAUSTED at once "
             "(the gateway's Redis pool is sized from it)")
    max_new_tokens_limit: int = option(2048, type=positive_int, help="max_new_tokens a request may ask for")
    default_max_new_tokens: int = option(128, type=positive_int,
                                         help="max_new_tokens per blank when a request does not say")
    max_stop_sequences: int = option(8, type=non_negative_int, help="stop texts of one request")
    max_stop_chars: int = option(256, type=positive_int, help="length of one stop text")
    api_keys: tuple[str, ...] = option((), name="--api-key", repeat=True, metavar="KEY",
                                       help="require 'authorization: Bearer KEY' (repeatable; health and "
                                            "reflection stay open)")
    http_port: int | None = option(None, type=non_negative_int,
                                   help="the OpenAI-compatible HTTP API (/v1/completions, /v1/models, /health) "
                                        "on --host at this port (0 = any free port; default: off)")
    tls_cert: str | None = option(None, help="PEM certificate chain (with --tls-key: serve TLS, gRPC and HTTP)")
    tls_key: str | None = option(None, help="PEM private key")
    grace_period_s: float = option(30.0, type=float, help="on SIGTERM, how long in-flight calls may run on")
    otlp_endpoint: str | None = option(None, help="export traces over OTLP/gRPC to host:port (default: none; "
                                                  "under glm serve: every process)")
    metrics_port: int = option(0, type=non_negative_int,
                               help="serve this process's Prometheus metrics (text format) on this port; 0 = off")
    metrics_host: str = option("127.0.0.1", help="address of the metrics endpoint(s) (default: loopback "
                                                   "only; 0.0.0.0 where Prometheus scrapes)")
    health_interval_s: float = 1.0        # the Redis ping behind the health status

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("--model NAME=CHECKPOINT_DIR is required")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        for name in ("redis_timeout_s", "grace_period_s", "health_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"--default-max-new-tokens {self.default_max_new_tokens} exceeds "
                             f"--max-new-tokens-limit {self.max_new_tokens_limit}")
        for name in ("port", "metrics_port", "http_port"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= MAX_PORT:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: not a port (0-{MAX_PORT})")

    @property
    def limits(self) -> Limits:
        """The per-request limits every model is served with."""
        return Limits(max_new_tokens_limit=self.max_new_tokens_limit,
                      default_max_new_tokens=self.default_max_new_tokens,
                      max_stop_sequences=self.max_stop_sequences, max_stop_chars=self.max_stop_chars)

    @classmethod
    def add_flags(cls, parser) -> None:
        super().add_flags(parser)
        parser.add_argument("--api-keys-file", help="file with one API key per line (added to --api-key)")

    @classmethod
    def from_args(cls, args, **settings) -> "GatewayOptions":
        options = super().from_args(args, **settings)
        if getattr(args, "api_keys_file", None):
            options = dataclasses.replace(options, api_keys=options.api_keys + tuple(read_keys_file(args.api_keys_file)))
        return options

    def argv(self) -> list[str]:
        """``glm`` arguments: ``["gateway", ...]``, every setting a flag."""
        return ["gateway", *self.to_argv()]
