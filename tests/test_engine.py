"""The one decoding engine (``model.engine``): ``glm generate``'s path (``Generator``)
and the worker's path (``Shard`` Prefill/Decode) step the same rows through the same
``Engine.step`` and get the same tokens, log-probs and finish reasons; the step's
rules (min_new_tokens ban, stop, length, rows leaving); a cache other than
``KVCache`` plugs in through the factory."""

from __future__ import annotations

import pytest
import torch

from model.config import EOP_ID, EOS_ID, GMASK_ID
from model.engine import LENGTH, STOP, Batch, Engine, RequestState, UnknownRequest, allowed_new_tokens
from model.generation import GenerationOptions, Generator
from model.kv_cache import KVCache
from model.prompt import Blank
from model.runner import load_model
from model.sampling import Sampler, SamplingParams
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.shard import Shard
from tests.worker_cases import PROMPTS, Tokens, request

SEEDED = dict(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.2, seed=11)
PROMPTS = dict(PROMPTS, near_limit=[20100 + i % 50 for i in range(505)] + [GMASK_ID])   # room for 5 tokens
ROWS = [("mask", {"greedy": True}), ("long_gmask", SEEDED), ("mid_mask", {"greedy": True}),
        ("gmask", dict(SEEDED, seed=12)), ("near_limit", {"greedy": True})]
MAX_NEW, MIN_NEW = 7, 2


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("glm-tiny", tp=1, seed=5))


@pytest.fixture
def steps(monkeypatch):
    """Every ``Engine.step`` call: (request ids stepped, tokens chosen)."""
    seen: list[tuple[list[int], list[int]]] = []
    plain = Engine.step

    def step(self, batch, logits):
        out = plain(self, batch, logits)
        seen.append(([t.request.id for t in out.tokens], [t.token_id for t in out.tokens]))
        return out

    monkeypatch.setattr(Engine, "step", step)
    return seen


def generate_path(model):
    blanks = [Blank.first(PROMPTS[name]) for name, _ in ROWS]
    params = [SamplingParams(**p) for _, p in ROWS]
    options = GenerationOptions(max_new_tokens=MAX_NEW, min_new_tokens=MIN_NEW)
    return Generator(model).sample(blanks, params, options)


def worker_path(model, steps):
    shard = Shard(model, model_name="tiny", kv_memory_gib=0.01)
    shard.warmup(pb.WarmupRequest(max_batch_size=1, max_input_tokens=8, max_total_tokens=10))
    steps.clear()                                                    # the warm-up's steps
    batch = pb.Batch(id=1, requests=[request(i, PROMPTS[name], MAX_NEW, min_new=MIN_NEW, **p)
                                     for i, (name, p) in enumerate(ROWS)])
    tokens = Tokens()
    cached = tokens.add(shard.prefill(pb.PrefillRequest(batch=batch)))
    while cached is not None:
        cached = tokens.add(shard.decode(pb.DecodeRequest(batches=[cached])))
    return tokens


def test_generate_and_worker_paths_step_the_same_rows_through_one_engine(model, steps):
    done = generate_path(model)
    generate_steps = list(steps)
    got = worker_path(model, steps)
    assert steps == generate_steps and len(generate_steps) == MAX_NEW
    assert [len(ids) for ids, _ in steps] == [5] * 5 + [4] * 2          # near_limit leaves after 5
    reasons = {STOP: pb.FINISH_REASON_STOP, LENGTH: pb.FINISH_REASON_LENGTH}
    for row, completion in enumerate(done):
        assert got.ids[row] == completion.token_ids
        # The worker pages its cache (model.paged_kv), glm generate keeps it dense: the same
        # arithmetic summed in another fp32 order (7e-6 seen).
        assert got.logprobs[row] == pytest.approx(completion.logprobs, abs=2e-5)
        assert got.finish[row] == reasons[completion.finish_reason]
        assert MIN_NEW <= len(completion.token_ids) <= MAX_NEW
    assert len({tuple(c.token_ids) for c in done}) > 1


def test_allowed_new_tokens_rule():
    blank = Blank.first([20100] * 5 + [GMASK_ID])                  # context + sop = 7 tokens
    assert allowed_new_tokens(blank, 4, 16) == 4
    assert allowed_new_tokens(blank, 40, 16) == 9
    assert allowed_new_tokens(blank, 4, 6) == 0
    with pytest.raises(ValueError, match="nothing left to generate"):
        RequestState(1, blank, SamplingParams(), allowed=2, generated=[20100, 20101])
    with pytest.raises(ValueError, match="end token"):
        RequestState(1, blank, SamplingParams(), allowed=5, generated=[EOS_ID])


def test_step_bans_ends_below_min_new_then_stops_and_drops_finished_rows(model):
    blank = Blank.first(PROMPTS["gmask"])
    rows = [RequestState(1, blank, SamplingParams(greedy=True), allowed=5, min_new=1),   # eop banned
            RequestState(2, blank, SamplingParams(greedy=True), allowed=5),              # stops on eop
            RequestState(3, blank, SamplingParams(greedy=True), allowed=1, top_n=2)]     # length
    batch = Batch(7, rows, model.new_cache(3, 2), Sampler([r.params for r in rows]))
    logits = torch.zeros((3, model.config.vocab_size))
    logits[:, EOP_ID], logits[:, 20100], logits[:, 20200] = 9.0, 5.0, 4.0
    logits[2, EOP_ID] = 0.0
    out = Engine(model).step(batch, logits)
    assert [(t.request.id, t.token_id, t.finish_reason) for t in out.tokens] == [
        (1, 20100, None), (2, EOP_ID, STOP), (3, 20100, LENGTH)]
    assert [t.generated_tokens for t in out.tokens] == [1, 1, 1]
    assert [i for i, _ in out.tokens[2].top_tokens] == [20100, 20200] and out.tokens[0].top_tokens == ()
    assert out.tokens[1].logprob == pytest.approx(float(torch.log_softmax(logits[1], -1)[EOP_ID]))
    assert out.batch.request_ids == [1] and out.batch.id == 7 and out.batch.pending.tolist() == [20100]
    assert out.batch.cache.capacity >= out.batch.width + out.batch.max_remaining
    with pytest.raises(UnknownRequest, match="unknown request id"):
        out.batch.filter([2])


class ForwardingCache:
    """A ``DecodeCache`` that is not a ``KVCache``: forwards to one and counts the calls."""

    calls: list[str] = []

    def __init__(self, inner: KVCache) -> None:
        self.inner = inner

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def extend(self, valid, prefix):
        ForwardingCache.calls.append("extend")
        return self.inner.extend(valid, prefix)

    def write(self, layer, key, value):
        return self.inner.write(layer, key, value)

    def reserve(self, extra: int) -> None:
        self.inner.reserve(extra)

    def select(self, rows) -> "ForwardingCache":
        ForwardingCache.calls.append("select")
        return ForwardingCache(self.inner.select(rows))

    @staticmethod
    def concatenate(caches) -> "ForwardingCache":
        return ForwardingCache(KVCache.concatenate([c.inner for c in caches]))


def test_another_cache_plugs_in_through_the_factory(model):
    blanks = [Blank.first(PROMPTS[name]) for name in ("mask", "long_gmask")]
    params = [SamplingParams(greedy=True), SamplingParams(**SEEDED)]
    options = GenerationOptions(max_new_tokens=5)
    plain = Generator(model).sample(blanks, params, options)
    ForwardingCache.calls = []
    engine = Engine(model, new_cache=lambda rows, capacity: ForwardingCache(model.new_cache(rows, capacity)))
    plugged = Generator(model, engine).sample(blanks, params, options)
    assert [c.token_ids for c in plugged] == [c.token_ids for c in plain]
    assert [c.logprobs for c in plugged] == [c.logprobs for c in plain]
    assert ForwardingCache.calls.count("extend") == max(len(c.token_ids) for c in plain)
    beams = Generator(model, engine).beam_search(blanks[0], GenerationOptions(max_new_tokens=4, num_beams=2,
                                                                             beam_deterministic=True))
    assert beams.token_ids == Generator(model).beam_search(
        blanks[0], GenerationOptions(max_new_tokens=4, num_beams=2, beam_deterministic=True)).token_ids
    assert "select" in ForwardingCache.calls


def test_logprobs_only_for_the_rows_that_ask_and_the_ban_leaves_the_logits_alone(model, monkeypatch):
    """A row that asked for neither logprobs nor top logprobs costs no log-softmax: the
    step computes it over the asking rows only, and their values equal the raw fp32
    log-softmax; the min_new_tokens ban is undone in the logits afterwards."""
    calls = []
    plain = torch.log_softmax

    def counted(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return plain(x, *args, **kwargs)

    engine = Engine(model)
    reqs = [RequestState(i, Blank.first(PROMPTS[name]), SamplingParams(greedy=True), 4, min_new=2,
                         top_n=top_n, logprobs=lp)
            for i, (name, lp, top_n) in enumerate([("mask", False, 0), ("gmask", True, 0),
                                                   ("mid_mask", False, 3), ("long_gmask", False, 0)])]
    batch = Batch(1, reqs)
    logits = engine.prefill_logits(batch)
    batch.sampler = Sampler([r.params for r in reqs])
    before = logits.clone()
    monkeypatch.setattr(torch, "log_softmax", counted)
    out = engine.step(batch, logits)
    assert calls == [(2, logits.shape[1])]                              # rows 1 and 2 only
    assert torch.equal(logits, before)
    raw = plain(before.float(), dim=-1)
    by_row = {t.request.id: t for t in out.tokens}
    assert by_row[0].logprob == 0.0 and by_row[3].logprob == 0.0 and by_row[0].top_tokens == ()
    assert by_row[1].logprob == pytest.approx(raw[1, by_row[1].token_id].item(), abs=0)
    assert [i for i, _ in by_row[2].top_tokens] == raw[2].topk(3).indices.tolist()
    banned = before.clone()
    banned[:, [EOP_ID, EOS_ID]] = -float("inf")
    assert [t.token_id for t in out.tokens] == banned.argmax(-1).tolist()
