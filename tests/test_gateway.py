"""The gateway's request path (validation, model info, queueing, streaming, cancellation)
against the real Redis (the gateway tests' own database, ``gateway_harness.REDIS_URL``) and
real gRPC servers on loopback; tests/test_gateway_access.py has health, reflection, API keys,
TLS, the clients and the graceful stop.

A scripted fake pool (tests/gateway_harness.py) stands in for the scheduler: it
takes entries from the queue and writes events; the scheduler has its own tests.
Callers' deadlines are ``CALL_S`` (a hang bound) except where the deadline itself is
under test; no verdict depends on how long a call took.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from gateway_harness import HANG_S, call_code, default_script, internal_id, wait_for
from gateway_harness import checkpoint, loop, pools, rdb, shared, start, tokenizer  # noqa: F401 (fixtures)
from services.common import redis_keys as keys
from services.common.messages import EVENT_ERROR, EVENT_TOKENS, Event, QueuedRequest, sample_seed
from services.client import GLMClient, GLMError
from services.proto_gen.glm.v1 import generation_pb2 as pb
from services.proto_gen.glm.v1 import generation_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.redis]
Code = grpc.StatusCode
CALL_S = HANG_S              # a caller's deadline where the deadline is not under test


# ---- validation --------------------------------------------------------------------------

BAD_REQUESTS = [
    ("prompt", dict()),
    ("prompt, prompt_token_ids", dict(prompt="a [MASK]", prompt_token_ids=[20005, 150000])),
    ("prompt", dict(prompt="word " * 600)),
    ("prompt_token_ids", dict(prompt_token_ids=[20005] * 600 + [150001])),
    ("prompt_token_ids", dict(prompt_token_ids=[20005, 20006])),
    ("prompt_token_ids[1]", dict(prompt_token_ids=[150000, 999_999])),
    ("sampling.temperature", dict(temperature=-0.1)),
    ("sampling.temperature", dict(temperature=101.0)),
    ("sampling.temperature", dict(temperature=float("nan"))),
    ("sampling.top_p", dict(top_p=1.5)),
    ("sampling.top_p", dict(top_p=-0.5)),
    ("sampling.top_k", dict(top_k=150529)),
    ("sampling.repetition_penalty", dict(repetition_penalty=0.0)),
    ("sampling.repetition_penalty", dict(repetition_penalty=-1.0)),
    ("sampling.presence_penalty", dict(presence_penalty=2.5)),
    ("sampling.frequency_penalty", dict(frequency_penalty=-2.5)),
    ("stopping.max_new_tokens", dict(max_new_tokens=0)),
    ("stopping.max_new_tokens", dict(max_new_tokens=2049)),
    ("stopping.max_new_tokens", dict(max_new_tokens=510)),  # prompt 3 + sop + 510 > 512
    ("stopping.min_new_tokens", dict(max_new_tokens=4, min_new_tokens=5)),
    ("stopping.stop", dict(stop=[f"s{i}" for i in range(9)])),
    ("stopping.stop[1]", dict(stop=["ok", ""])),
    ("stopping.stop[0]", dict(stop=["x" * 257])),
    ("output.top_logprobs", dict(top_logprobs=6)),
    ("request_id", dict(request_id="has space")),
    ("request_id", dict(request_id="x" * 129)),
    ("request_id", dict(request_id="V%3Acancel")),
    ("request_id", dict(request_id="tenant/V")),
    ("request_id", dict(request_id="réquest")),
    ("request_id", dict(request_id="V*")),
    ("n", dict(n=17)),
    ("n", dict(n=2, num_beams=2)),
    ("beam_search.num_beams", dict(num_beams=17)),
    ("beam_search.num_beams", dict(num_beams=1, no_repeat_ngram_size=2)),
    ("beam_search.length_penalty", dict(num_beams=2, length_penalty=float("inf"))),
    ("beam_search.length_penalty", dict(num_beams=2, length_penalty=-10.5)),
    ("beam_search.no_repeat_ngram_size", dict(num_beams=2, no_repeat_ngram_size=17)),
    ("stopping.stop", dict(num_beams=2, stop=["x"])),
    ("output.logprobs", dict(num_beams=2, logprobs=True)),
]


@pytest.mark.parametrize("field,kwargs", BAD_REQUESTS,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_REQUESTS)])
def test_invalid_arguments_name_the_field(shared, rdb, field, kwargs):
    kwargs = dict(kwargs)
    if "prompt" not in kwargs and "prompt_token_ids" not in kwargs and field != "prompt":
        kwargs["prompt"] = "Hi [MASK]"
    with GLMClient(shared.address, timeout=CALL_S) as client:
        for call in (client.generate, lambda **kw: list(client.generate_stream(**kw))):
            error = call_code(lambda: call(**kwargs))
            assert error.code == Code.INVALID_ARGUMENT
            assert error.details.startswith(field), error.details
    assert rdb.xlen(keys.queue(shared.model)) == 0


def test_samples_are_enqueued_together_with_derived_seeds(start, pools, tokenizer):
    """n = 3: three requests {id}#i, the seeds sample_seed(seed, i), each scored (log-probs on);
    the reply has one candidate per sample; a retry re-attaches to all three."""
    gateway = start()
    pool = pools(gateway.model, default_script(tokenizer))
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        reply = client.generate("Hi [MASK]", temperature=0.7, seed=5, n=3, request_id="three")
        again = client.generate("Hi [MASK]", temperature=0.7, seed=5, n=3, request_id="three")
        with pytest.raises(GLMError) as clash:
            client.generate("Hi [MASK]", temperature=0.7, seed=5, n=2, request_id="three")
    assert clash.value.code == Code.ALREADY_EXISTS
    assert sorted(q.id.rsplit("/", 1)[1] for q in pool.seen) == ["three#0", "three#1", "three#2"]
    assert sorted(q.sampling.seed for q in pool.seen) == sorted(sample_seed(5, i) for i in range(3))
    assert all(q.logprobs for q in pool.seen)
    assert [c.seed for c in reply.candidates] == [sample_seed(5, i) for i in range(3)]
    assert [c.index for c in reply.candidates] == [0, 1, 2] and reply.request_id == "three"
    assert list(again.candidates) == list(reply.candidates)


def test_defaults_pass_validation_and_temperature_zero_is_greedy(start, pools, tokenizer):
    gateway = start()
    pool = pools(gateway.model, default_script(tokenizer))      # what the gateway enqueued
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        client.generate("Hi [MASK]", temperature=0)
    [queued] = pool.seen
    assert queued.sampling.greedy and queued.sampling.seed > 0
    assert queued.max_new_tokens == 128 and queued.prompt_ids[-1] == 150000


def test_unknown_model_is_not_found(shared):
    with GLMClient(shared.address, timeout=CALL_S) as client:
        for call in (lambda: client.generate("Hi", model="nope"),
                     lambda: client.model_info("nope"), lambda: client.tokenize("Hi", "nope")):
            error = call_code(call)
            assert error.code == Code.NOT_FOUND and "nope" in error.details


def test_model_info_list_and_tokenize(shared, tokenizer):
    with GLMClient(shared.address, timeout=CALL_S) as client:
        models = client.list_models()
        assert [m.name for m in models] == [shared.model]
        info = client.model_info()
        assert (info.max_sequence_length, info.vocab_size, info.max_new_tokens_limit,
                info.max_stop_sequences, info.default_max_new_tokens) == (512, 150528, 2048, 8, 128)
        reply = client.tokenize("Hello world")
        assert list(reply.token_ids) == tokenizer.encode("Hello world") + [150001]
        assert reply.pieces[-1] == "[[gMASK]]"
        assert list(client.tokenize("Hello [MASK] world").token_ids)[-1] == 20002  # eos
        assert call_code(lambda: client.tokenize("")).code == Code.INVALID_ARGUMENT


# ---- admission ---------------------------------------------------------------------------

def test_full_queue_is_resource_exhausted_and_enqueues_nothing(start, rdb):
    gateway = start(max_queue_depth=2)
    queue = keys.queue(gateway.model)
    for _ in range(2):
        rdb.xadd(queue, {"d": "{}"})
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        error = call_code(lambda: client.generate("Hi", request_id="full-1"))
    assert error.code == Code.RESOURCE_EXHAUSTED
    assert rdb.xlen(queue) == 2 and not rdb.exists(keys.request(internal_id("full-1")))


def test_same_request_id_enqueues_once_and_both_callers_get_the_result(start, pools, tokenizer, rdb):
    gateway = start()
    pool = pools(gateway.model, default_script(tokenizer), delay=0.3)
    request_id = f"idem-{gateway.model}"
    results = []

    def call():
        with GLMClient(gateway.address, timeout=CALL_S) as client:
            results.append(client.generate("Say [MASK]", seed=5, request_id=request_id))

    # The pool's delay keeps the request running while both callers arrive; one that
    # arrives after the end re-attaches just the same, so the verdict holds either way.
    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_S + 10)
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].text == "Hello world" and results[0].seed == 5
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        again = client.generate("Say [MASK]", seed=5, request_id=request_id)  # after the end
        assert again == results[0]
        error = call_code(lambda: client.generate("Say [MASK]", seed=6, request_id=request_id))
        assert error.code == Code.ALREADY_EXISTS and "request_id" in error.details
    assert len(pool.seen) == 1
    assert 0 < rdb.ttl(keys.request(internal_id(request_id))) <= keys.ACTIVE_TTL_S


# ---- relay -------------------------------------------------------------------------------

def test_stream_relays_tokens_drops_repeats_and_ends_with_usage(start, pools, tokenizer):
    gateway = start()
    base = default_script(tokenizer)

    def script(queued):
        events = base(queued)
        return [events[0], events[0], events[1], events[0], *events[2:]]  # repeats dropped

    pool = pools(gateway.model, script)
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        messages = list(client.generate_stream("Say [MASK]", logprobs=True, top_logprobs=2))
    queued = pool.seen[0]
    assert [m.text for m in messages] == ["Hello", " world", ""]
    hello, world = tokenizer.encode("Hello"), tokenizer.encode(" world")
    assert list(messages[0].token_ids) == hello and messages[1].index == len(hello)
    assert [t.logprob for t in messages[0].tokens] == [-0.5] * len(hello)
    assert len(messages[1].tokens[0].top_logprobs) == 2
    last = messages[-1]
    assert last.finish_reason == "stop" and last.output_text == "Say Hello world"
    assert (last.usage.prompt_tokens, last.usage.generated_tokens) == (3, len(hello + world))
    assert last.seed == queued.sampling.seed > 0
    assert queued.logprobs and queued.top_logprobs == 2 and queued.traceparent.startswith("00-")


def test_generate_assembles_the_response(start, pools, tokenizer):
    gateway = start()
    pools(gateway.model, default_script(tokenizer))
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        reply = client.generate("Say [MASK]", max_new_tokens=16, temperature=0.7, stop=["!"],
                                logprobs=True)
    ids = tokenizer.encode("Hello") + tokenizer.encode(" world")
    assert reply.text == "Hello world" and list(reply.token_ids) == ids
    assert list(reply.logprobs) == [-0.5] * len(ids) and len(reply.tokens) == len(ids)
    assert list(reply.blanks) == ["Hello world"] and reply.blank_details[0].finish_reason == "stop"
    assert reply.finish_reason == "stop" and reply.model == gateway.model and reply.seed > 0


def test_trace_context_of_the_caller_reaches_the_queue(start, pools, tokenizer):
    gateway = start()
    pool = pools(gateway.model, default_script(tokenizer))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        stub.Generate(pb.GenerateRequest(prompt="Say [MASK]"), timeout=CALL_S,
                      metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")])
    assert pool.seen[0].traceparent.split("-")[1] == trace_id


@pytest.mark.parametrize("code", ["RESOURCE_EXHAUSTED", "INTERNAL", "BOGUS"])
def test_error_event_maps_to_its_code(start, pools, code):
    gateway = start()
    pools(gateway.model, lambda q: [Event(EVENT_TOKENS, 0, token_ids=(20005,), text="a"),
                                    Event(EVENT_ERROR, 1, code=code, message="pool says no")])
    expected = Code.INTERNAL if code == "BOGUS" else Code[code]
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        error = call_code(lambda: client.generate("Say [MASK]"))
        assert error.code == expected and "pool says no" in error.details
        error = call_code(lambda: list(client.generate_stream("Say [MASK]")))
        assert error.code == expected


# ---- cancellation ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3], ids=["one", "samples"])
def test_client_leaving_a_stream_sets_the_cancel_key(start, pools, rdb, n):
    """Of the request, or of every sample of a call with ``n`` samples ({id}#i)."""
    gateway = start()
    stall = threading.Event()
    # grpc.aio may notice a cancel that races with a write only at the next write: the
    # pool goes on producing tokens, as a real one does, then stalls.
    tokens = [Event(EVENT_TOKENS, i, index=i, token_ids=(20005,), text="a") for i in range(3)]
    pools(gateway.model, lambda q: [tokens[0], 0.2, tokens[1], 0.2, tokens[2], stall])
    request_id = f"leave-{n}-{gateway.model}"
    ids = [request_id] if n == 1 else [f"{request_id}{keys.SAMPLE_SEPARATOR}{i}" for i in range(n)]
    try:
        with GLMClient(gateway.address, timeout=CALL_S) as client:
            for message in client.generate_stream("Say [MASK]", request_id=request_id, n=n, seed=1):
                assert message.text == "a" and message.candidate in range(n)
                break  # closing the iterator cancels the call
            for rid in ids:
                assert wait_for(lambda: rdb.get(keys.cancel(internal_id(rid))) == b"1")
                assert 0 < rdb.ttl(keys.cancel(internal_id(rid))) <= keys.CANCEL_TTL_S
    finally:
        stall.set()


def test_deadline_sets_the_cancel_key(start, rdb):
    gateway = start()  # no pool: nothing ever answers
    request_id = f"late-{gateway.model}"
    # The deadline is honoured: the call ends DEADLINE_EXCEEDED (what the caller is owed;
    # how long that took is not asserted). The gateway gets the whole deadline, counted
    # from when it receives the call, for its one Redis round trip (the enqueue), and the
    # cancel key is waited for as an event.
    with GLMClient(gateway.address) as client:
        error = call_code(lambda: client.generate("Say [MASK]", request_id=request_id, timeout=2.0))
    assert error.code == Code.DEADLINE_EXCEEDED
    assert wait_for(lambda: rdb.get(keys.cancel(internal_id(request_id))) == b"1")
    queued = QueuedRequest.from_json(rdb.xrange(keys.queue(gateway.model))[0][1][b"d"])
    assert queued.deadline > queued.created_at > 0


def test_finished_request_is_not_cancelled(start, pools, tokenizer, rdb):
    gateway = start()
    pools(gateway.model, default_script(tokenizer))
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        reply = client.generate("Say [MASK]", request_id=f"done-{gateway.model}")
    # stop() returns once every call has ended and the cancel keys the ended calls asked
    # for are written (drain): a cancel of this call would be in Redis by now.
    gateway.stop()
    assert not rdb.exists(keys.cancel(internal_id(reply.request_id)))
