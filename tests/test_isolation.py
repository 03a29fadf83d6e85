"""A request fails alone and every request ends (issue 10), against the real Redis and a
real TP=1 worker pool, requests XADDed as a client that skips the gateway would:

* a batch of ordinary requests plus one with temperature 1e-38 and one with
  repetition_penalty 1e-38 (values the gateway refuses; the workers refuse them too,
  before any forward, naming the row): the ordinary ones finish with exactly the
  output ``glm generate`` gives, the bad ones get an INVALID_ARGUMENT error naming the
  field, each is in the dead-letter stream once, and the pool stays up and serves the
  next request;
* "x [MASK] " x 100 with max_new_tokens 1 ends: 100 blanks, one token each;
* the same through the real stack (`glm serve`: gateway, scheduler, worker processes):
  the gateway refuses the poison values naming the field, the neighbours finish.

Verdicts on events and the dead-letter stream; ``HANG_S`` only turns a hang into a failure."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import pytest
import redis.asyncio as aioredis

from model.config import EOS_ID, GMASK_ID, MASK_ID
from model.generation import GenerationOptions, Generator
from model.prompt import prepare_text_ids
from model.runner import load_model
from model.sampling import SamplingParams
from model.tokenizer import GLMTokenizer
from services.client import AsyncGLMClient, GLMClient, GLMError
from services.common import redis_keys as keys
from services.common.messages import Event, QueuedRequest, Sampling
from services.common.net import free_port
from services.local import LocalStack
from services.local_options import ServeOptions
from services.scheduler.loop import LoopOptions, PoolLoop
from services.scheduler.policy import Limits
from services.worker.pool import start_pool
from redis_harness import url

pytestmark = [pytest.mark.redis, pytest.mark.processes, pytest.mark.slow]
REDIS_URL = url(__name__)
HANG_S = 120.0
GREEDY = Sampling(temperature=0.0, seed=7)
SAMPLED = Sampling(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=9)


@pytest.fixture(scope="module", autouse=True)
def _database(redis_db):
    return redis_db


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=3)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return GLMTokenizer.from_file(f"{ckpt}/ice_text.model")


@pytest.fixture(scope="module")
def pool(ckpt):
    handle = start_pool(ckpt, 1, dtype="float32", kv_memory_gib=0.004)
    yield handle
    handle.stop()


def generate(model, ids, sampling: Sampling, max_new: int) -> list[list[int]]:
    """What ``glm generate`` gives: the token ids of every blank."""
    params = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                            repetition_penalty=sampling.repetition_penalty, seed=sampling.seed)
    result = Generator(model).fill_blanks(list(ids), params, GenerationOptions(max_new_tokens=max_new))
    return [b.token_ids for b in result.blanks]


def blank_tokens(events: list[Event]) -> list[list[int]]:
    return [list(e.token_ids) for e in events if e.type == "blank"]


class Pool:
    """One scheduler loop (in this process) on a private model name, over ``pool``."""

    def __init__(self, pool, tokenizer) -> None:
        tag = uuid.uuid4().hex[:8]
        self.model = f"test-iso-{tag}"
        limits = Limits(max_batch_size=8, max_input_tokens=400, max_total_tokens=480)
        self.loop = PoolLoop(LoopOptions(redis_url=REDIS_URL, model=self.model, workers=tuple(pool.addresses),
                                         pool_id=f"pool-{tag}", limits=limits, idle_block_ms=20,
                                         shard_timeout_s=60),
                             decode=lambda ids: tokenizer.decode(ids, strict=False), max_sequence_length=512)
        self.redis = aioredis.from_url(REDIS_URL)
        self.task: asyncio.Future | None = None
        self.n = 0

    def request(self, ids, max_new, sampling=GREEDY) -> QueuedRequest:
        self.n += 1
        return QueuedRequest(id=f"{self.model}-{self.n}", model=self.model, prompt_ids=tuple(ids),
                             sampling=sampling, max_new_tokens=max_new)

    async def submit(self, *reqs: QueuedRequest) -> None:
        for req in reqs:
            await self.redis.xadd(keys.queue(self.model), {keys.FIELD: req.to_json()})

    async def events(self, rid: str) -> list[Event]:
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            events = [Event.from_json(f[b"d"]) for _, f in await self.redis.xrange(keys.events(rid))]
            if events and events[-1].terminal:
                return events
            if self.task.done():
                self.task.result()                     # the pool died: its exception is the failure
                raise AssertionError("the pool stopped")
            await asyncio.sleep(0.05)
        raise AssertionError(f"no terminal event for {rid} within {HANG_S} s")

    async def dead(self) -> list[dict]:
        return [json.loads(f[b"d"]) for _, f in await self.redis.xrange(keys.dead_letter(self.model))]

    async def run(self, body):
        self.task = asyncio.ensure_future(self.loop.run())
        try:
            return await body(self)
        finally:
            self.loop.stop()
            await asyncio.wait_for(self.task, 60)
            await self.redis.aclose()


def test_a_poison_request_fails_alone_and_the_pool_serves_on(pool, model, tokenizer):
    ordinary = [([20100, 20200, 20300, GMASK_ID], GREEDY, 6), ([20500, MASK_ID, 20600, EOS_ID], SAMPLED, 5),
                ([20700, 20800, GMASK_ID], SAMPLED, 7)]
    poison = {"temperature": Sampling(temperature=1e-38, seed=1),
              "repetition_penalty": Sampling(temperature=0.7, repetition_penalty=1e-38, seed=2)}

    async def body(p: Pool):
        good = [p.request(ids, n, s) for ids, s, n in ordinary]
        bad = {field: p.request([20100, 20900, GMASK_ID], 6, s) for field, s in poison.items()}
        await p.submit(good[0], bad["temperature"], good[1], bad["repetition_penalty"], good[2])
        streams = {r.id: await p.events(r.id) for r in good + list(bad.values())}
        after = p.request([20300, 20400, GMASK_ID], 5)              # the pool is still serving
        await p.submit(after)
        streams[after.id] = await p.events(after.id)
        return good, bad, after, streams, await p.dead(), p.task.done()

    good, bad, after, streams, dead, stopped = asyncio.run(Pool(pool, tokenizer).run(body))
    for req, (ids, sampling, n) in zip(good, ordinary):
        assert streams[req.id][-1].type == "final", streams[req.id][-1]
        assert blank_tokens(streams[req.id]) == generate(model, ids, sampling, n)
    for field, req in bad.items():
        error = streams[req.id][-1]
        assert error.type == "error" and error.code == "INVALID_ARGUMENT" and field in error.message
    assert streams[after.id][-1].type == "final"
    assert sorted(d["request_id"] for d in dead) == sorted(r.id for r in bad.values())   # once each
    assert not stopped


def test_x_mask_times_100_with_one_new_token_ends(pool, tokenizer):
    """The prompt's 100 blanks are filled, one token each, and the request ends, whatever
    the model generates (a generated [MASK] is content: tests/test_scheduler_policy.py
    forces the workers to generate only [MASK], which before issue 10 never ended)."""
    x = tokenizer.tokenize("x")
    ids = (x + [MASK_ID]) * 100 + [EOS_ID]

    async def body(p: Pool):
        req = p.request(ids, 1)
        await p.submit(req)
        return await p.events(req.id)

    events = asyncio.run(Pool(pool, tokenizer).run(body))
    final = events[-1]
    assert final.type == "final" and len(final.blanks) == 100 and final.generated_tokens == 100
    assert [len(b) for b in blank_tokens(events)] == [1] * 100


@pytest.fixture(scope="module")
def stack(ckpt, tmp_path_factory):
    options = ServeOptions.from_flat(dtype="float32",
        checkpoint=ckpt, model_name=f"iso-{uuid.uuid4().hex[:8]}", port=free_port(), tp=1, pools=1,
        redis_url=REDIS_URL, scheduler_args=("--max-input-tokens", "400"),
        workdir=str(tmp_path_factory.mktemp("logs")))
    s = LocalStack(options).start()
    yield s
    s.stop()


def test_the_real_stack_refuses_the_poison_and_serves_its_neighbours(stack, model, tokenizer):
    """Through the gateway: the poison values are INVALID_ARGUMENT naming the field (the
    workers would refuse them too); concurrent ordinary requests, "x [MASK] " x 100 with
    max_new_tokens 1 among them, all end with their normal output."""
    x_mask = "x [MASK] " * 100
    ordinary = ["The river runs past the old mill and [MASK] into the valley.", "Stream the tokens [gMASK]",
                x_mask]

    async def main():
        async with AsyncGLMClient(stack.address) as client:
            calls = [client.generate(p, max_new_tokens=1 if p == x_mask else 6, temperature=0, timeout=HANG_S)
                     for p in ordinary]
            calls += [client.generate("Short [MASK]", temperature=1e-38, timeout=HANG_S),
                      client.generate("Short [MASK]", temperature=0.7, repetition_penalty=1e-38, timeout=HANG_S)]
            return await asyncio.gather(*calls, return_exceptions=True)

    *good, bad_t, bad_rp = asyncio.run(main())
    for error, field in ((bad_t, "sampling.temperature"), (bad_rp, "sampling.repetition_penalty")):
        assert isinstance(error, GLMError) and error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.details.startswith(field), error.details
    for prompt, reply in zip(ordinary, good):
        assert not isinstance(reply, Exception), reply
        ids = prepare_text_ids(tokenizer.tokenize(prompt))
        want = generate(model, ids, Sampling(temperature=0.0), 1 if prompt == x_mask else 6)
        assert list(reply.token_ids) == [t for blank in want for t in blank], prompt
    assert len(good[2].blanks) == 100
    with GLMClient(stack.address) as client:                           # still serving
        assert client.generate("Short [MASK]", max_new_tokens=3, temperature=0, timeout=HANG_S).finish_reason
