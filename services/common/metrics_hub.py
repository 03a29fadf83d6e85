"""One metrics endpoint for many processes: what ``glm serve`` exposes.

The all-in-one stack runs a gateway, schedulers and worker ranks as separate
processes, each with its own registry and endpoint on a loopback port. The hub is
a collector: on every scrape of its one port it fetches each process's text
(concurrently, with a short timeout), parses it and merges the families by name,
adding a ``process`` label (``gateway``, ``scheduler-0``, ``worker-0-1``...) so the
series of two processes never collide (the ``process_*``/``python_*`` series of
every process, the ranks of two pools). A process that does not answer is left
out of that scrape (and logged), the others are still served.

Why not prometheus-client's multiprocess mode: it wants the same environment
variable set before every child imports the library, one shared directory whose
files outlive a ``kill -9``'d process (a dead rank's gauges would linger), gauges
that need a per-metric aggregation mode, and no ``process_*`` collectors. Scraping
the children's own endpoints keeps every service exactly as it runs alone.
"""

from __future__ import annotations

import logging
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("glm.metrics")
LABEL = "process"


def merge(scrapes: Iterable[tuple[str, str]], label: str = LABEL) -> list[Metric]:
    """Families of several processes' text expositions, one family per name, each
    sample labelled ``label=<process>``. A family whose type differs from the one
    already seen under its name is dropped (it could not be exposed as one family)."""
    families: dict[str, Metric] = {}
    for process, text in scrapes:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            elif merged.type != family.type:
                log.warning("metrics: %s is a %s in %s, a %s elsewhere; dropped", family.name, family.type,
                            process, merged.type)
                continue
            merged.samples.extend(s._replace(labels={**s.labels, label: process}) for s in family.samples)
    return list(families.values())


def fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return reply.read().decode("utf-8")


class MetricsHub:
    """A collector over the endpoints ``targets()`` names (process -> URL), read at
    each scrape so processes added later are included."""

    def __init__(self, targets: Callable[[], Mapping[str, str]], timeout_s: float = 2.0) -> None:
        self.targets = targets
        self.timeout_s = timeout_s

    def describe(self) -> list:
        return []          # nothing to check at registration (and no scrape then)

    def collect(self) -> list[Metric]:
        targets = dict(self.targets())
        if not targets:
            return []
        with ThreadPoolExecutor(len(targets)) as pool:
            futures = {name: pool.submit(fetch, url, self.timeout_s) for name, url in targets.items()}
        scrapes = []
        for name, future in futures.items():
            try:
                scrapes.append((name, future.result()))
            except Exception as exc:   # noqa: BLE001 - a dead or slow process is left out
                log.warning("metrics: %s (%s) did not answer: %s", name, targets[name], exc)
        return merge(scrapes)

    def registry(self) -> CollectorRegistry:
        """A registry holding only this hub (for ``serve_metrics``)."""
        registry = CollectorRegistry()
        registry.register(self)
        return registry
