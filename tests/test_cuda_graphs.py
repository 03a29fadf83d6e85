"""Static-shape decode (``model.cuda_graphs``): over padded buckets, a fixed attention width
and a device slot index, it gives the normal decode's logits (fp32, within 1e-5 of the
logits' scale: the wider attention only changes the summation order) and tokens for
mixed lengths, both mask kinds, several steps, rows leaving and batches joining; it falls
back to the eager path where its shapes do not fit; capture happens only on CUDA."""

from __future__ import annotations

import pytest
import torch

from model.cuda_graphs import DecodeGraphs, batch_buckets
from model.engine import Batch, Engine, RequestState
from model.prompt import Blank
from model.runner import load_model
from model.sampling import SamplingParams
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.shard import Shard
from tests.worker_cases import PROMPTS, Tokens, mixed_batch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
# (prompt, max new tokens): [MASK] and [gMASK], lengths 4..16, rows leaving after 2..6 steps
ROWS = [("mask", 6), ("long_gmask", 3), ("gmask", 5), ("mid_mask", 2), ("gmask", 4)]


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("glm-tiny", tp=1, seed=3))


def new_batch(batch_id: int, rows, first_id: int = 0) -> Batch:
    reqs = [RequestState(first_id + i, Blank.first(PROMPTS[name]), SamplingParams(greedy=True), allowed=n)
            for i, (name, n) in enumerate(rows)]
    return Batch(batch_id, reqs)


class Recorder:
    """An engine whose decode logits are recorded, step by step."""

    def __init__(self, model, graphs: DecodeGraphs | None = None, *, prefill_in_arena: bool = False) -> None:
        self.engine = Engine(model, new_cache=graphs.new_cache if prefill_in_arena else None)
        self.engine.graphs = graphs
        self.logits: list[torch.Tensor] = []
        plain = self.engine.decode_logits

        def decode_logits(cache, tokens, positions):
            out = plain(cache, tokens, positions)
            self.logits.append(out.clone())
            return out

        self.engine.decode_logits = decode_logits

    def run(self, *, join_at: int | None = None) -> list[list[int]]:
        """Decode ``ROWS`` to the end (a second batch joins at step ``join_at``); every
        request's tokens, by request id."""
        first = self.engine.prefill(new_batch(1, ROWS))
        batch, done, step = first.batch, {t.request.id: t.request for t in first.tokens}, 0
        while batch is not None:
            step += 1
            if step == join_at:
                joined = self.engine.prefill(new_batch(2, ROWS[:2], first_id=10))
                done.update({t.request.id: t.request for t in joined.tokens})
                batch = Batch.concatenate([batch, joined.batch])
            batch = self.engine.decode(batch).batch
        return [done[i].generated for i in sorted(done)]


def check_same(model, graphs: DecodeGraphs, prefill_in_arena: bool = False, **run) -> None:
    eager, static = Recorder(model), Recorder(model, graphs, prefill_in_arena=prefill_in_arena)
    assert static.run(**run) == eager.run(**run)
    assert len(static.logits) == len(eager.logits) > 3
    for got, want in zip(static.logits, eager.logits):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(5) == (1, 2, 4, 5)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert batch_buckets(100) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 100)
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def test_static_decode_equals_the_normal_decode(model):
    graphs = DecodeGraphs(model, max_batch=8, slots=64)
    assert graphs.buckets == (1, 2, 4, 8) and not graphs.use_graphs
    check_same(model, graphs)
    # 5 rows pad to bucket 8, then 4, 2, 1 as rows leave: every step static, never captured
    assert graphs.stats.eager == 0 and graphs.stats.static > 3 and graphs.stats.replayed == 0
    assert graphs.stats.adopted == 5           # a copy into the arena at the first step and per change of rows
    assert graphs.captured == ()


def test_a_batch_prefilled_into_the_arena_is_not_copied(model):
    graphs = DecodeGraphs(model, max_batch=8, slots=64)
    check_same(model, graphs, prefill_in_arena=True)
    assert graphs.stats.eager == 0 and graphs.stats.adopted == 4       # only when rows leave


def test_a_joining_batch_moves_into_the_arena(model):
    graphs = DecodeGraphs(model, max_batch=8, slots=64)
    check_same(model, graphs, prefill_in_arena=True, join_at=2)   # joins while the arena is busy
    assert graphs.stats.eager == 0 and graphs.stats.adopted >= 3


def test_two_batches_decoded_in_turn_keep_their_own_keys(model):
    """The arena holds one batch; the one it held before gets its own copy, unchanged."""
    graphs = DecodeGraphs(model, max_batch=8, slots=64)
    eager, static = Engine(model), Engine(model)
    static.graphs = graphs
    pairs = []
    for engine in (eager, static):
        a = engine.prefill(new_batch(1, [("mask", 6), ("gmask", 6)])).batch
        b = engine.prefill(new_batch(2, [("long_gmask", 6)], first_id=5)).batch
        for _ in range(4):
            a, b = engine.decode(a).batch, engine.decode(b).batch
        pairs.append([r.generated for r in a.requests + b.requests])
    assert pairs[0] == pairs[1]
    assert graphs.stats.adopted >= 8 and graphs.stats.eager == 0


def test_shapes_that_do_not_fit_run_eagerly(model):
    """Above the largest bucket, or past the arena's slots: the normal path, same result."""
    check_same(model, small := DecodeGraphs(model, max_batch=2, slots=64))
    assert small.stats.static > 0 and small.stats.eager > 0              # 5 rows > bucket 2
    check_same(model, short := DecodeGraphs(model, max_batch=8, slots=18))
    assert short.stats.static > 0 and short.stats.eager > 0              # the 16-token row outgrows 18 slots


def test_layer_timing_runs_eagerly(model):
    graphs = DecodeGraphs(model, max_batch=8, slots=64)
    model.layer_observer = lambda layer, seconds: None
    try:
        check_same(model, graphs)
    finally:
        model.layer_observer = None
    assert graphs.stats.static == 0 and graphs.stats.eager > 0


def test_capture_only_on_cuda(model):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(model, max_batch=4, slots=32, capture=True)
    graphs = DecodeGraphs(model, max_batch=4, slots=32)                 # auto: off on a CPU
    assert graphs.capture() == () and graphs.graphs == {}
    with pytest.raises(ValueError, match="slots"):
        DecodeGraphs(model, max_batch=4, slots=1)


def serve_mixed_batch(shard: Shard) -> Tokens:
    shard.warmup(pb.WarmupRequest(max_batch_size=8, max_input_tokens=20, max_total_tokens=40))
    tokens = Tokens()
    cached = tokens.add(shard.prefill(pb.PrefillRequest(batch=mixed_batch(1))))
    while cached is not None:
        cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached])))
    return tokens


def test_the_worker_builds_its_graphs_at_warmup(model):
    """``Shard(decode_graphs=True)``: Warmup builds the static path (captured only on CUDA)
    and its arena comes out of the KV memory; the served tokens are the eager worker's."""
    eager = serve_mixed_batch(plain := Shard(model, model_name="tiny", kv_memory_gib=0.01))
    static = serve_mixed_batch(graphed := Shard(model, model_name="tiny", kv_memory_gib=0.01, decode_graphs=True))
    assert static.ids == eager.ids and static.finish == eager.finish
    for rid, logprobs in eager.logprobs.items():
        # fp32 rounding only: the static path attends over the arena's fixed width, whose
        # masked slots add exact zeros to sums taken in another order (about 5e-6 here)
        assert static.logprobs[rid] == pytest.approx(logprobs, rel=1e-5, abs=2e-5)
    graphs = graphed.engine.graphs
    assert plain.engine.graphs is None and graphs is not None and graphs.captured == ()
    assert graphs.buckets == (1, 2, 4, 8) and graphs.arena.slots == 40 and graphs.stats.static > 3
    assert graphed.capacity * graphed.kv_bytes_per_token <= 0.01 * 2**30 - graphs.nbytes()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replay_equals_eager_decode(checkpoint, dtype):
    from model.quantization import QuantSpec

    quant = QuantSpec(4) if dtype == torch.float16 else None
    model = load_model(checkpoint("glm-tiny", tp=1, seed=3), dtype=dtype, device="cuda", quant=quant)
    graphs = DecodeGraphs(model, max_batch=8, slots=64)
    assert graphs.capture() == (1, 2, 4, 8)
    eager, static = Recorder(model), Recorder(model, graphs)
    assert static.run(join_at=2) == eager.run(join_at=2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(static.logits, eager.logits):
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert graphs.stats.replayed > 3 and graphs.stats.static == 0
