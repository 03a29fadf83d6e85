"""The gRPC face of one rank: a ``grpc.aio`` server around a ``Shard``.

Model work runs on one dedicated thread, in arrival order, so the event loop
stays free (Health answers during a long forward) and the collectives of
consecutive calls never interleave. Errors map to gRPC status codes:
``InvalidArgument`` -> INVALID_ARGUMENT, ``ResourceExhausted`` (KV capacity,
out of memory) -> RESOURCE_EXHAUSTED, anything else inside a forward (e.g. a
peer rank died and the collective failed or timed out) -> INTERNAL, and a rank
of a tensor-parallel pool is then *broken* (its peers may be left inside a
collective): every later call, Health included, gets UNAVAILABLE with the
reason. The caller (scheduler) sees the pool fail loudly instead of hanging. A
single rank stays healthy (the failed call's batches are dropped, nothing else
is out of step). A row that fails on its own is no error at all: it leaves the
batch and the response's ``failed`` names it (``services.worker.shard``).

Exposure (``docs/architecture.md``, "Shard protocol"): the protocol is internal, for
the pool's own scheduler. A unix socket is created mode 0600 (only this user can
connect); a TCP ``--listen`` binds exactly the host given, and one that is not loopback
needs ``--shard-token-file``. With a token every call but ``Health`` must carry it
(``glm-shard-token`` metadata), else UNAUTHENTICATED: ``ClearCache`` or ``Decode`` from
a client that was not given the token changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from model.config import DEFAULT_DUMMY_PRESET
from services.common.errors import REFUSED_REQUEST_METADATA, InvalidArgument, ServiceError, Unavailable, one_line
from services.common.metrics import new_registry, serve_metrics
from services.common.tracing import context_from_metadata, setup_tracing
from services.proto_gen.glm.v1 import shard_pb2_grpc
from services.worker.client import TOKEN_METADATA, read_token
from services.worker.metrics import BROKEN, WorkerMetrics, failure_reason
from services.worker.options import WorkerOptions
from services.worker.shard import OutOfMemory, Shard, ahead_problem

log = logging.getLogger("glm.worker")
MAX_MESSAGE = 256 * 1024 * 1024


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    """The ``glm.v1.ShardService`` of one rank: runs every model call on one thread, in arrival
    order, maps service errors to gRPC codes, and marks the rank broken when a collective fails."""

    def __init__(self, shard: Shard, metrics: WorkerMetrics | None = None) -> None:
        self.shard = shard
        self.rank = shard.ctx.rank
        self.metrics = metrics or WorkerMetrics(new_registry(process_metrics=False), model=shard.model_name,
                                                rank=self.rank)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"shard-{self.rank}")
        self.broken: str | None = None
        self.handed_step = 0                        # the last numbered Decode handed to the model thread
        self._handed = asyncio.Event()              # set when it moves (for a Decode sent ahead)

    def _execute(self, method, request, parent, collective: bool):
        """On the model thread. Marks the rank broken here, not in the handler: a
        caller whose deadline passed has cancelled the handler, not the forward."""
        if self.broken is not None:   # broken while this call waited for the thread
            raise Unavailable(f"rank {self.rank} is broken: {self.broken}")
        try:
            return method(request, parent)
        except OutOfMemory as exc:
            if self.shard.ctx.distributed:
                self.broken = one_line(exc)  # the other ranks are left inside a collective
            raise
        except ServiceError:
            raise
        except Exception as exc:
            log.exception("rank %d: %s failed", self.rank, method.__name__)
            if collective and self.shard.ctx.distributed:
                self.broken = one_line(exc)
            raise

    async def _run(self, context: grpc.aio.ServicerContext, method, request, *, collective: bool):
        if self.broken is not None:
            self.metrics.failure(BROKEN)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rank {self.rank} is broken: {self.broken}")
        parent = context_from_metadata(context.invocation_metadata())
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, self._execute, method, request, parent, collective)
        except ServiceError as exc:
            code, message = exc.code, one_line(exc)
            reason = failure_reason(exc, collective=collective, out_of_memory=OutOfMemory)
            if isinstance(exc, InvalidArgument) and exc.request_id is not None:
                context.set_trailing_metadata(((REFUSED_REQUEST_METADATA, str(exc.request_id)),))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, never swallowed
            code, message = grpc.StatusCode.INTERNAL, f"rank {self.rank}: {one_line(exc)}"
            reason = failure_reason(exc, collective=collective, out_of_memory=OutOfMemory)
        self.metrics.failure(reason)
        await context.abort(code, message)

    async def Info(self, request, context):
        return self.shard.info()

    async def Health(self, request, context):
        if self.broken is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rank {self.rank} is broken: {self.broken}")
        return self.shard.health()

    async def Warmup(self, request, context):
        return await self._run(context, self.shard.warmup, request, collective=True)

    async def Prefill(self, request, context):
        reply = await self._run(context, self.shard.prefill, request, collective=True)
        self.metrics.prefill.observe(reply.forward_ns / 1e9)
        return reply

    async def Decode(self, request, context):
        if request.ahead:
            await self._turn_of(request, context)
        if request.step:
            self.handed_step = request.step         # handed to the model thread now, in this order
            self._handed.set()
        reply = await self._run(context, self.shard.decode, request, collective=True)
        if reply.forward_ns:                        # an ahead step with nothing left ran no forward
            self.metrics.decode.observe(reply.forward_ns / 1e9)
        return reply

    async def _turn_of(self, request, context: grpc.aio.ServicerContext) -> None:
        """A Decode sent ahead runs after the one before it (numbered ``step - 1``): it waits
        until that one was handed to the model thread. Two calls on one connection normally
        arrive in order; this makes the order a guarantee, within the call's deadline."""
        problem = ahead_problem(request)
        if problem:                                 # refused before it waits
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        step = request.step
        while self.handed_step < step - 1:
            self._handed.clear()
            remaining = context.time_remaining()
            try:
                await asyncio.wait_for(self._handed.wait(), remaining if remaining is not None else None)
            except asyncio.TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"decode step {step} sent ahead: step {step - 1} never came")

    async def FilterBatch(self, request, context):
        return await self._run(context, self.shard.filter_batch, request, collective=False)

    async def ClearCache(self, request, context):
        if not request.HasField("batch_id"):
            self.handed_step = 0                    # a new scheduler numbers its steps from 1
        return await self._run(context, self.shard.clear_cache, request, collective=False)


class ShardToken(grpc.aio.ServerInterceptor):
    """Refuses every call but ``Health`` (probes carry no token) with UNAUTHENTICATED
    unless its ``glm-shard-token`` metadata is the pool's token (compared in constant time)."""

    OPEN = ("/glm.v1.ShardService/Health",)

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the shard token must not be empty")
        self._token = token.encode()

    def authorized(self, metadata) -> bool:
        given = [v for k, v in metadata or () if k == TOKEN_METADATA and isinstance(v, str)]
        return bool(given) and hmac.compare_digest(given[0].encode(), self._token)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.OPEN or \
                self.authorized(handler_call_details.invocation_metadata):
            return handler

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "the shard protocol is internal to its pool: this call lacks the "
                                "pool's shard token (glm-shard-token)")

        return grpc.unary_unary_rpc_method_handler(
            refuse, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, *, token: bool) -> None:
    """ValueError for a TCP ``listen`` that is not loopback when there is no token."""
    if not listen.startswith("unix:") and not token and not _loopback(listen.rpartition(":")[0]):
        raise ValueError(f"--listen {listen}: the shard protocol is internal; a non-loopback TCP "
                         "address needs --shard-token-file (or use a unix socket)")


def bind(server: grpc.aio.Server, listen: str, *, token: bool) -> None:
    """Listen on ``listen``: a unix socket only this user can connect to (mode 0600), or
    exactly the TCP host given; a TCP host that is not loopback needs a token."""
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix://").removeprefix("unix:")
        previous = os.umask(0o177)          # the socket file is born 0600
        try:
            server.add_insecure_port(listen)
        finally:
            os.umask(previous)
        try:
            os.chmod(path, 0o600)           # whatever the platform made of the umask
        except OSError as exc:
            raise ValueError(f"--listen {listen}: cannot bind: {exc.strerror or exc}") from None
        return
    check_listen(listen, token=token)
    if server.add_insecure_port(listen) == 0:
        raise ValueError(f"--listen {listen}: cannot bind")


def model_name(opts: WorkerOptions) -> str:
    """The served name: given, else the checkpoint folder's name, else ``<preset>-dummy``."""
    if opts.model_name:
        return opts.model_name
    if opts.checkpoint:
        return Path(opts.checkpoint).resolve().name
    return f"{opts.preset or DEFAULT_DUMMY_PRESET}-dummy"


def load_shard(opts: WorkerOptions, tracer) -> Shard:
    """Join the process group and load this rank's shard (only its own weights)."""
    from model.distributed import default_backend, init_group
    from model.quantization import QuantSpec
    from model.runner import open_model, parse_dtype, rank_device

    from services.common.malloc import tune_malloc

    tune_malloc()                              # before the weights and the first step's temporaries
    if opts.threads:
        torch.set_num_threads(opts.threads)
    ctx = init_group(opts.rank, opts.tp, opts.dist_init, backend=default_backend(opts.device),
                     timeout_s=opts.collective_timeout_s)
    device = rank_device(opts.device, ctx)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = open_model(opts.checkpoint, ctx, load_format=opts.load_format, preset=opts.preset,
                       num_layers=opts.num_layers, dtype=parse_dtype(opts.dtype, device), device=device,
                       quant=QuantSpec.parse(opts.quant, opts.quant_group_size))
    spec = model.quant                         # a pre-quantized checkpoint loads as it is
    return Shard(model, model_name=model_name(opts),
                 quantization=spec.name if spec else "none", kv_memory_gib=opts.kv_memory_gib, tracer=tracer,
                 layer_trace_ratio=opts.layer_trace_ratio,
                 decode_graphs=opts.cuda_graphs and device.type == "cuda", kv_block_size=opts.kv_block_size,
                 prompt_cache=opts.prompt_cache)


async def serve(opts: WorkerOptions) -> None:
    """Load the shard, serve until SIGTERM/SIGINT, then stop gracefully."""
    provider = setup_tracing("glm-worker", otlp_endpoint=opts.otlp_endpoint,
                             attributes={"glm.rank": opts.rank, "glm.tp": opts.tp},
                             export_delay_ms=200)
    registry = new_registry()              # served from before the (long) load
    metrics = WorkerMetrics(registry, model=model_name(opts), rank=opts.rank)
    endpoint = serve_metrics(registry, opts.metrics_port, opts.metrics_host)
    token = read_token(opts.shard_token_file) if opts.shard_token_file else None
    check_listen(opts.listen, token=token is not None)      # before the (long) load
    shard = load_shard(opts, provider.get_tracer("services.worker"))
    servicer = ShardServicer(shard, metrics)
    server = grpc.aio.server(interceptors=[ShardToken(token)] if token else [],
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                      ("grpc.max_send_message_length", MAX_MESSAGE)])
    shard_pb2_grpc.add_ShardServiceServicer_to_server(servicer, server)
    bind(server, opts.listen, token=token is not None)
    await server.start()
    log.info("rank %d/%d serving %s on %s", opts.rank, opts.tp, shard.model_name, opts.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2.0)
    servicer.executor.shutdown(wait=False, cancel_futures=True)
    provider.shutdown()
    if endpoint is not None:
        endpoint.close()
