"""The whole system on loopback, as `glm serve` runs it: a real gateway, real
schedulers and real worker processes, over real Redis servers (a private one
for the single-pool stack, this module's own database of the machine's Redis 7
for the two-pool stack).

32 concurrent greedy streams equal `glm generate`; a cancelled request ends
`cancelled`; backpressure admits exactly the queue limit; two pools share one
queue; `kill -9` of the pool holding a long generation → the other pool finishes
it and the client's stream has no gap and no duplicate; gateway restart; Redis
unreachable → UNAVAILABLE (not a hang).

No verdict depends on timing: where an outcome would hang on a race (is the pool
still busy when...?), the test holds a process with SIGSTOP and releases it with
SIGCONT once the event it waits for has happened. Waits are for events, bounded
by ``HANG_S``, which only a hang reaches.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid

import grpc
import pytest
import redis

from redis_harness import url

from model.prompt import prepare_text_ids
from model.runner import load_model
from model.generation import GenerationOptions, Generator
from model.sampling import SamplingParams
from model.tokenizer import GLMTokenizer
from services.client import AsyncGLMClient, GLMClient, GLMError
from services.common import redis_keys as keys
from services.common.messages import Event, sample_seed
from services.local import LocalStack
from services.local_options import ServeOptions
from services.common.net import free_port

pytestmark = [pytest.mark.processes, pytest.mark.slow, pytest.mark.redis]

PROMPTS = [
    "The river runs past the old mill and [MASK] into the valley.",
    "今天的天气很好，我们去公园散步吧。",
    "A [MASK] holds one slice of every weight matrix.",
    "Stream the tokens [gMASK]",
    "Short [MASK]",
    "一个很长的句子，里面有很多很多的字，用来测试不同长度的提示词是否能被正确地批处理。[MASK]",
]
MACHINE_REDIS = url(__name__)      # this module's own database (tests/redis_harness.py)
HANG_S = 60.0                      # bounds a wait for an event: only a hang reaches it
CALL_S = 600.0                     # a whole call's deadline: only a hang reaches it, on any load


def wait_until(predicate, what: str, timeout_s: float = HANG_S):
    """Poll ``predicate`` until it holds; ``timeout_s`` only bounds a hang."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.02)
    return value


def final_event(r: redis.Redis, request_id: str) -> Event | None:
    for _, fields in r.xrange(keys.events(request_id)):
        event = Event.from_json(fields[keys.FIELD.encode()])
        if event.terminal:
            return event
    return None


def greedy_reference(checkpoint: str, prompts: list[str], max_new: int,
                     params: SamplingParams = SamplingParams(greedy=True)) -> dict[str, list[int]]:
    """What `glm generate --prompt P` produces for each prompt (greedy unless ``params``)."""
    tok = GLMTokenizer.from_file(f"{checkpoint}/ice_text.model")
    gen = Generator(load_model(checkpoint))
    out = {}
    for p in prompts:
        result = gen.fill_blanks(prepare_text_ids(tok.tokenize(p)), params,
                                 GenerationOptions(max_new_tokens=max_new))
        out[p] = [t for b in result.blanks for t in b.token_ids]
    return out


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=7)


@pytest.fixture(scope="module")
def stack(tiny, tmp_path_factory):
    options = ServeOptions.from_flat(dtype="float32",
        checkpoint=tiny, model_name=f"e2e-{uuid.uuid4().hex[:8]}", port=free_port(), tp=1, pools=1,
        gateway_args=("--max-queue-depth", "40"), workdir=str(tmp_path_factory.mktemp("logs")))
    s = LocalStack(options).start()
    yield s
    s.stop()


def collect(stream) -> tuple[list[int], list[int], str]:
    ids, indexes, finish = [], [], ""
    for message in stream:
        indexes.extend(range(message.index, message.index + len(message.token_ids)))
        ids.extend(message.token_ids)
        finish = message.finish_reason or finish
    return ids, indexes, finish


def test_32_concurrent_greedy_streams_equal_glm_generate(stack, tiny):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    expected = greedy_reference(tiny, PROMPTS, 6)

    async def one(client, prompt):
        ids, indexes = [], []
        finish = ""
        async for message in client.generate_stream(prompt, model=stack.options.model_name,
                                                    max_new_tokens=6, temperature=0, timeout=CALL_S):
            indexes.extend(range(message.index, message.index + len(message.token_ids)))
            ids.extend(message.token_ids)
            finish = message.finish_reason or finish
        return ids, indexes, finish

    async def main():
        async with AsyncGLMClient(stack.address) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    for prompt, (ids, indexes, finish) in zip(prompts, results):
        assert ids == expected[prompt], prompt
        assert indexes == list(range(len(ids)))          # no gap, no duplicate
        assert finish in ("length", "stop")


def test_the_openai_client_gets_what_grpc_gives(stack, tiny):
    """The gateway's OpenAI-compatible front of the real stack (``glm serve`` turns it on):
    the official client's unary and streamed greedy completions are the gRPC reply's text and
    token count, and ``glm generate``'s tokens."""
    import openai

    name, prompt = stack.options.model_name, PROMPTS[0]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.options.http_port}/v1", api_key="none",
                           timeout=CALL_S, max_retries=0)
    with GLMClient(stack.address) as grpc_client:
        reference = grpc_client.generate(prompt, model=name, max_new_tokens=6, temperature=0, timeout=CALL_S)
    assert list(reference.token_ids) == greedy_reference(tiny, [prompt], 6)[prompt]
    reply = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
    assert reply.choices[0].text == reference.text
    assert reply.usage.completion_tokens == len(reference.token_ids)
    assert reply.choices[0].finish_reason == reference.finish_reason
    chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference.text
    assert chunks[-1].choices[0].finish_reason == reference.finish_reason
    assert [m.id for m in client.models.list().data] == [name]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=name, prompt=prompt, n=17)              # over max_n (16)
    assert refused.value.body["param"] == "n"


def test_the_openai_client_gets_samples_and_beams(stack):
    """`n` samples and a beam search (GLM's extra body fields) through the official client:
    the choices are the gRPC reply's candidates (unary and streamed)."""
    import openai

    name, prompt = stack.options.model_name, PROMPTS[4]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.options.http_port}/v1", api_key="none",
                           timeout=CALL_S, max_retries=0)
    with GLMClient(stack.address) as grpc_client:
        samples = grpc_client.generate(prompt, model=name, max_new_tokens=5, temperature=0.9, seed=3, n=2,
                                       timeout=CALL_S)
        beams = grpc_client.generate(prompt, model=name, max_new_tokens=5, num_beams=3, seed=3,
                                     beam_deterministic=True, timeout=CALL_S)
    reply = client.completions.create(model=name, prompt=prompt, max_tokens=5, temperature=0.9, seed=3, n=2)
    assert [c.text for c in reply.choices] == [c.text for c in samples.candidates]
    assert [c.index for c in reply.choices] == [0, 1]
    chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=5, temperature=0.9, seed=3,
                                            n=2, stream=True))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)}
    assert texts == {0: samples.candidates[0].text, 1: samples.candidates[1].text}
    extra = {"num_beams": 3, "beam_deterministic": True}
    reply = client.completions.create(model=name, prompt=prompt, max_tokens=5, seed=3, n=2, extra_body=extra)
    assert [c.text for c in reply.choices] == [c.text for c in beams.candidates[:2]]
    assert [c.model_extra["score"] for c in reply.choices] == pytest.approx([c.score for c in beams.candidates[:2]],
                                                                           rel=2e-5)
    chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=5, seed=3, n=2, stream=True,
                                            extra_body=extra))
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)}
    assert texts == {0: beams.candidates[0].text, 1: beams.candidates[1].text}
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=name, prompt=prompt, n=4, extra_body=extra)     # more choices than beams
    assert refused.value.body["param"] == "n"


def beam_reference(checkpoint: str, prompt: str, max_new: int, **beam) -> list:
    """`glm generate --num-beams ... --json`'s last blank: (text, token ids, score) best first,
    and the output text of every blank filled."""
    tok = GLMTokenizer.from_file(f"{checkpoint}/ice_text.model")
    options = GenerationOptions(max_new_tokens=max_new, **beam)
    result = Generator(load_model(checkpoint)).fill_blanks(prepare_text_ids(tok.tokenize(prompt)),
                                                           SamplingParams(), options)
    return [(ids, score) for ids, score in result.blanks[-1].candidates]


BEAM_CASES = [   # (prompt, max_new_tokens, beam options as GenerationOptions names them)
    (PROMPTS[0], 6, dict(num_beams=3, no_repeat_ngram_size=2, beam_deterministic=True)),
    (PROMPTS[3], 5, dict(num_beams=4, length_penalty=0.7, beam_seed=1234)),
    ("Two [MASK] blanks, each [MASK] by its best beam.", 4, dict(num_beams=2, beam_seed=9)),
]


def test_beam_search_in_the_running_batch_equals_glm_generate(stack, tiny):
    """Beam searches served among greedy streams (continuous batching, one pool): every
    candidate's tokens equal `glm generate --num-beams`'s, its score to fp32 rounding; the
    reply is the best candidate; a streamed beam search ends with the same candidates."""
    name = stack.options.model_name
    greedy = greedy_reference(tiny, PROMPTS, 8)

    def grpc_options(beam: dict, max_new: int) -> dict:
        return dict(model=name, max_new_tokens=max_new, num_beams=beam["num_beams"],
                    length_penalty=beam.get("length_penalty"),
                    no_repeat_ngram_size=beam.get("no_repeat_ngram_size", 0),
                    beam_deterministic=beam.get("beam_deterministic", False), seed=beam.get("beam_seed", 5))

    async def beams(client, prompt, max_new, beam):
        return await client.generate(prompt, timeout=CALL_S, **grpc_options(beam, max_new))

    async def streamed(client, prompt, max_new, beam):
        return [m async for m in client.generate_stream(prompt, timeout=CALL_S, **grpc_options(beam, max_new))]

    async def plain(client, prompt):
        return await client.generate(prompt, model=name, max_new_tokens=8, temperature=0, timeout=CALL_S)

    async def main():
        async with AsyncGLMClient(stack.address) as client:
            return await asyncio.gather(*(plain(client, p) for p in PROMPTS),
                                        *(beams(client, *case) for case in BEAM_CASES),
                                        streamed(client, *BEAM_CASES[1]))

    results = asyncio.run(main())
    plains, replies, stream = results[:len(PROMPTS)], results[len(PROMPTS):-1], results[-1]
    for prompt, reply in zip(PROMPTS, plains):
        assert list(reply.token_ids) == greedy[prompt] and not reply.candidates
    for (prompt, max_new, beam), reply in zip(BEAM_CASES, replies):
        want = beam_reference(tiny, prompt, max_new, **{**beam, "beam_seed": beam.get("beam_seed", 5)})
        assert len(want) == beam["num_beams"] == len(reply.candidates)
        assert [list(c.token_ids) for c in reply.candidates] == [ids for ids, _ in want], prompt
        assert [c.score for c in reply.candidates] == pytest.approx([s for _, s in want], rel=2e-5)
        assert [c.index for c in reply.candidates] == list(range(beam["num_beams"]))
        assert list(reply.blank_details[-1].token_ids) == want[0][0]          # the blank holds the best
        assert list(reply.token_ids)[-len(want[0][0]):] == want[0][0]
        assert reply.candidates[0].output_text == reply.output_text
    streamed_candidates = stream[-1].candidates                                 # the same seed: the same search
    assert [list(c.token_ids) for c in streamed_candidates] == [list(c.token_ids) for c in replies[1].candidates]
    assert [c.score for c in streamed_candidates] == pytest.approx([c.score for c in replies[1].candidates], rel=2e-5)
    assert sum(1 for m in stream if m.token_ids) == 1                            # the best beam, once, at the end
    assert "".join(m.text for m in stream) == replies[1].text


def test_n_samples_equal_single_requests_with_the_derived_seeds(stack):
    """`n` samples of one prompt are exactly the single requests with seeds sample_seed(seed, i);
    streamed, each message names its sample and the last carries every candidate."""
    name, prompt = stack.options.model_name, PROMPTS[2]
    sampling = dict(model=name, max_new_tokens=6, temperature=0.9, top_p=0.95, seed=42)
    with GLMClient(stack.address) as client:
        reply = client.generate(prompt, n=3, timeout=CALL_S, **sampling)
        singles = [client.generate(prompt, timeout=CALL_S, **{**sampling, "seed": sample_seed(42, i)})
                   for i in range(3)]
        stream = list(client.generate_stream(prompt, n=3, timeout=CALL_S, **sampling))
    assert [c.seed for c in reply.candidates] == [sample_seed(42, i) for i in range(3)]
    assert [list(c.token_ids) for c in reply.candidates] == [list(s.token_ids) for s in singles]
    assert [c.text for c in reply.candidates] == [s.text for s in singles]
    assert len({tuple(c.token_ids) for c in reply.candidates}) > 1
    assert all(c.score < 0 for c in reply.candidates) and not reply.tokens      # scored, logprobs not asked
    assert list(reply.token_ids) == list(singles[0].token_ids)
    assert reply.usage.generated_tokens == sum(len(s.token_ids) for s in singles)
    per_sample = {i: [t for m in stream if m.candidate == i for t in m.token_ids] for i in range(3)}
    assert per_sample == {i: list(s.token_ids) for i, s in enumerate(singles)}
    assert [m.candidate for m in stream if m.finish_reason] and list(stream[-1].candidates) == list(reply.candidates)


def test_cancelled_request_ends_cancelled(stack):
    prompt = "Stream the tokens [gMASK]"
    request_id = f"cancel-{uuid.uuid4().hex}"
    r = redis.Redis.from_url(stack.redis_url)
    with GLMClient(stack.address) as client:
        # as many new tokens as the model allows: the request cannot end by itself before
        # the cancel (that would be 'length', a failure, not a pass), however busy the machine
        ids = client.tokenize(prompt, stack.options.model_name, timeout=HANG_S).token_ids
        max_new = client.model_info(stack.options.model_name, timeout=HANG_S).max_sequence_length - len(ids) - 1
        stream = client.generate_stream(prompt, model=stack.options.model_name, max_new_tokens=max_new,
                                        temperature=0, request_id=request_id, timeout=CALL_S)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()                                     # the client goes away
    # the gateway sets the cancel key; the scheduler reads it before its next step
    internal = keys.namespaced(keys.ANONYMOUS, request_id)     # the gateway has no API keys
    final = wait_until(lambda: final_event(r, internal), "the final event after the cancel")
    assert r.exists(keys.cancel(internal))
    assert final.type == "final" and final.finish_reason == "cancelled"
    assert final.generated_tokens < max_new


def test_backpressure_admits_exactly_the_queue_limit(stack):
    # The scheduler is held (SIGSTOP) during the burst: nothing is acked, so the gateway's
    # atomic depth check admits exactly --max-queue-depth (40) of the 60 calls and refuses
    # the other 20 at once; released, the pool serves the 40.
    queue = keys.queue(stack.options.model_name)
    r = redis.Redis.from_url(stack.redis_url)
    wait_until(lambda: r.xlen(queue) == 0, "an empty queue (the earlier tests' entries acked)")
    scheduler = stack.schedulers[0].pid

    async def one(client, i):
        try:
            await client.generate("Short [MASK]", model=stack.options.model_name, max_new_tokens=100,
                                  temperature=0, timeout=CALL_S)
            return "ok"
        except GLMError as exc:
            return exc.code

    async def main():
        async with AsyncGLMClient(stack.address) as client:
            calls = [asyncio.ensure_future(one(client, i)) for i in range(60)]
            try:
                deadline = time.monotonic() + HANG_S
                while sum(c.done() for c in calls) < 20:         # the refusals, while held
                    assert time.monotonic() < deadline, "the refused calls did not return"
                    await asyncio.sleep(0.05)
                held = r.xlen(queue)
            finally:
                os.kill(scheduler, signal.SIGCONT)
            return await asyncio.gather(*calls), held

    os.kill(scheduler, signal.SIGSTOP)
    try:
        outcomes, held = asyncio.run(main())
    finally:
        os.kill(scheduler, signal.SIGCONT)
    assert held == 40
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 20
    assert outcomes.count("ok") == 40


def test_gateway_restart_keeps_requests(stack):
    request_id = f"restart-{uuid.uuid4().hex}"
    with GLMClient(stack.address) as client:
        first = client.generate("A [MASK] holds one slice", model=stack.options.model_name,
                                max_new_tokens=5, temperature=0, request_id=request_id, timeout=CALL_S)
    stack.gateway.terminate()
    stack.gateway.wait(timeout=HANG_S)
    stack.start_gateway()
    stack.wait_ready(2 * HANG_S)
    with GLMClient(stack.address) as client:
        again = client.generate("A [MASK] holds one slice", model=stack.options.model_name,
                                max_new_tokens=5, temperature=0, request_id=request_id, timeout=CALL_S)
        fresh = client.generate("Short [MASK]", model=stack.options.model_name, max_new_tokens=3,
                                temperature=0, timeout=CALL_S)
    assert list(again.token_ids) == list(first.token_ids) and again.text == first.text
    assert len(fresh.token_ids) >= 1


def test_redis_unreachable_gives_unavailable(stack):
    # last test of the single-pool stack: it stops that stack's private Redis
    stack.redis.stop()
    with GLMClient(stack.address) as client, pytest.raises(GLMError) as err:
        client.generate("Short [MASK]", model=stack.options.model_name, max_new_tokens=3, timeout=HANG_S)
    # UNAVAILABLE, not DEADLINE_EXCEEDED: the gateway answered (its Redis client has short
    # timeouts and no retries) instead of waiting out the caller's deadline
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# ---- two pools on the machine's Redis ---------------------------------------------------

@pytest.fixture(scope="module")
def small(checkpoint):
    return checkpoint("glm-small", tp=1, seed=3)


@pytest.fixture(scope="module")
def two_pools(small, tmp_path_factory, redis_db):
    options = ServeOptions.from_flat(dtype="float32",
        checkpoint=small, model_name=f"e2e2-{uuid.uuid4().hex[:8]}", port=free_port(), tp=1, pools=2,
        redis_url=MACHINE_REDIS, scheduler_args=("--claim-idle-ms", "2000", "--max-batch-size", "4"),
        workdir=str(tmp_path_factory.mktemp("logs2")))
    s = LocalStack(options).start()
    yield s
    s.stop()


def pending_by_consumer(r: redis.Redis, model: str) -> dict[str, int]:
    try:
        summary = r.xpending(keys.queue(model), keys.GROUP)
    except redis.ResponseError:          # no group before the first request
        return {}
    return {c["name"].decode(): int(c["pending"]) for c in summary.get("consumers", [])}


def test_two_pools_share_one_queue(two_pools):
    # Each pool holds at most its capacity (--max-batch-size 4) and a request cannot end
    # before min_new_tokens: of 8 requests sent at once, the pool that takes the first 4
    # can take no more until one of its requests has run 40 steps, so the other pool,
    # blocked on the queue, is handed the rest by Redis itself.
    r = redis.Redis.from_url(MACHINE_REDIS)
    model = two_pools.options.model_name
    seen: dict[str, int] = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            for name, n in pending_by_consumer(r, model).items():
                seen[name] = max(seen.get(name, 0), n)
            time.sleep(0.02)

    async def main():
        async with AsyncGLMClient(two_pools.address) as client:
            return await asyncio.gather(*(
                client.generate(PROMPTS[i % len(PROMPTS)], model=model, max_new_tokens=40, min_new_tokens=40,
                                temperature=0, timeout=CALL_S) for i in range(8)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        replies = asyncio.run(main())
    finally:
        done.set()
        watcher.join()
    assert all(len(reply.token_ids) == 40 for reply in replies)
    assert len([name for name, n in seen.items() if n > 0]) == 2, seen   # both pools took work


def test_kill_9_of_a_pool_mid_generation_is_invisible_to_the_client(two_pools, small):
    r = redis.Redis.from_url(MACHINE_REDIS)
    model = two_pools.options.model_name
    request_id = f"failover-{uuid.uuid4().hex}"
    prompt = "The river runs past the old mill and [MASK] into the valley."
    # sampled, seeded: the pool that resumes must make the very draws the dead one would have
    sampling = dict(temperature=0.9, top_k=40, seed=1234)
    expected = greedy_reference(small, [prompt], 160, SamplingParams(**sampling))[prompt]
    ids, indexes, finish = [], [], ""
    killed = None
    with GLMClient(two_pools.address) as client:
        for message in client.generate_stream(prompt, model=model, max_new_tokens=160, **sampling,
                                              request_id=request_id, timeout=CALL_S):
            indexes.extend(range(message.index, message.index + len(message.token_ids)))
            ids.extend(message.token_ids)
            finish = message.finish_reason or finish
            if killed is None and len(ids) >= 10:
                owner = [name for name, n in pending_by_consumer(r, model).items() if n > 0]
                assert len(owner) == 1, owner
                index = next(i for i, p in enumerate(two_pools.pools) if owner[0].endswith(f"-{p.pids[0]}"))
                for pid in [two_pools.schedulers[index].pid] + two_pools.pools[index].pids:
                    os.kill(pid, signal.SIGKILL)
                killed = index
    assert killed is not None
    assert indexes == list(range(len(ids)))                 # no gap, no duplicate
    assert ids == expected and finish in ("length", "stop")

