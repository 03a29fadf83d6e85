"""``ShardClient``: the same call to every rank of a pool, concurrently, with a deadline.

Every rank must run the same calls in the same order, so a call always goes to
all ranks. The reply is rank 0's (the only one carrying generations); if any
rank fails, the others' calls are cancelled and ``ShardCallError`` names the
rank, the method and the gRPC status — a dead or stuck rank turns into an error
within the deadline, never a hang. A refusal that names one request of the batch
carries its id in the trailing metadata (``REFUSED_REQUEST_METADATA``); the error
exposes it as ``refused_request_id``. The caller's trace context travels in the
metadata (W3C ``traceparent``).

A pool may require its shard token (``docs/architecture.md``, "Shard protocol"): every
call but ``Health`` then carries it as ``glm-shard-token`` metadata. ``glm pool`` writes
the token beside the ranks' sockets (``<socket_dir>/shard-token``, mode 0600), and a
client of unix-socket ranks reads it from there unless given one (``token=``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import grpc

from services.common.errors import REFUSED_REQUEST_METADATA
from services.common.tracing import metadata_from_context
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.proto_gen.glm.v1 import shard_pb2_grpc
from services.worker.options import TOKEN_FILE

MAX_MESSAGE = 256 * 1024 * 1024
TOKEN_METADATA = "glm-shard-token"


def read_token(path: str | Path) -> str:
    """The token in file ``path`` (surrounding whitespace dropped); ValueError when the
    file cannot be read or holds nothing."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"--shard-token-file {path}: {exc.strerror or exc}") from None
    if not token:
        raise ValueError(f"--shard-token-file {path}: holds no token")
    return token


def write_token(path: str | Path) -> str:
    """A new random token written to ``path``, readable by this user only (mode 0600)."""
    token = secrets.token_hex(32)
    path = Path(path)
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.replace(staged, path)
    return token


def token_beside(addresses: list[str]) -> str | None:
    """The token of unix-socket ranks that share one folder holding ``shard-token``."""
    if not addresses or not all(a.startswith("unix:") for a in addresses):
        return None
    folders = {os.path.dirname(a.removeprefix("unix://").removeprefix("unix:")) for a in addresses}
    if len(folders) != 1:
        return None
    path = Path(folders.pop(), TOKEN_FILE)
    return read_token(path) if path.exists() else None


class ShardCallError(RuntimeError):
    """A call to one rank failed: which rank, which method, the gRPC status and message.

    ``refused_request_id``: the shard request id (``Request.id``) the rank named as
    the one at fault (INVALID_ARGUMENT on one request of a batch), else None."""

    def __init__(self, rank: int, method: str, code: grpc.StatusCode, details: str, *,
                 refused_request_id: int | None = None) -> None:
        super().__init__(f"rank {rank} {method}: {code.name}: {details}")
        self.rank, self.method, self.code, self.details = rank, method, code, details
        self.refused_request_id = refused_request_id


def refused_request_id(trailing_metadata) -> int | None:
    """The request id a rank named in its trailing metadata (None: none, or not a number)."""
    for key, value in trailing_metadata or ():
        if key == REFUSED_REQUEST_METADATA:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return int(text) if text.isdecimal() else None
    return None


class ShardClient:
    """Async fan-out client over the ranks' addresses (``unix:///path`` or ``host:port``).
    ``token``: the pool's shard token (default: the one beside unix sockets, if any; ``""``:
    send none)."""

    def __init__(self, addresses: list[str], *, timeout_s: float = 60.0, token: str | None = None) -> None:
        if not addresses:
            raise ValueError("ShardClient needs at least one rank address")
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        token = token if token is not None else token_beside(self.addresses)
        self._token = ((TOKEN_METADATA, token),) if token else ()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]
        self._channels = [grpc.aio.insecure_channel(a, options=options) for a in self.addresses]
        self._stubs = [shard_pb2_grpc.ShardServiceStub(c) for c in self._channels]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def __aenter__(self) -> "ShardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _one(self, rank: int, method: str, request, timeout_s: float):
        try:
            return await getattr(self._stubs[rank], method)(
                request, timeout=timeout_s, metadata=(*metadata_from_context(), *self._token))
        except grpc.aio.AioRpcError as exc:
            raise ShardCallError(rank, method, exc.code(), exc.details() or "",
                                 refused_request_id=refused_request_id(exc.trailing_metadata())) from None

    async def call_all(self, method: str, request, timeout_s: float | None = None) -> list[Any]:
        """Every rank's reply, in rank order; the first failure cancels the rest and raises."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        tasks = [asyncio.ensure_future(self._one(r, method, request, timeout_s))
                 for r in range(len(self._stubs))]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t in done and t.exception() is not None]
            if failed:
                raise failed[0].exception()
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def call(self, method: str, request, timeout_s: float | None = None):
        return (await self.call_all(method, request, timeout_s))[0]

    # -- the protocol --------------------------------------------------------------------
    async def info(self) -> pb.InfoResponse:
        return await self.call("Info", pb.InfoRequest())

    async def health(self, timeout_s: float | None = None) -> list[pb.HealthResponse]:
        return await self.call_all("Health", pb.HealthRequest(), timeout_s)

    async def warmup(self, max_batch_size: int, max_input_tokens: int, max_total_tokens: int,
                     timeout_s: float | None = None) -> pb.WarmupResponse:
        req = pb.WarmupRequest(max_batch_size=max_batch_size, max_input_tokens=max_input_tokens,
                               max_total_tokens=max_total_tokens)
        return await self.call("Warmup", req, timeout_s)

    async def prefill(self, batch: pb.Batch, timeout_s: float | None = None) -> pb.PrefillResponse:
        return await self.call("Prefill", pb.PrefillRequest(batch=batch), timeout_s)

    async def decode(self, batches: list[pb.CachedBatch], timeout_s: float | None = None, *,
                     admit: pb.Batch | None = None, step: int = 0, ahead: bool = False) -> pb.DecodeResponse:
        """One step of ``batches`` (and, paged, the new requests of ``admit`` in the same forward);
        ``step`` numbers it, ``ahead`` sends it before the reply of step ``step - 1``."""
        req = pb.DecodeRequest(batches=batches, admit=admit, step=step, ahead=ahead)
        return await self.call("Decode", req, timeout_s)

    async def filter_batch(self, batch_id: int, keep_request_ids: list[int]) -> pb.FilterBatchResponse:
        req = pb.FilterBatchRequest(batch_id=batch_id, keep_request_ids=keep_request_ids)
        return await self.call("FilterBatch", req)

    async def clear_cache(self, batch_id: int | None = None) -> None:
        req = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(batch_id=batch_id)
        await self.call("ClearCache", req)
