"""The shard protocol's generated code is in sync with ``protos/``, imports go through
``services.proto_gen`` (no top-level ``glm`` package), and the worker's tracing
pieces: per-layer spans under each forward span, sampled the same on every rank."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import protogen
from services.common.tracing import LayerSampler, context_from_metadata, metadata_from_context, setup_tracing


def test_generated_code_is_not_stale():
    assert protogen.stale_files() == [], "run: python -m services.common.protogen"


def test_generated_imports_go_through_services():
    for path in protogen.OUT_DIR.rglob("*.py*"):
        text = path.read_text()
        assert "from glm" not in text and "import glm" not in text, path
        assert "from grpc.reflection" not in text and "import grpc.reflection" not in text, path


def test_layer_sampler_is_an_exact_deterministic_ratio():
    for ratio in (0.0, 0.25, 1 / 3, 1.0):
        a, b = LayerSampler(ratio), LayerSampler(ratio)
        picks = [a.next() for _ in range(120)]
        assert picks == [b.next() for _ in range(120)] and sum(picks) == round(120 * ratio)
    with pytest.raises(ValueError):
        LayerSampler(1.5)


def test_trace_context_round_trips_through_metadata():
    provider = setup_tracing("test", exporter=InMemorySpanExporter())
    with provider.get_tracer("t").start_as_current_span("caller") as span:
        metadata = metadata_from_context()
    ctx = context_from_metadata([*metadata, ("x-bin", b"\x00")])
    assert trace.get_current_span(ctx).get_span_context().trace_id == span.get_span_context().trace_id


def test_every_layer_gets_a_child_span_of_the_forward(tmp_path):

    from model.runner import load_model
    from model.tiny import init_tiny
    from services.proto_gen.glm.v1 import shard_pb2 as pb
    from services.worker.shard import Shard
    from tests.worker_cases import mixed_batch

    init_tiny(tmp_path, preset="glm-tiny", tp=1, seed=1)
    exporter = InMemorySpanExporter()
    tracer = setup_tracing("glm-worker", exporter=exporter).get_tracer("t")
    shard = Shard(load_model(str(tmp_path)), model_name="t", kv_memory_gib=0.01, tracer=tracer,
                  layer_trace_ratio=0.5)
    shard.warmup(pb.WarmupRequest(max_batch_size=1, max_input_tokens=8, max_total_tokens=10))
    reply = shard.prefill(pb.PrefillRequest(batch=mixed_batch(1)))
    shard.decode(pb.DecodeRequest(batches=[reply.batch]))
    spans = exporter.get_finished_spans()
    forwards = [s for s in spans if s.name in ("worker.warmup", "worker.prefill", "worker.decode")]
    layers = [s for s in spans if s.name == "worker.layer"]
    # 4 forwards (warm-up prefill + decode, prefill, decode); ratio 0.5 samples 2 of them
    assert len(forwards) == 3 and len(layers) == 2 * 2
    for s in layers:
        parent = next(f for f in forwards if f.context.span_id == s.parent.span_id)
        assert parent.start_time <= s.start_time <= s.end_time <= parent.end_time
