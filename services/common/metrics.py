"""Prometheus metrics: one registry per process and its text endpoint (``docs/observability.md``).

Each service declares its own metrics on the registry made here
(``services/gateway/metrics.py``, ``services/scheduler/metrics.py``,
``services/worker/metrics.py``); names follow ``glm_<service>_<what>_<unit>`` and
are listed in docs/deploy.md §8. A registry is created by the process that serves
it (nothing is registered at import time), so tests can make as many as they like.
The endpoint is prometheus-client's own HTTP server on a daemon thread: a scrape
never waits for the service's asyncio loop or model thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (GCCollector, PlatformCollector, ProcessCollector, CollectorRegistry,
                               disable_created_metrics, start_http_server)

# Seconds. Token latencies on a GPU are milliseconds; a 130B model on CPU or a queued
# request takes seconds to minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                300.0)


def new_registry(*, process_metrics: bool = True) -> CollectorRegistry:
    """An empty registry, with the standard ``process_*``/``python_*`` collectors by default.

    ``*_created`` series are switched off for the whole process: they double the
    output and nothing here reads them."""
    disable_created_metrics()
    registry = CollectorRegistry()
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP server (any path answers)."""

    server: object
    thread: object

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry, port: int, host: str = "127.0.0.1") -> MetricsEndpoint | None:
    """Serve ``registry`` (any object with ``collect()``) on exactly ``host:port`` (loopback
    unless told otherwise); None when ``port`` is 0 (metrics off). Raises OSError when the
    port is taken."""
    if not port:
        return None
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)
