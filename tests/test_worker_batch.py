"""The worker's batch state in one process (TP=1, no gRPC): Prefill/Decode equal
``Generator`` per request, filter/concatenate keep every request's tokens and KV
rows aligned, resumed requests continue exactly, capacity and validation."""

from __future__ import annotations

import pytest
import torch

from model.runner import load_model
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.batch import ShardBatch
from services.worker.kv_budget import GIB, kv_bytes_per_token, mem_available_bytes
from services.worker.shard import Shard
from tests.worker_cases import PROMPTS, SAMPLED, Tokens, mixed_batch, reference, request

KV_GIB = 0.001


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("glm-tiny", tp=1, seed=5))


@pytest.fixture
def shard(model):
    s = Shard(model, model_name="tiny", kv_memory_gib=KV_GIB)
    s.warmup(pb.WarmupRequest(max_batch_size=2, max_input_tokens=16, max_total_tokens=32))
    return s


def run_to_end(shard: Shard, batch: pb.Batch, tokens: Tokens) -> None:
    cached = tokens.add(shard.prefill(pb.PrefillRequest(batch=batch)))
    while cached is not None:
        cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached])))


def test_prefill_decode_equals_generator_per_request(shard, model):
    batch, tokens = mixed_batch(1), Tokens()
    run_to_end(shard, batch, tokens)
    for req in batch.requests:
        assert tokens.ids[req.id] == reference(model, req), req.id
        assert tokens.finish[req.id] in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert not shard.batches


def test_requests_join_and_leave_without_changing_tokens(shard, model):
    a = pb.Batch(id=1, requests=[request(1, PROMPTS["mask"], 8), request(2, PROMPTS["long_gmask"], 8),
                                 request(3, PROMPTS["gmask"], 8, **SAMPLED)])
    b = pb.Batch(id=2, requests=[request(4, PROMPTS["mid_mask"], 6), request(5, PROMPTS["gmask"], 7)])
    tokens = Tokens()
    cached = tokens.add(shard.prefill(pb.PrefillRequest(batch=a)))
    cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached])))
    new = tokens.add(shard.prefill(pb.PrefillRequest(batch=b)))             # joins between steps
    cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached, new])))
    assert list(cached.request_ids) == [1, 2, 3, 4, 5] and cached.id == 1
    cached = shard.filter_batch(pb.FilterBatchRequest(batch_id=1, keep_request_ids=[5, 1, 3, 4])).batch
    assert list(cached.request_ids) == [1, 3, 4, 5]                          # row order kept
    while cached is not None:
        cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached])))
    for req in [*a.requests, *b.requests]:
        want = reference(model, req)
        got = tokens.ids[req.id]
        assert got == want[: len(got)], req.id                               # 2 left early
        assert req.id == 2 or got == want


def test_filter_and_concatenate_move_block_tables_not_kv(model):
    """Paged: a join concatenates block tables and a leave gives its blocks back; no key or
    value moves (the pool's contents are the same before and after). Without the prompt
    cache, so that a row's blocks are its own."""
    shard = Shard(model, model_name="tiny", kv_memory_gib=KV_GIB, prompt_cache=False)
    shard.warmup(pb.WarmupRequest(max_batch_size=2, max_input_tokens=16, max_total_tokens=32))
    shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[
        request(1, PROMPTS["mask"], 9), request(2, PROMPTS["long_gmask"], 9)])))
    shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=2, requests=[request(3, PROMPTS["gmask"], 9)])))
    pool = shard.pool
    a, b = shard.batches[1], shard.batches[2]
    tables = a.cache.tables + b.cache.tables
    used, keys = pool.used_blocks, pool.keys.clone()
    merged = ShardBatch.concatenate([a, b])
    assert merged.request_ids == [1, 2, 3] and merged.pending.tolist() == a.pending.tolist() + b.pending.tolist()
    assert merged.cache.tables == tables and pool.used_blocks == used
    kept = merged.filter([3, 1])
    assert kept.request_ids == [1, 3] and kept.cache.tables == [tables[0], tables[2]]
    assert pool.used_blocks == used - len(tables[1])                      # row 2's blocks are back
    torch.testing.assert_close(pool.keys, keys, rtol=0, atol=0, equal_nan=True)   # free slots hold garbage
    assert kept.sampler.params == [merged.sampler.params[0], merged.sampler.params[2]]
    assert kept.max_tokens == sum(map(len, kept.cache.tables)) * pool.block_size
    assert kept.filter([]) is None and pool.used_blocks == 0
    with pytest.raises(InvalidArgument, match="unknown request id"):
        merged.filter([9])


def test_a_decode_admits_new_requests_in_the_same_forward(shard, model):
    """Decode with ``admit``: the running rows and the new requests go through one forward,
    and every request still gets exactly the reference tokens."""
    a = pb.Batch(id=1, requests=[request(1, PROMPTS["mask"], 8), request(2, PROMPTS["gmask"], 8, **SAMPLED)])
    b = pb.Batch(id=2, requests=[request(3, PROMPTS["long_gmask"], 6), request(4, PROMPTS["mid_mask"], 7)])
    tokens = Tokens()
    cached = tokens.add(shard.prefill(pb.PrefillRequest(batch=a)))
    cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached])))
    steps = shard.steps
    cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached], admit=b)))
    assert shard.steps == steps + 1 and list(cached.request_ids) == [1, 2, 3, 4] and cached.id == 1
    assert {g for g in tokens.ids} == {1, 2, 3, 4}
    while cached is not None:
        cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached])))
    for req in [*a.requests, *b.requests]:
        assert tokens.ids[req.id] == reference(model, req), req.id
    first = tokens.add(shard.decode(pb.DecodeRequest(admit=pb.Batch(id=5, requests=[request(6, PROMPTS["gmask"], 3)]))))
    assert first.id == 5 and len(tokens.ids[6]) == 1                        # admit alone: a prefill
    shard.clear_cache(pb.ClearCacheRequest())
    assert shard.pool.used_blocks == 0
    shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=6, requests=[request(7, PROMPTS["gmask"])])))
    with pytest.raises(InvalidArgument, match="request id 7 is already in cached batch 6"):
        shard.decode(pb.DecodeRequest(admit=pb.Batch(id=7, requests=[request(7, PROMPTS["gmask"])])))
    with pytest.raises(InvalidArgument, match="batch 6 is already cached"):
        shard.decode(pb.DecodeRequest(admit=pb.Batch(id=6, requests=[request(8, PROMPTS["gmask"])])))


def test_resumed_request_continues_exactly(shard, model):
    for ids in (PROMPTS["mask"], PROMPTS["long_gmask"]):
        want = reference(model, request(1, ids, 7))
        tokens = Tokens()
        run_to_end(shard, pb.Batch(id=3, requests=[request(7, ids, 7, generated=want[:3])]), tokens)
        assert tokens.ids[7] == want[3:] and len(want) == 7


def test_resumed_sampled_request_makes_the_same_draws(shard, model):
    # each draw depends on (seed, step) only, so a pool resuming a sampled request after
    # another pool died continues exactly as the uninterrupted run would have
    sampled = dict(temperature=1.3, top_k=200, seed=77)
    want = reference(model, request(1, PROMPTS["gmask"], 8, **sampled))
    tokens = Tokens()
    run_to_end(shard, pb.Batch(id=8, requests=[request(9, PROMPTS["gmask"], 8, generated=want[:4], **sampled)]),
               tokens)
    assert tokens.ids[9] == want[4:] and len(set(want)) > 1


def test_min_new_tokens_and_top_logprobs(shard):
    reply = shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=4, requests=[
        request(1, PROMPTS["gmask"], 3, top_n=3, min_new=3)])))
    g = reply.generations[0]
    assert len(g.top_tokens) == 3 and g.top_tokens[0].logprob >= g.top_tokens[1].logprob >= g.top_tokens[2].logprob
    assert g.logprob <= 0 and g.generated_tokens == 1 and g.token_id not in (150005, 20002)


def test_capacity_from_kv_memory_and_refusal(shard, model):
    per_token = kv_bytes_per_token(model.config, 1, torch.float32)
    assert per_token == 2 * 2 * 64 * 4
    block = shard.pool.block_size
    assert shard.capacity == int(KV_GIB * GIB) // (per_token * block) * block == shard.pool.num_blocks * block
    too_many = [request(i, [20100 + i] * 200 + [150001], 4) for i in range(1, 8)]   # distinct: none shared
    with pytest.raises(ResourceExhausted, match="the step needs 91 blocks of 16 tokens, 65 of 65 are free"):
        shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=5, requests=too_many)))
    assert not shard.batches and shard.pool.used_blocks == 0                  # refused before any work
    assert mem_available_bytes() > 0


def test_prefill_before_warmup_is_refused(model):
    with pytest.raises(FailedPrecondition, match="Warmup"):
        Shard(model, model_name="t").prefill(pb.PrefillRequest(batch=mixed_batch(1)))


@pytest.mark.parametrize("req, message", [
    (request(1, [20100, 20200]), "no mask id"),
    (request(1, [20100, 150001, 150528]), "outside the vocabulary"),
    (request(1, [20100] * 600 + [150001]), "too long"),
    (request(1, PROMPTS["gmask"], 0), "max_new_tokens must be >= 1"),
    (request(1, PROMPTS["gmask"], temperature=-1.0), "temperature"),
    (request(1, PROMPTS["gmask"], top_p=1.5), "top_p"),
    (request(1, PROMPTS["gmask"], repetition_penalty=0.0), "repetition_penalty"),
    (request(1, PROMPTS["gmask"], 3, generated=[20100, 20101, 20102]), "nothing left to generate"),
    (request(1, PROMPTS["gmask"], 3, generated=[150005]), "end token"),
    (request(1, PROMPTS["gmask"], top_n=21), "top_logprobs"),
])
def test_malformed_requests_name_the_problem(model, req, message):
    with pytest.raises(InvalidArgument, match=message):
        ShardBatch.from_pb(pb.Batch(id=1, requests=[req]), model.config)


def test_malformed_batches(shard):
    with pytest.raises(InvalidArgument, match="empty batch"):
        shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=1)))
    with pytest.raises(InvalidArgument, match="appears twice"):
        shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request(1, PROMPTS["mask"])] * 2)))
    with pytest.raises(InvalidArgument, match="unknown batch id 42"):
        shard.decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=42)]))
    with pytest.raises(InvalidArgument, match="unknown batch id 42"):
        shard.filter_batch(pb.FilterBatchRequest(batch_id=42))
    shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request(1, PROMPTS["mask"])])))
    with pytest.raises(InvalidArgument, match="already cached"):
        shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request(2, PROMPTS["mask"])])))
    with pytest.raises(InvalidArgument, match="already in cached batch 1"):
        shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=2, requests=[request(1, PROMPTS["mask"])])))
    with pytest.raises(InvalidArgument, match="holds requests"):
        shard.decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=1, request_ids=[9])]))
    shard.clear_cache(pb.ClearCacheRequest(batch_id=1))
    assert not shard.batches
