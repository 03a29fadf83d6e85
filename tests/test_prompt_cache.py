"""The worker's prompt cache (``model.paged_kv.PromptCache``, TP=1, no gRPC): a request
whose whole context was prefilled before reads its keys and values from the pool and feeds
only ``sop`` (one token, as a decode row), and still gets exactly the tokens ``glm generate``
gives; a resumed row prefills as before; the cache gives its blocks back, least recent first,
when a step needs them, and a full ClearCache empties it."""

from __future__ import annotations

import pytest

from model.runner import load_model
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.shard import Shard
from tests.worker_cases import PROMPTS, SAMPLED, Tokens, reference, request


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("glm-tiny", tp=1, seed=5))


@pytest.fixture
def shard(model):
    s = Shard(model, model_name="tiny", kv_memory_gib=0.001)
    s.warmup(pb.WarmupRequest(max_batch_size=4, max_input_tokens=24, max_total_tokens=48))
    return s


class Fed:
    """Counts the tokens every forward of ``model`` is fed."""

    def __init__(self, model, monkeypatch) -> None:
        self.counts: list[int] = []
        real = model.step_logits
        monkeypatch.setattr(model, "step_logits", lambda ids, pos, step: self.counts.append(len(ids)) or
                            real(ids, pos, step))


def run(shard: Shard, batch_id: int, requests, tokens: Tokens, running=None):
    cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[running] if running else [],
                                                      admit=pb.Batch(id=batch_id, requests=requests))))
    while cached is not None:
        cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached])))


def test_a_cached_context_feeds_only_sop_and_gives_the_same_tokens(shard, model, monkeypatch):
    first = [request(1, PROMPTS["long_gmask"], 6), request(2, PROMPTS["mid_mask"], 5, **SAMPLED)]
    again = [request(3, PROMPTS["long_gmask"], 6), request(4, PROMPTS["mid_mask"], 5, **SAMPLED),
             request(5, PROMPTS["mask"], 4)]                       # this one is new
    tokens, fed = Tokens(), Fed(model, monkeypatch)
    run(shard, 1, first, tokens)
    prompts = shard.engine.prompts
    assert len(prompts.entries) == 2 and prompts.hits == 0
    fed.counts.clear()
    run(shard, 2, again, tokens)
    assert prompts.hits == 2
    assert fed.counts[0] == 1 + 1 + len(PROMPTS["mask"]) + 1       # two sop tokens, one whole prompt
    for req in first + again:
        assert tokens.ids[req.id] == reference(model, req), req.id
    assert tokens.ids[3] == tokens.ids[1] and tokens.ids[4] == tokens.ids[2]


def test_a_resumed_row_prefills_its_generated_ids(shard, model, monkeypatch):
    tokens, fed = Tokens(), Fed(model, monkeypatch)
    run(shard, 1, [request(1, PROMPTS["gmask"], 6)], tokens)
    want = reference(model, request(1, PROMPTS["gmask"], 6))
    fed.counts.clear()
    run(shard, 2, [request(2, PROMPTS["gmask"], 6, generated=want[:2])], tokens)
    assert fed.counts[0] == len(PROMPTS["gmask"]) + 1 + 2 and shard.engine.prompts.hits == 0
    assert tokens.ids[2] == want[2:]


def test_the_cache_gives_way_to_a_step_that_needs_its_blocks(shard):
    pool, prompts = shard.pool, shard.engine.prompts
    tokens = Tokens()
    contexts = [[20000 + 40 * k + i for i in range(18)] + [150001] for k in range(pool.num_blocks)]
    k = 0
    while pool.free_blocks >= 3:                                   # fill the pool with cached contexts
        run(shard, 10 + k, [request(100 + k, contexts[k], 1)], tokens)
        k += 1
    assert len(prompts.entries) == k and pool.used_blocks == prompts.blocks > pool.num_blocks - 3
    oldest = next(iter(prompts.entries))
    big = [request(200 + i, contexts[-1 - i], 8) for i in range(2)]           # needs more than is free
    run(shard, 99, big, tokens)
    assert all(len(tokens.ids[r.id]) == 8 for r in big)            # served, not refused
    assert oldest not in prompts.entries and len(prompts.entries) < k + 2
    shard.clear_cache(pb.ClearCacheRequest())
    assert not prompts.entries and pool.used_blocks == 0
