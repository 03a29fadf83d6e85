"""One request through the real stack (gateway, scheduler, a TP=2 pool) with tracing
on, exported over OTLP/gRPC to a receiver on loopback.

The caller's ``traceparent`` (gRPC metadata) must come back as ONE trace: the
gateway span under the caller's span, the scheduler's request span under it,
every step span (served alone, so a child of the request span, and linked to
it), each rank's forward span under each step span, and one ``worker.layer``
span per layer per rank per forward (layer trace ratio 1.0). The spans are
flushed by the stack's stop (each service shuts its BatchSpanProcessor down, and
an OTLP export is a unary call answered only after the receiver stored the
spans), so once every process has exited, every span is here: no sleep.

``python -m tests.test_tracing_e2e OUT.json`` runs the same request once and
writes the spans as JSON (``bench/render_trace.py`` draws them as a waterfall).
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from model.config import GLMConfig
from model.tiny import init_tiny
from services.cli.main import build_parser
from services.client import build_request
from services.common.env import apply_env_defaults
from services.common.tracing import metadata_from_context, setup_tracing
from services.local import LocalStack
from services.local_options import ServeOptions
from services.proto_gen.glm.v1 import generation_pb2_grpc as pb_grpc
from services.common.net import free_port

pytestmark = [pytest.mark.processes, pytest.mark.slow]

TP = 2
NEW_TOKENS = 4                 # min = max: 1 prefill + 3 decodes, 4 forwards per rank
PROMPT = "The river runs past the old mill and [MASK] into the valley."
STOP_GRACE_S = 60.0            # SIGTERM, then this long to flush before SIGKILL: only a hang reaches it


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A tiny OTLP/gRPC trace collector: keeps every span it is sent, as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend(_span_dict(resource, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> str:
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.stop(0)


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _span_dict(resource: dict, s) -> dict:
    return {"name": s.name, "service": resource.get("service.name"), "rank": resource.get("glm.rank"),
            "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex(),
            "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
            "attributes": {a.key: _value(a.value) for a in s.attributes},
            "links": [link.span_id.hex() for link in s.links]}


def traced_request(checkpoint: str, workdir: str) -> dict:
    """Start a traced stack, send one request under a caller span, stop the stack
    (which flushes every exporter) and return what the collector received."""
    receiver = Receiver()
    endpoint = receiver.start()
    name = f"trace-{uuid.uuid4().hex[:8]}"
    stack = LocalStack(ServeOptions.from_flat(dtype="float32", checkpoint=checkpoint, model_name=name, port=free_port(), tp=TP,
                                              max_batch_size=4, workdir=workdir, otlp_endpoint=endpoint,
                                              layer_trace_ratio=1.0))
    try:
        stack.start(ready_timeout_s=120)
        caller = setup_tracing("test-caller").get_tracer("test").start_span("caller")
        metadata = metadata_from_context(trace.set_span_in_context(caller))
        request = build_request(PROMPT, model=name, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                temperature=0)
        with grpc.insecure_channel(stack.address) as channel:
            reply = pb_grpc.TextGenerationStub(channel).Generate(request, timeout=10 * STOP_GRACE_S, metadata=metadata)
        caller.end()
    finally:
        stack.stop(grace_s=STOP_GRACE_S)
    receiver.stop()
    ctx = caller.get_span_context()
    return {"caller_trace_id": f"{ctx.trace_id:032x}", "caller_span_id": f"{ctx.span_id:016x}",
            "generated_tokens": len(reply.token_ids), "spans": receiver.spans}


# -- the tests ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("trace-tiny")
    init_tiny(ckpt, preset="glm-tiny", seed=5)
    return traced_request(str(ckpt), str(tmp_path_factory.mktemp("trace-logs"))), str(ckpt)


def test_one_request_is_one_trace_from_the_caller_to_every_layer_of_every_rank(collected):
    got, ckpt = collected
    num_layers = GLMConfig.for_checkpoint(ckpt).num_layers
    assert got["generated_tokens"] == NEW_TOKENS
    mine = [s for s in got["spans"] if s["trace_id"] == got["caller_trace_id"]]
    by_name: dict[str, list[dict]] = {}
    for s in mine:
        by_name.setdefault(s["name"], []).append(s)

    # every service and every rank speaks in the caller's trace
    assert {s["service"] for s in mine} == {"glm-gateway", "glm-scheduler", "glm-worker"}
    assert {s["rank"] for s in mine if s["service"] == "glm-worker"} == set(range(TP))

    # caller -> gateway.generate -> scheduler.request (through the Redis entry)
    [gateway] = by_name["gateway.generate"]
    assert gateway["parent_span_id"] == got["caller_span_id"]
    [request] = by_name["scheduler.request"]
    assert request["parent_span_id"] == gateway["span_id"]
    assert request["attributes"]["glm.request_id"] == gateway["attributes"]["glm.request_id"]

    # each step served this request alone: its child, and linked to it
    steps = by_name["scheduler.prefill"] + by_name.get("scheduler.decode", [])
    assert len(by_name["scheduler.prefill"]) == 1 and len(steps) == NEW_TOKENS
    assert all(s["parent_span_id"] == request["span_id"] and s["links"] == [request["span_id"]] for s in steps)

    # each rank: one forward span under each step span, one layer span per layer under each forward
    step_ids = {s["span_id"] for s in steps}
    for rank in range(TP):
        forwards = [s for s in mine if s["rank"] == rank and s["name"] in ("worker.prefill", "worker.decode")]
        assert sorted(s["parent_span_id"] for s in forwards) == sorted(step_ids)
        for forward in forwards:
            layers = [s for s in by_name["worker.layer"] if s["parent_span_id"] == forward["span_id"]]
            assert sorted(s["attributes"]["glm.layer"] for s in layers) == list(range(num_layers))
            assert all(s["rank"] == rank == s["attributes"]["glm.rank"] for s in layers)
            assert all(forward["start_ns"] <= s["start_ns"] <= s["end_ns"] <= forward["end_ns"] for s in layers)
    assert len(by_name["worker.layer"]) == num_layers * TP * NEW_TOKENS

    # nothing else of this request escaped into another trace
    others = [s for s in got["spans"] if s["trace_id"] != got["caller_trace_id"]]
    assert not [s for s in others if s["name"] in ("gateway.generate", "scheduler.request", "scheduler.prefill",
                                                    "scheduler.decode", "worker.prefill", "worker.decode")]


def test_serve_flags_reach_the_stack(monkeypatch, tmp_path):
    """``glm serve --otlp-endpoint --layer-trace-ratio`` (or GLM_OTLP_ENDPOINT...) land
    in the stack's options; without them nothing is configured."""
    from services.cli import serve

    seen = []

    class Captured(Exception):
        """Raised by the fake stack: the options were seen, nothing was started."""

    def fake_stack(options):
        seen.append(options)
        raise Captured

    monkeypatch.setattr(serve, "LocalStack", fake_stack)

    def options(argv, environ):
        parser = build_parser()
        apply_env_defaults(parser, environ)
        with pytest.raises(Captured):
            serve.run(parser.parse_args(["serve", "--checkpoint", str(tmp_path), *argv]))
        return seen.pop()

    plain = options([], {})
    assert plain.otlp_endpoint is None and plain.layer_trace_ratio == 0.0
    flags = options(["--otlp-endpoint", "collector:4317", "--layer-trace-ratio", "0.25"], {})
    assert (flags.otlp_endpoint, flags.layer_trace_ratio) == ("collector:4317", 0.25)
    env = options([], {"GLM_OTLP_ENDPOINT": "otel:4317", "GLM_LAYER_TRACE_RATIO": "1"})
    assert (env.otlp_endpoint, env.layer_trace_ratio) == ("otel:4317", 1.0)
    parser = build_parser()
    with pytest.raises(ValueError, match="layer-trace-ratio"):
        serve.run(parser.parse_args(["serve", "--checkpoint", str(tmp_path), "--layer-trace-ratio", "2"]))


def test_the_stack_passes_tracing_to_every_process(monkeypatch):
    """Scheduler and gateway command lines carry --otlp-endpoint only when it is set."""
    stack = LocalStack(ServeOptions.from_flat(dtype="float32", checkpoint="/ckpt", model_name="m", otlp_endpoint="c:4317"))
    assert stack._tracing_args() == ["--otlp-endpoint", "c:4317"]
    assert LocalStack(ServeOptions.from_flat(dtype="float32", checkpoint="/ckpt", model_name="m"))._tracing_args() == []


def test_without_an_endpoint_nothing_is_exported():
    provider = setup_tracing("glm-worker")
    assert provider._active_span_processor._span_processors == ()


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "trace-example.json")
    with tempfile.TemporaryDirectory() as folder:
        init_tiny(Path(folder) / "ckpt", preset="glm-tiny", seed=5)
        got = traced_request(str(Path(folder) / "ckpt"), str(Path(folder) / "logs"))
    got["spans"] = [s for s in got["spans"] if s["trace_id"] == got["caller_trace_id"]]
    out.write_text(json.dumps(got, indent=1))
    print(f"{len(got['spans'])} spans of trace {got['caller_trace_id']} -> {out}")
