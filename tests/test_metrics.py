"""Prometheus metrics (docs/observability.md, docs/deploy.md §8).

Pure parts first: the scheduler's inter-token clock and failure reasons, the
worker's failure reasons, the gateway's outcomes, the hub's merge of several
processes' texts. Then the real thing: a `glm serve`-style stack with metrics on,
some traffic (ok calls, a cancelled stream, refused calls), one scrape of the one
port, and every documented metric present with sensible values. Waits are for
events (a scrape that shows them), bounded by ``HANG_S``, which only a hang reaches.
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.common.metrics import new_registry, serve_metrics
from services.common.metrics_hub import MetricsHub, merge
from services.gateway.metrics import GatewayMetrics, outcome_of
from services.scheduler.metrics import TokenClock, failure_reason
from services.scheduler.request import Outcome
from services.common.net import free_port

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 60.0
CALL_S = 600.0                     # a whole call's deadline: only a hang reaches it, on any load
DOCUMENTED = re.compile(r"^\| `(glm_[a-z0-9_]+)` \| (\w+) \| ([a-z, ]+) \|", re.M)


def documented() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the table of docs/deploy.md §8."""
    rows = DOCUMENTED.findall((ROOT / "docs/deploy.md").read_text())
    return {name: (kind, {label.strip() for label in labels.split(",")}) for name, kind, labels in rows}


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=HANG_S) as reply:
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def values(family, suffix: str = "", **labels) -> list[float]:
    name = family.name + suffix
    return [s.value for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


# ---- pure parts --------------------------------------------------------------------------

def test_token_clock_measures_gaps_per_request_and_forgets_ended_ones():
    clock = TokenClock()
    assert clock.tick(["a", "b"], [], now=1.0) == []              # first tokens: no gap yet
    assert clock.tick(["a", "a"], [], now=1.5) == [0.5]           # one gap per request per step
    assert sorted(clock.tick(["a", "b"], ["b"], now=2.0)) == [0.5, 1.0]
    assert "b" not in clock.last
    assert clock.tick(["b"], [], now=3.0) == []                   # b ended: a new request with its id


def test_scheduler_failure_reason():
    assert failure_reason(Outcome("r", None)) is None
    assert failure_reason(Outcome("r", None, "INVALID_ARGUMENT", "poison", dead=True)) == "invalid_argument"
    assert failure_reason(Outcome("r", None, "DEADLINE_EXCEEDED", "late")) == "deadline_exceeded"


def test_worker_failure_reason():
    pytest.importorskip("torch")
    from services.worker.metrics import failure_reason as worker_reason
    from services.worker.shard import OutOfMemory

    def reason(exc, collective=True):
        return worker_reason(exc, collective=collective, out_of_memory=OutOfMemory)

    assert reason(OutOfMemory("oom")) == "out_of_memory"
    assert reason(Unavailable("rank 0 is broken")) == "broken"
    assert reason(InvalidArgument("unknown batch")) == "invalid_argument"
    assert reason(ResourceExhausted("no room")) == "resource_exhausted"
    assert reason(RuntimeError("gloo timeout")) == "collective"
    assert reason(RuntimeError("bug"), collective=False) == "internal"


def test_gateway_outcomes_and_ttft_once_per_call():
    assert outcome_of(grpc.StatusCode.OK) == "ok"
    assert outcome_of(grpc.StatusCode.RESOURCE_EXHAUSTED) == "resource_exhausted"
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    call = metrics.call()
    call.model = "m"
    call.token()
    call.token()
    call.finish("ok")
    call.finish("cancelled")                                       # only the first outcome counts
    assert registry.get_sample_value("glm_gateway_requests_total", {"model": "m", "outcome": "ok"}) == 1
    assert registry.get_sample_value("glm_gateway_requests_total", {"model": "m", "outcome": "cancelled"}) is None
    assert registry.get_sample_value("glm_gateway_time_to_first_token_seconds_count", {"model": "m"}) == 1


def _exposition(value: float, extra: str = "") -> str:
    registry = new_registry(process_metrics=False)
    Counter("glm_x_things_total", "things", ["model"], registry=registry).labels("m").inc(value)
    Gauge("glm_x_depth", "depth", registry=registry).set(value)
    if extra:
        Counter(extra, "a counter here", registry=registry).inc()
    return generate_latest(registry).decode()


def test_merge_labels_each_process_and_renders_one_family_per_name():
    merged = merge([("gateway", _exposition(1, extra="glm_x_clash")), ("scheduler-0", _exposition(2))])
    registry = CollectorRegistry()
    registry.register(type("Static", (), {"collect": lambda self: merged, "describe": lambda self: []})())
    text = generate_latest(registry).decode()
    assert text.count("# TYPE glm_x_things_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert values(families["glm_x_things"], "_total", process="gateway", model="m") == [1]
    assert values(families["glm_x_things"], "_total", process="scheduler-0", model="m") == [2]
    assert values(families["glm_x_depth"], process="scheduler-0") == [2]


def test_merge_drops_a_family_whose_type_disagrees():
    gauge = "# TYPE glm_x_depth gauge\nglm_x_depth 1\n"
    counter = "# TYPE glm_x_depth_total counter\nglm_x_depth_total 1\n"
    [family] = merge([("a", gauge), ("b", counter)])
    assert family.type == "gauge" and [s.labels["process"] for s in family.samples] == ["a"]


def test_endpoint_is_off_at_port_zero_and_the_hub_skips_a_dead_process():
    assert serve_metrics(new_registry(), 0) is None
    registry = new_registry(process_metrics=False)
    Gauge("glm_x_depth", "depth", registry=registry).set(7)
    child = serve_metrics(registry, free_port(), "127.0.0.1")
    dead = free_port()                                             # nothing listens there
    targets = {"alive": f"http://127.0.0.1:{child.port}/metrics", "dead": f"http://127.0.0.1:{dead}/metrics"}
    # the dead target refuses at once; the timeout only bounds a slow live one (busy machine)
    hub = serve_metrics(MetricsHub(lambda: targets, timeout_s=HANG_S).registry(), free_port(), "127.0.0.1")
    try:
        families = scrape(hub.port)
        assert values(families["glm_x_depth"], process="alive") == [7]
        assert not values(families["glm_x_depth"], process="dead")
    finally:
        hub.close()
        child.close()


@pytest.mark.processes                 # a private redis-server
def test_queue_depth_is_the_groups_lag_or_what_is_neither_pending_nor_acked():
    import asyncio

    import redis.asyncio as aioredis

    from services.common import redis_keys as keys
    from services.common.local_redis import start_local_redis
    from services.scheduler.queue import PoolQueue

    async def main(url):
        client = aioredis.from_url(url)
        queue = PoolQueue(client, "m", "pool-a")
        await queue.ensure_group()
        depths = [await queue.lag()]
        for _ in range(3):
            await client.xadd(queue.stream, {keys.FIELD: "{}"})
        depths.append(await queue.lag())
        [taken] = await queue.read(1, None)
        depths.append(await queue.lag())
        await client.xack(queue.stream, keys.GROUP, taken.entry_id)
        await client.xdel(queue.stream, taken.entry_id)
        depths.append(await queue.lag())
        last = (await client.xrange(queue.stream))[-1][0]
        await client.xdel(queue.stream, last)                     # Redis cannot tell the lag now
        [group] = await client.xinfo_groups(queue.stream)
        depths.append(await queue.lag())
        await client.aclose()
        return depths, group.get("lag", "no lag field (Redis 6.2)")

    server = start_local_redis()
    try:
        depths, lag = asyncio.run(main(server.url))
    finally:
        server.stop()
    assert depths == [0, 3, 2, 2, 1]
    assert lag is None or isinstance(lag, str)                    # the last depth came from the fallback


# ---- the real stack ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    pytest.importorskip("torch")
    from model.tiny import init_tiny
    from services.local import LocalStack
    from services.local_options import ServeOptions

    checkpoint = tmp_path_factory.mktemp("metrics-tiny")
    init_tiny(checkpoint, preset="glm-tiny", seed=3)
    options = ServeOptions.from_flat(dtype="float32", checkpoint=str(checkpoint), model_name=f"metrics-{uuid.uuid4().hex[:6]}",
                                     port=free_port(), metrics_port=free_port(), max_batch_size=8,
                                     workdir=str(tmp_path_factory.mktemp("metrics-logs")))
    s = LocalStack(options).start()
    yield s
    s.stop()


def _longest(client, model: str, prompt: str) -> int:
    """As many new tokens as the model allows after ``prompt``: a stream that cannot end
    by itself while a test holds it open, however busy the machine."""
    ids = client.tokenize(prompt, model, timeout=HANG_S).token_ids
    return client.model_info(model, timeout=HANG_S).max_sequence_length - len(ids) - 1


def _traffic(stack) -> None:
    from services.client import GLMClient, GLMError

    model = stack.options.model_name
    with GLMClient(stack.address) as client:
        for prompt in ("The river runs past the old mill and [MASK] into the valley.", "Short [MASK]"):
            reply = client.generate(prompt, model=model, max_new_tokens=8, min_new_tokens=8, temperature=0,
                                    timeout=CALL_S)
            assert len(reply.token_ids) == 8
        prompt = "Stream the tokens [gMASK]"
        stream = client.generate_stream(prompt, model=model, max_new_tokens=_longest(client, model, prompt),
                                        temperature=0, timeout=HANG_S)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()                                             # the caller goes away: cancelled
        with pytest.raises(GLMError) as refused:
            client.generate("Short [MASK]", model=model, max_new_tokens=4, repetition_penalty=-1.0, timeout=CALL_S)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(GLMError) as unknown:
            client.generate("Short [MASK]", model="no-such-model", timeout=CALL_S)
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND


def _wait_for(stack, check, timeout_s: float = HANG_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        families = scrape(stack.metrics.port)
        try:
            check(families)
            return families
        except (AssertionError, KeyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.mark.processes
@pytest.mark.slow
def test_one_port_serves_every_documented_metric_with_sensible_values(stack):
    _traffic(stack)
    model, pool = stack.options.model_name, stack.pool_ids[0]

    labels = {"model": model, "pool": pool}
    idle = ("glm_scheduler_queue_depth", "glm_scheduler_batch_size", "glm_scheduler_waiting_requests",
            "glm_scheduler_kv_cache_used_tokens")

    def settled(families):   # the stream's handler ends, and the pool drops it, a moment after the client left
        processes = {s.labels["process"] for f in families.values() for s in f.samples}
        assert processes == {"gateway", "scheduler-0", "worker-0-0"}, processes   # every scrape answered
        assert values(families["glm_gateway_requests"], "_total", model=model, outcome="cancelled") == [1]
        for name in idle:
            assert values(families[name], **labels) == [0], name

    families = _wait_for(stack, settled)
    names = {s.name for f in families.values() for s in f.samples}
    for name, (kind, label_names) in documented().items():
        family = families[name.removesuffix("_total")]
        assert family.type == kind, name
        if kind == "histogram" or name in names:                   # labelled counters appear on first use
            sample = next(s for s in family.samples if s.name.startswith(name))
            assert label_names <= set(sample.labels), (name, sample.labels)
    processes = {s.labels["process"] for f in families.values() for s in f.samples}
    assert processes == {"gateway", "scheduler-0", "worker-0-0"}

    gateway = families["glm_gateway_requests"]
    assert values(gateway, "_total", model=model, outcome="ok") == [2]
    assert values(gateway, "_total", model=model, outcome="invalid_argument") == [1]
    assert values(gateway, "_total", model="unknown", outcome="not_found") == [1]
    ttft = families["glm_gateway_time_to_first_token_seconds"]
    assert values(ttft, "_count", model=model) == [3]             # two ok calls and the stream
    assert 0 < values(ttft, "_sum", model=model)[0] < 3 * 60    # seconds: each call's deadline bounds it

    generated = values(families["glm_scheduler_generated_tokens"], "_total", **labels)[0]
    assert generated >= 8 + 8 + 3
    assert values(families["glm_scheduler_prompt_tokens"], "_total", **labels)[0] > 0
    assert values(families["glm_scheduler_inter_token_latency_seconds"], "_count", **labels)[0] >= 7 + 7
    assert values(families["glm_scheduler_kv_cache_capacity_tokens"], **labels)[0] > 0
    assert values(families["glm_scheduler_resumed_requests"], "_total", **labels) == [0]

    worker = {"model": model, "rank": "0"}
    prefills = values(families["glm_worker_prefill_seconds"], "_count", **worker)[0]
    decodes = values(families["glm_worker_decode_seconds"], "_count", **worker)[0]
    assert prefills >= 3 and decodes >= 7
    assert values(families["glm_worker_decode_seconds"], "_sum", **worker)[0] > 0
    assert families["process_resident_memory_bytes"].samples                # the processes' own series


@pytest.mark.processes
@pytest.mark.slow
def test_busy_pool_shows_its_batch_and_kv_use(stack):
    """While a long generation runs, the batch and KV gauges are non-zero. The worker is
    held (SIGSTOP) inside the step, so the request is still running at the scrape."""
    from services.client import GLMClient

    model, prompt = stack.options.model_name, "Stream the tokens [gMASK]"
    worker = stack.pools[0].pids
    with GLMClient(stack.address) as client:
        stream = client.generate_stream(prompt, model=model, max_new_tokens=_longest(client, model, prompt),
                                        temperature=0, timeout=HANG_S)
        try:
            # The gauges are set at the top of each loop iteration; the first step prefills
            # and decodes (two tokens) under the gauges of the idle pool, so the third token
            # comes from an iteration that began with the request running.
            for i, _ in enumerate(stream):
                if i == 2:
                    break
            for pid in worker:
                os.kill(pid, signal.SIGSTOP)
            labels = {"model": model, "pool": stack.pool_ids[0]}

            def busy(families):
                assert values(families["glm_scheduler_batch_size"], **labels) == [1]
                assert values(families["glm_scheduler_kv_cache_used_tokens"], **labels)[0] > 0

            _wait_for(stack, busy)
        finally:
            for pid in worker:
                os.kill(pid, signal.SIGCONT)
            stream.close()
