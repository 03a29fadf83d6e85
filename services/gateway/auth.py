"""Optional API keys: ``authorization: Bearer <key>`` metadata on every call.

Health checks and server reflection stay open (probes and tools carry no key).
Keys are compared in constant time.

Each key is a tenant (``tenant_of``): its requests live in their own namespace of
Redis keys (``services.common.redis_keys.namespaced``), so two tenants' request ids
never meet. Without keys, every caller is the one tenant ``anonymous``.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import grpc

from services.common.redis_keys import ANONYMOUS

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
TENANT_HEX = 16              # digits of the key's SHA-256 that name its tenant


def read_keys_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--api-keys-file {path}: {exc.strerror or exc}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-keys-file {path}: holds no key")
    return keys


def bearer_key(metadata) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def tenant_of(api_key: str | None) -> str:
    """The tenant of a caller: a stable digest of its API key that does not reveal it
    (the first ``TENANT_HEX`` hex digits of its SHA-256), or ``anonymous`` without one."""
    if not api_key:
        return ANONYMOUS
    return hashlib.sha256(api_key.encode()).hexdigest()[:TENANT_HEX]


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only says UNAUTHENTICATED."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.stream_unary_rpc_method_handler(unary, **kwargs)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection unless it carries one of the API keys
    (``authorization: Bearer KEY``, compared in constant time) with UNAUTHENTICATED."""

    def __init__(self, keys: list[str], on_denied=None) -> None:
        if not keys or any(not k for k in keys):
            raise ValueError("API keys must be non-empty")
        self._keys = [k.encode() for k in keys]
        self._on_denied = on_denied or (lambda method: None)   # e.g. count the refusal

    def authorized(self, metadata) -> bool:
        token = bearer_key(metadata)
        if token is None:
            return False
        given = token.encode()
        return any(hmac.compare_digest(given, key) for key in self._keys)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        if self.authorized(metadata):
            return handler
        reason = ("missing API key: send 'authorization: Bearer <key>' metadata"
                  if bearer_key(metadata) is None else "invalid API key")
        self._on_denied(handler_call_details.method)
        return _denied(handler, reason)
