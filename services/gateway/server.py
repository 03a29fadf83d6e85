"""The gateway process: a ``grpc.aio`` server with the public API, the standard
health service and server reflection (``v1`` and ``v1alpha``), optional API keys
and TLS. A request whose bytes do not parse (not protobuf, a string field that is not
UTF-8) ends INVALID_ARGUMENT naming the problem (``services.gateway.wire``).

Health follows Redis and the pools (a background check every
``health_interval_s``, and at once when a call fails): the overall status ``""``
(the readiness probe) is NOT_SERVING while the queue cannot be reached: a
reachable queue takes requests even while no pool runs (they wait for one; pools
may scale from zero on the queue's lag). ``glm.v1.TextGeneration`` is SERVING
only while Redis answers and at least one of its models has a live pool
heartbeat (``glm:pool:*``, expired ``POOL_TTL_S`` after a pool's last beat), and
``glm.v1.TextGeneration/<model>`` says the same of each model. On SIGTERM/SIGINT the server reports
NOT_SERVING, stops accepting calls and lets in-flight ones finish for up to
``grace_period_s``; calls still running then are cancelled (their requests'
cancel keys are set).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.errors import ServiceError
from services.common.metrics import MetricsEndpoint, new_registry, serve_metrics
from services.common.tracing import setup_tracing
from services.gateway.auth import ApiKeyInterceptor
from services.gateway.broker import Broker, connect, pool_size
from services.gateway.catalog import Catalog, load_model
from services.gateway.http_api import OpenAIFront
from services.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from services.gateway.options import GatewayOptions
from services.gateway.reflection import enable_server_reflection
from services.gateway.service import TextGenerationService
from services.gateway.wire import MalformedRequests, request_classes
from services.proto_gen.glm.v1 import generation_pb2 as pb
from services.proto_gen.glm.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("glm.gateway")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name


class RedisHealth:
    """The health status of every service name: Redis reachability, and the models
    that have a live pool (see the module docstring)."""

    def __init__(self, servicer: health.aio.HealthServicer, models: tuple[str, ...] = ()) -> None:
        self.servicer = servicer
        self.models = models
        self.serving: bool | None = None
        self.state: tuple | None = None
        self.closed = False
        self._tasks: set[asyncio.Task] = set()

    async def set(self, serving: bool, live: frozenset[str] = frozenset()) -> None:
        state = (serving, live if serving else frozenset())
        if self.closed or state == self.state:
            return
        self.serving, self.state = serving, state
        statuses = {"": serving, SERVICE_NAME: serving and any(m in live for m in self.models)}
        statuses.update({f"{SERVICE_NAME}/{m}": serving and m in live for m in self.models})
        for name, up in statuses.items():
            await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING if up else
                                    health_pb2.HealthCheckResponse.NOT_SERVING)
        missing = [m for m in self.models if m not in live]
        log.log(logging.INFO if serving and not missing else logging.WARNING, "health: %s",
                "Redis unreachable: NOT_SERVING" if not serving else
                f"no live pool for {', '.join(missing)}" if missing else "SERVING")

    def mark(self, serving: bool) -> None:
        """Synchronous hook for the broker; the change is applied on the loop."""
        if self.closed or serving == self.serving:
            return
        task = asyncio.ensure_future(self.set(serving, self.state[1] if self.state else frozenset()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self.closed = True
        await self.servicer.enter_graceful_shutdown()


class Gateway:
    """The gateway process: the gRPC server (API, health, reflection), Redis, tracing and
    metrics; ``start``, ``wait``, ``stop`` (draining)."""

    def __init__(self, options: GatewayOptions, *, span_exporter=None) -> None:
        self.options = options
        catalog = Catalog([load_model(name, directory, options.limits, options.tokenizer)
                           for name, directory in options.models])
        self.catalog = catalog
        self.tracing = setup_tracing("glm-gateway", otlp_endpoint=options.otlp_endpoint,
                                     exporter=span_exporter)
        self.registry = new_registry()
        self.metrics = GatewayMetrics(self.registry)
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.port: int | None = None
        self.http_port: int | None = None            # the OpenAI-compatible front's, when on
        self._http: OpenAIFront | None = None
        self._server: grpc.aio.Server | None = None
        self._monitor: asyncio.Task | None = None
        self._health: RedisHealth | None = None
        self._broker: Broker | None = None
        self._service: TextGenerationService | None = None

    async def start(self) -> int:
        options = self.options
        health_servicer = health.aio.HealthServicer()
        self._health = RedisHealth(health_servicer, tuple(m.name for m in self.catalog))
        redis = connect(options.redis_url, options.redis_timeout_s,
                        max_connections=pool_size(options.max_concurrent_calls))
        self._broker = Broker(redis,
                              max_queue_depth=options.max_queue_depth,
                              timeout_s=options.redis_timeout_s,
                              on_failure=lambda exc: self._health.mark(False))
        interceptors = [ApiKeyInterceptor(list(options.api_keys), on_denied=self._denied)] \
            if options.api_keys else []
        # After the API keys: a call without a valid key is refused before its bytes matter.
        interceptors.append(MalformedRequests(request_classes(pb, health_pb2)))
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        tracer = self.tracing.get_tracer("glm.gateway")
        self._service = TextGenerationService(self.catalog, self._broker, tracer, self.metrics,
                                              max_calls=options.max_concurrent_calls,
                                              keyed=bool(options.api_keys))
        pb_grpc.add_TextGenerationServicer_to_server(self._service, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME], server)
        address = f"{options.host}:{options.port}"
        if options.tls_cert or options.tls_key:
            if not (options.tls_cert and options.tls_key):
                raise ValueError("--tls-cert and --tls-key go together")
            credentials = grpc.ssl_server_credentials(
                [(_read(options.tls_key, "--tls-key"), _read(options.tls_cert, "--tls-cert"))])
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        await self._check_redis()
        self.metrics_endpoint = serve_metrics(self.registry, options.metrics_port, options.metrics_host)
        await server.start()
        self._server = server
        if options.http_port is not None:
            self._http = OpenAIFront(self._service, self.catalog, api_keys=options.api_keys,
                                     healthy=self._serving, on_denied=self._denied)
            self.http_port = await self._http.start(options.host, options.http_port, _ssl_context(options),
                                                    shutdown_timeout=options.grace_period_s)
        self._monitor = asyncio.create_task(self._watch_redis())
        return self.port

    def _serving(self) -> bool:
        """The HTTP front's /health: Redis answers and a pool of some model is alive."""
        state = self._health.state if self._health is not None else None
        return bool(state and state[0] and state[1])

    def _denied(self, method: str) -> None:
        """A generation call refused for its API key (the model is not known yet)."""
        if method.rsplit("/", 1)[-1] in ("Generate", "GenerateStream"):
            self.metrics.requests.labels(UNKNOWN_MODEL, "unauthenticated").inc()

    async def _check_redis(self) -> None:
        try:
            await self._broker.ping()
            live = frozenset(await self._broker.live_models())
            serving = True
        except ServiceError as exc:
            log.warning("%s", exc)
            serving, live = False, frozenset()
        await self._health.set(serving, live)

    async def _watch_redis(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            await self._check_redis()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; in-flight ones get ``grace`` seconds to finish."""
        if self._server is None:
            return
        grace = self.options.grace_period_s if grace is None else grace
        await self._health.close()
        if self._monitor:
            self._monitor.cancel()
        if self._http is not None:          # in-flight HTTP calls drain beside the gRPC ones
            http = asyncio.ensure_future(self._http.stop())
            await self._server.stop(grace)
            await http
        else:
            await self._server.stop(grace)
        await self._service.drain()   # cancel keys of the calls the stop cut short
        await self._broker.close()
        self.tracing.shutdown()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _ssl_context(options: GatewayOptions):
    """The HTTP front's TLS, from the gRPC server's certificate and key (None: plaintext)."""
    if not options.tls_cert:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(options.tls_cert, options.tls_key)
    return context


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None


async def serve(options: GatewayOptions, ready=None) -> None:
    """Run until SIGTERM/SIGINT, then drain for ``grace_period_s``."""
    gateway = Gateway(options)
    port = await gateway.start()
    scheme = "tls" if options.tls_cert else "plaintext"
    log.info("listening on %s:%d (%s), models %s", options.host, port, scheme,
             ", ".join(m.name for m in gateway.catalog))
    if gateway.http_port is not None:
        log.info("OpenAI-compatible HTTP on %s://%s:%d/v1", "https" if options.tls_cert else "http",
                 options.host, gateway.http_port)
    if ready is not None:
        ready(port)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def on_signal(signum: int) -> None:
        if not stopping:
            log.info("signal %d: draining for up to %.0f s", signum, options.grace_period_s)
            stopping.append(asyncio.ensure_future(gateway.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await gateway.wait()
    if stopping:
        await stopping[0]
