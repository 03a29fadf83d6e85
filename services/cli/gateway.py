"""``glm gateway``: serve the public API until SIGTERM (then drain in-flight calls)."""

from __future__ import annotations

import asyncio
import logging

from services.gateway.options import GatewayOptions


def options_from_args(args) -> GatewayOptions:
    return GatewayOptions.from_args(args)


def run(args) -> int:
    from services.gateway.server import serve

    options = options_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    asyncio.run(serve(options, ready=lambda port: print(f"glm gateway: listening on port {port}",
                                                        flush=True)))
    return 0
