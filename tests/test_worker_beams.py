"""Beam search on the worker (TP=1, no gRPC): a beam request is a group of rows of the
running batch that fork (sharing their KV blocks until they write) and die; its candidates
equal ``glm generate``'s beam search (``Generator.beam_search``) with other requests in the
batch, joining and leaving; its blocks go back when it ends or is filtered out."""

from __future__ import annotations

import pytest

from model.generation import GenerationOptions, Generator
from model.prompt import Blank
from model.runner import load_model
from services.common.errors import InvalidArgument
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.shard import Shard
from tests.worker_cases import PROMPTS, SAMPLED, Tokens, reference, request

BEAMS = {
    "deterministic": dict(num_beams=3, no_repeat_ngram_size=2, deterministic=True),
    "seeded": dict(num_beams=4, length_penalty=0.6, seed=11),
}


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("glm-tiny", tp=1, seed=5))


@pytest.fixture
def shard(model):
    s = Shard(model, model_name="tiny", kv_memory_gib=0.002)
    s.warmup(pb.WarmupRequest(max_batch_size=8, max_input_tokens=24, max_total_tokens=48))
    return s


def beam_request(rid: int, ids: list[int], max_new: int, min_new: int = 0, **beam) -> pb.Request:
    req = pb.Request(id=rid, input_ids=ids, sampling=pb.SamplingParameters(greedy=True),
                     stopping=pb.StoppingCriteria(max_new_tokens=max_new, min_new_tokens=min_new))
    req.beam.CopyFrom(pb.BeamParameters(**beam))
    return req


def generate_beams(model, req: pb.Request) -> list[tuple[list[int], float]]:
    """What ``glm generate --num-beams`` gives for ``req`` (dense cache, batch of one)."""
    b = req.beam
    opts = GenerationOptions(max_new_tokens=req.stopping.max_new_tokens, min_new_tokens=req.stopping.min_new_tokens,
                             num_beams=b.num_beams, length_penalty=b.length_penalty,
                             no_repeat_ngram_size=b.no_repeat_ngram_size, beam_deterministic=b.deterministic,
                             beam_seed=b.seed if b.HasField("seed") else None)
    return Generator(model).beam_search(Blank.first(list(req.input_ids)), opts).candidates


class Collected(Tokens):
    def __init__(self) -> None:
        super().__init__()
        self.candidates: dict[int, list[tuple[list[int], float]]] = {}

    def add(self, reply):
        for g in reply.generations:
            if g.candidates:
                self.candidates[g.request_id] = [(list(c.token_ids), c.score) for c in g.candidates]
        return super().add(reply)


@pytest.mark.parametrize("beam", BEAMS.values(), ids=BEAMS.keys())
def test_beams_in_a_running_batch_equal_glm_generate(shard, model, beam):
    """A beam request admitted into a running batch (one forward with the others), beside a
    sampled and a greedy request and a second beam search that joins later."""
    others = [request(1, PROMPTS["mask"], 9), request(2, PROMPTS["long_gmask"], 7, **SAMPLED)]
    first = beam_request(3, PROMPTS["gmask"], 6, min_new=2, **beam)
    later = beam_request(4, PROMPTS["mid_mask"], 5, num_beams=2, seed=5)
    got = Collected()
    cached = got.add(shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=others))))
    cached = got.add(shard.decode(pb.DecodeRequest(batches=[cached], admit=pb.Batch(id=2, requests=[first]))))
    k = beam["num_beams"]
    assert cached.size == 2 + k and list(cached.request_ids) == [1, 2, 3]   # forked by its prefill's step
    cached = got.add(shard.decode(pb.DecodeRequest(batches=[cached], admit=pb.Batch(id=3, requests=[later]))))
    assert cached.size == 2 + k + 2 and list(cached.request_ids) == [1, 2, 3, 4]
    while cached is not None:
        cached = got.add(shard.decode(pb.DecodeRequest(batches=[cached])))
    for req in others:
        assert got.ids[req.id] == reference(model, req)
    for req in (first, later):
        want = generate_beams(model, req)
        assert len(want) == req.beam.num_beams
        assert [ids for ids, _ in got.candidates[req.id]] == [ids for ids, _ in want]
        # fp32 rounding apart: the packed paged forward sums in another order than the dense one
        assert [s for _, s in got.candidates[req.id]] == pytest.approx([s for _, s in want], rel=2e-5)
    assert shard.pool.used_blocks == shard.engine.prompts.blocks             # only the recent contexts stay


def test_forked_beams_share_the_context_blocks(shard):
    ids = [20000 + 3 * i for i in range(19)] + [150001]          # 21 tokens with sop: two blocks
    cached = shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[
        beam_request(1, ids, 8, num_beams=4, deterministic=True)]))).batch
    pool, tables = shard.pool, shard.batches[cached.id].cache.tables          # forked by the prefill's step
    assert len(tables) == 4 and pool.used_blocks == 2 + 1                    # and the prompt cache's copy
    assert pool.refs[tables[0][1]] == 4 and pool.refs[tables[0][0]] == 4 + 1  # the full block: the cache's too
    cached = shard.decode(pb.DecodeRequest(batches=[cached])).batch           # each beam writes its token
    tables = shard.batches[cached.id].cache.tables
    assert len(tables) == 4 and len({t[0] for t in tables}) == 1             # the full first block: shared
    assert pool.refs[tables[0][0]] == 4 + 1                                  # four beams and the prompt cache
    assert pool.used_blocks == 1 + 4 + 1           # the written last block: one each, and the cached one
    assert shard.filter_batch(pb.FilterBatchRequest(batch_id=cached.id, keep_request_ids=[])).batch.size == 0
    assert pool.used_blocks == shard.engine.prompts.blocks == 2              # the context, for a next request
    shard.clear_cache(pb.ClearCacheRequest())
    assert pool.used_blocks == 0


def test_beam_requests_are_validated(shard):
    bad = {
        "num_beams": beam_request(1, PROMPTS["gmask"], 4, num_beams=1),
        "generated_ids": beam_request(1, PROMPTS["gmask"], 4, num_beams=2),
        "logprobs": beam_request(1, PROMPTS["gmask"], 4, num_beams=2),
    }
    bad["generated_ids"].generated_ids.extend([20100])
    bad["logprobs"].logprobs = True
    for field, req in bad.items():
        with pytest.raises(InvalidArgument, match=field) as err:
            shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[req])))
        assert err.value.request_id == 1
    assert not shard.batches and shard.pool.used_blocks == 0


def test_samples_of_one_prompt_share_its_blocks_and_equal_single_requests(shard, model):
    """n samples admitted together (the gateway's ``{id}#{i}`` requests): the prompt is
    prefilled once, its blocks shared; each sample's tokens are the single request's."""
    ids = [20000 + 3 * i for i in range(19)] + [150001]          # 21 tokens with sop: two blocks
    samples = [request(10 + i, ids, 6, temperature=0.9, top_p=0.95, seed=1000 + i) for i in range(3)]
    got = Collected()
    cached = got.add(shard.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=samples))))
    tables = shard.batches[cached.id].cache.tables
    assert shard.pool.used_blocks == 2 + 1 and all(t == tables[0] for t in tables)   # + the cache's copy
    while cached is not None:
        cached = got.add(shard.decode(pb.DecodeRequest(batches=[cached])))
    streams = [got.ids[r.id] for r in samples]
    for req, tokens in zip(samples, streams):
        assert tokens == reference(model, req)
    assert len({tuple(t) for t in streams}) > 1                  # the seeds do differ
    assert shard.pool.used_blocks == shard.engine.prompts.blocks == 2
