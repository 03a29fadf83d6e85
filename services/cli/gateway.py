"""``glm gateway``: serve the public API until SIGTERM (then drain in-flight calls)."""

from __future__ import annotations

import asyncio
import logging

from services.cli.main import repeated
from services.gateway.auth import read_keys_file
from services.gateway.catalog import Limits, parse_model_arg
from services.gateway.server import GatewayOptions, serve


def options_from_args(args) -> GatewayOptions:
    models = tuple(parse_model_arg(text) for text in repeated(args.model))
    if not models:
        raise ValueError("--model NAME=CHECKPOINT_DIR is required")
    keys = repeated(args.api_key)
    if args.api_keys_file:
        keys += read_keys_file(args.api_keys_file)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    for flag in ("redis_timeout_s", "grace_period_s"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0")
    if args.default_max_new_tokens > args.max_new_tokens_limit:
        raise ValueError(f"--default-max-new-tokens {args.default_max_new_tokens} exceeds "
                         f"--max-new-tokens-limit {args.max_new_tokens_limit}")
    limits = Limits(max_new_tokens_limit=args.max_new_tokens_limit,
                    default_max_new_tokens=args.default_max_new_tokens,
                    max_stop_sequences=args.max_stop_sequences, max_stop_chars=args.max_stop_chars)
    return GatewayOptions(
        models=models, host=args.host, port=args.port, redis_url=args.redis_url,
        tokenizer=args.tokenizer, limits=limits, max_queue_depth=args.max_queue_depth,
        api_keys=tuple(keys), tls_cert=args.tls_cert, tls_key=args.tls_key,
        grace_period_s=args.grace_period_s, redis_timeout_s=args.redis_timeout_s,
        otlp_endpoint=args.otlp_endpoint, metrics_port=args.metrics_port, metrics_host=args.metrics_host)


def run(args) -> int:
    options = options_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    asyncio.run(serve(options, ready=lambda port: print(f"glm gateway: listening on port {port}",
                                                        flush=True)))
    return 0
