"""Static-shape paged decode (``model.cuda_graphs``): over padded buckets, fixed-width block
tables and device lengths, it gives the eager paged step's logits (fp32, within 1e-5 of the
logits' scale: the fixed width only changes the summation order) and tokens for mixed
lengths, both mask kinds, rows leaving and a batch joining; padding rows touch nothing but
the scratch block; it falls back to the eager step where its shapes do not fit; capture
happens only on CUDA; the worker builds it over its pool at Warmup."""

from __future__ import annotations

import pytest
import torch

from model.cuda_graphs import PagedDecodeGraphs, batch_buckets
from model.engine import Batch, Engine, RequestState
from model.paged_kv import BlockPool
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


def pool_of(model, blocks=48, block_size=4, scratch=True):
    c = model.config
    return BlockPool(c.num_layers, blocks, block_size, c.num_attention_heads, c.head_dim,
                     dtype=model.dtype, device=model.device, scratch=scratch)


def new_batch(batch_id: int, rows, first_id: int = 0) -> Batch:
    reqs = [RequestState(first_id + i, Blank.first(PROMPTS[name]), SamplingParams(greedy=True), allowed=n)
            for i, (name, n) in enumerate(rows)]
    return Batch(batch_id, reqs)


class Recorder:
    """A paged engine (with ``graphs`` when given) whose step logits are recorded."""

    def __init__(self, model, graphs: PagedDecodeGraphs | None = None) -> None:
        self.pool = graphs.pool if graphs is not None else pool_of(model)
        self.engine = Engine(model, pool=self.pool)
        self.engine.graphs = graphs
        self.logits: list[torch.Tensor] = []
        plain = self.engine.step

        def step(batch, logits):
            self.logits.append(logits.float().clone())
            return plain(batch, logits)

        self.engine.step = step

    def run(self, *, join_at: int | None = None) -> list[list[int]]:
        """Decode ``ROWS`` to the end (a second batch joins at step ``join_at``, admitted in
        a step of its own); every request's tokens, by request id."""
        first = self.engine.prefill(new_batch(1, ROWS))
        batch, done, step = first.batch, {t.request.id: t.request for t in first.tokens}, 0
        while batch is not None:
            step += 1
            if step == join_at:
                joined = self.engine.prefill(new_batch(2, ROWS[:2], first_id=10))
                done.update({t.request.id: t.request for t in joined.tokens})
                batch = Batch.concatenate([batch, joined.batch])
            batch = self.engine.decode(batch).batch
        assert self.pool.used_blocks == 0                      # every row gave its blocks back
        return [done[i].generated for i in sorted(done)]


def check_same(model, graphs: PagedDecodeGraphs, **run) -> None:
    eager, static = Recorder(model), Recorder(model, graphs)
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


def test_static_decode_equals_the_eager_paged_step(model):
    graphs = PagedDecodeGraphs(model, pool_of(model), max_batch=8)
    assert graphs.buckets == (1, 2, 4, 8) and not graphs.use_graphs
    assert graphs.width == -(-model.config.max_sequence_length // 4)
    check_same(model, graphs, join_at=2)
    # 5 rows pad to bucket 8, 7 after the join, then fewer as rows leave: every decode step static
    assert graphs.stats.eager == 0 and graphs.stats.static > 3 and graphs.stats.replayed == 0
    assert graphs.captured == ()


def test_padding_rows_write_only_the_scratch_block(model):
    """A step of 3 rows in bucket 4: the fourth row's keys land in the scratch block, and no
    block outside the rows' tables changes."""
    pool = pool_of(model)
    graphs = PagedDecodeGraphs(model, pool, max_batch=4)
    engine = Engine(model, pool=pool)
    engine.graphs = graphs
    batch = engine.prefill(new_batch(1, ROWS[:3])).batch
    held = {b for table in batch.cache.tables for b in table}

    def bits():                # compared bitwise: a block never allocated holds any bits, NaN among them
        return pool.blocks_view(pool.keys).view(torch.int32)

    keys = bits().clone()
    scratch_before = keys[:, :, pool.scratch_block].clone()
    batch = engine.decode(batch).batch
    after = bits()
    assert graphs.stats.static == 1
    changed = {b for b in range(pool.num_blocks) if not torch.equal(after[:, :, b], keys[:, :, b])}
    held |= {b for table in batch.cache.tables for b in table}
    assert changed and changed <= held
    assert not torch.equal(after[:, :, pool.scratch_block], scratch_before)
    assert torch.isfinite(pool.blocks_view(pool.keys)[:, :, pool.scratch_block]).all()
    batch.release()
    assert pool.used_blocks == 0


def test_shapes_that_do_not_fit_run_eagerly(model):
    """Above the largest bucket, or past the table width: the eager step, same result."""
    check_same(model, small := PagedDecodeGraphs(model, pool_of(model), max_batch=2))
    assert small.stats.static > 0 and small.stats.eager > 0              # 5 rows > bucket 2
    check_same(model, short := PagedDecodeGraphs(model, pool_of(model), max_batch=8, width=4))
    assert short.stats.static > 0 and short.stats.eager > 0              # the 16-token row outgrows 4 blocks of 4


def test_layer_timing_runs_eagerly(model):
    graphs = PagedDecodeGraphs(model, pool_of(model), max_batch=8)
    model.layer_observer = lambda layer, seconds: None
    try:
        check_same(model, graphs)
    finally:
        model.layer_observer = None
    assert graphs.stats.static == 0 and graphs.stats.eager > 0


def test_capture_only_on_cuda_and_a_scratch_block_is_needed(model):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        PagedDecodeGraphs(model, pool_of(model), max_batch=4, capture=True)
    graphs = PagedDecodeGraphs(model, pool_of(model), max_batch=4)       # auto: off on a CPU
    assert graphs.capture() == () and graphs.graphs == {}
    with pytest.raises(ValueError, match="scratch block"):
        PagedDecodeGraphs(model, pool_of(model, scratch=False), max_batch=4)


def serve_mixed_batch(shard: Shard) -> tuple[Tokens, pb.WarmupResponse]:
    warm = shard.warmup(pb.WarmupRequest(max_batch_size=8, max_input_tokens=20, max_total_tokens=40))
    tokens = Tokens()
    cached = tokens.add(shard.prefill(pb.PrefillRequest(batch=mixed_batch(1))))
    while cached is not None:
        cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached])))
    return tokens, warm


def test_the_worker_builds_its_graphs_over_the_pool_at_warmup(model):
    """``Shard(decode_graphs=True)``: Warmup sizes the pool (one block less: the scratch) and
    builds the static decode over it (captured only on CUDA); the served tokens are the
    eager worker's."""
    eager, plain_warm = serve_mixed_batch(plain := Shard(model, model_name="tiny", kv_memory_gib=0.01))
    static, warm = serve_mixed_batch(graphed := Shard(model, model_name="tiny", kv_memory_gib=0.01,
                                                      decode_graphs=True))
    assert static.ids == eager.ids and static.finish == eager.finish
    for rid, logprobs in eager.logprobs.items():
        assert static.logprobs[rid] == pytest.approx(logprobs, rel=1e-5, abs=2e-5)
    graphs = graphed.engine.graphs
    assert plain.engine.graphs is None and graphs is not None and graphs.captured == ()
    assert graphs.pool is graphed.pool and graphs.buckets == (1, 2, 4, 8) and graphs.stats.static > 3
    assert warm.kv_blocks == plain_warm.kv_blocks - 1 > 0 and warm.kv_block_size == plain_warm.kv_block_size
    assert warm.max_batch_total_tokens == warm.kv_blocks * warm.kv_block_size
    assert graphed.pool.scratch_block == warm.kv_blocks
    assert graphed.pool.used_blocks == graphed.engine.prompts.blocks       # rows gone; recent contexts kept


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replay_equals_the_eager_paged_step(checkpoint, dtype):
    from model.quantization import QuantSpec

    quant = QuantSpec(4) if dtype == torch.float16 else None
    model = load_model(checkpoint("glm-tiny", tp=1, seed=3), dtype=dtype, device="cuda", quant=quant)
    graphs = PagedDecodeGraphs(model, pool_of(model), max_batch=8)
    assert graphs.capture() == (1, 2, 4, 8)
    eager, static = Recorder(model), Recorder(model, graphs)
    assert static.run(join_at=2) == eager.run(join_at=2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(static.logits, eager.logits):
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert graphs.stats.replayed > 3 and graphs.stats.static == 0
