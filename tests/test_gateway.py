"""The gateway against the real Redis (this module's own database, tests/redis_harness.py)
and real gRPC servers on loopback.

A scripted fake pool (tests/gateway_harness.py) stands in for the scheduler: it
takes entries from the queue and writes events; the scheduler has its own tests.
Callers' deadlines are ``CALL_S`` (a hang bound) except where the deadline itself is
under test; no verdict depends on how long a call took.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from gateway_harness import (HANG_S, FakePool, LoopThread, RunningGateway, closed_port,
                             default_script, internal_id, options, wait_for)
from model.tokenizer import GLMTokenizer
from services.common import redis_keys as keys
from services.common.messages import EVENT_ERROR, EVENT_FINAL, EVENT_TOKENS, Event, QueuedRequest
from services.client import AsyncGLMClient, GLMClient, GLMError
from services.proto_gen.glm.v1 import generation_pb2 as pb
from services.proto_gen.glm.v1 import generation_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.redis]
Code = grpc.StatusCode
CALL_S = HANG_S              # a caller's deadline where the deadline is not under test


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model.tiny import init_tiny  # torch: only the test process, never the gateway's code

    directory = tmp_path_factory.mktemp("gateway") / "tiny"
    init_tiny(directory, preset="glm-tiny")
    return directory


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return GLMTokenizer.from_file(checkpoint / "ice_text.model")


@pytest.fixture(scope="module")
def rdb(redis_db):
    """This module's database (flushed before and after the module), as a client."""
    return redis_db.client


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def start(loop, checkpoint, rdb):
    """``start(**options)`` -> a running gateway; stopped after the test."""
    running = []

    def _start(**overrides) -> RunningGateway:
        gateway = RunningGateway(loop, options(checkpoint, **overrides))
        running.append(gateway)
        return gateway

    yield _start
    for gateway in running:
        gateway.stop()


@pytest.fixture(scope="module")
def shared(loop, checkpoint, rdb):
    """One gateway for the tests that never reach a pool (validation, model info)."""
    gateway = RunningGateway(loop, options(checkpoint, max_queue_depth=1000))
    yield gateway
    gateway.stop()


@pytest.fixture
def pools():
    started = []

    def _pool(model, script, delay=0.0) -> FakePool:
        pool = FakePool(model, script, delay)
        started.append(pool)
        return pool

    yield _pool
    for pool in started:
        pool.close()


def call_code(fn):
    with pytest.raises(GLMError) as info:
        fn()
    return info.value


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

def test_client_leaving_a_stream_sets_the_cancel_key(start, pools, rdb):
    gateway = start()
    stall = threading.Event()
    # grpc.aio may notice a cancel that races with a write only at the next write: the
    # pool goes on producing tokens, as a real one does, then stalls.
    tokens = [Event(EVENT_TOKENS, i, index=i, token_ids=(20005,), text="a") for i in range(3)]
    pools(gateway.model, lambda q: [tokens[0], 0.2, tokens[1], 0.2, tokens[2], stall])
    request_id = f"leave-{gateway.model}"
    try:
        with GLMClient(gateway.address, timeout=CALL_S) as client:
            for message in client.generate_stream("Say [MASK]", request_id=request_id):
                assert message.text == "a"
                break  # closing the iterator cancels the call
            assert wait_for(lambda: rdb.get(keys.cancel(internal_id(request_id))) == b"1")
        assert 0 < rdb.ttl(keys.cancel(internal_id(request_id))) <= keys.CANCEL_TTL_S
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


# ---- Redis down, health, reflection --------------------------------------------------------

def health_status(address, service="") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_S).status


def test_redis_unreachable_is_unavailable_and_not_serving(start):
    gateway = start(redis_url=f"redis://127.0.0.1:{closed_port()}/0", redis_timeout_s=1.0)
    assert health_status(gateway.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        # UNAVAILABLE, not DEADLINE_EXCEEDED: the gateway answered instead of waiting on
        # Redis (its client has redis_timeout_s timeouts and no retries); no clock needed.
        error = call_code(lambda: client.generate("Say [MASK]"))
        assert error.code == Code.UNAVAILABLE
        assert client.list_models()  # model info needs no Redis
    assert health_status(gateway.address, "glm.v1.TextGeneration") == \
        health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_and_reflection_list_the_services(shared, rdb):
    """``""`` follows Redis; ``glm.v1.TextGeneration`` also needs a live pool heartbeat."""
    assert health_status(shared.address) == health_pb2.HealthCheckResponse.SERVING
    heartbeat = keys.pool(f"health-{uuid.uuid4().hex[:8]}")
    rdb.hset(heartbeat, mapping={"model": shared.model})
    rdb.expire(heartbeat, 60)
    try:
        assert wait_for(lambda: health_status(shared.address, "glm.v1.TextGeneration") ==
                        health_pb2.HealthCheckResponse.SERVING)
        assert health_status(shared.address, f"glm.v1.TextGeneration/{shared.model}") == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        rdb.delete(heartbeat)
    assert wait_for(lambda: health_status(shared.address, "glm.v1.TextGeneration") ==
                    health_pb2.HealthCheckResponse.NOT_SERVING)
    with grpc.insecure_channel(shared.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"glm.v1.TextGeneration", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_reflection_v1_lists_and_describes_the_services(shared):
    """A client of the current protocol (``grpc.reflection.v1``, what grpcurl tries first)
    gets the same answers as a ``v1alpha`` one, in one bidirectional stream."""
    from google.protobuf import descriptor_pb2

    from services.proto_gen.grpc.reflection.v1 import reflection_pb2 as v1
    from services.proto_gen.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc

    requests = [v1.ServerReflectionRequest(list_services=""),
                v1.ServerReflectionRequest(file_containing_symbol="glm.v1.TextGeneration"),
                v1.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
                v1.ServerReflectionRequest(file_containing_symbol="glm.v1.NoSuchThing")]
    with grpc.insecure_channel(shared.address) as channel:
        stub = v1_grpc.ServerReflectionStub(channel)
        listed, api, itself, missing = stub.ServerReflectionInfo(iter(requests), timeout=10)
    assert {s.name for s in listed.list_services_response.service} == {
        "glm.v1.TextGeneration", "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in api.file_descriptor_response.file_descriptor_proto]
    assert files[0].name == "glm/v1/generation.proto"
    assert "TextGeneration" in [s.name for s in files[0].service]
    assert api.original_request.file_containing_symbol == "glm.v1.TextGeneration"
    own = descriptor_pb2.FileDescriptorProto.FromString(itself.file_descriptor_response.file_descriptor_proto[0])
    assert own.package == "grpc.reflection.v1" and own.service[0].name == "ServerReflection"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# ---- API keys and TLS ----------------------------------------------------------------------

def test_api_keys(start, pools, tokenizer):
    gateway = start(api_keys=("k1", "k2"))
    pools(gateway.model, default_script(tokenizer))
    for key in (None, "wrong"):
        with GLMClient(gateway.address, api_key=key, timeout=CALL_S) as client:
            for call in (client.list_models, lambda: client.generate("Say [MASK]"),
                         lambda: list(client.generate_stream("Say [MASK]"))):
                assert call_code(call).code == Code.UNAUTHENTICATED
    with GLMClient(gateway.address, api_key="k2", timeout=CALL_S) as client:
        assert client.generate("Say [MASK]").text == "Hello world"
    assert health_status(gateway.address) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(gateway.address) as channel:
        assert "glm.v1.TextGeneration" in ProtoReflectionDescriptorDatabase(channel).get_services()


def self_signed(directory):
    """A self-signed certificate for ``localhost``: the cryptography package, else openssl."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        import subprocess

        cert_path, key_path = directory / "cert.pem", directory / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                        "-keyout", str(key_path), "-out", str(cert_path)],
                       check=True, capture_output=True)
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_round_trip(start, pools, tokenizer, tmp_path):
    cert, key = self_signed(tmp_path)
    gateway = start(tls_cert=str(cert), tls_key=str(key))
    pools(gateway.model, default_script(tokenizer))
    with GLMClient(gateway.address, root_certificates=cert, server_name="localhost",
                   timeout=CALL_S) as client:
        assert client.generate("Say [MASK]").text == "Hello world"
    with GLMClient(gateway.address, timeout=CALL_S) as plaintext:
        assert call_code(plaintext.list_models).code == Code.UNAVAILABLE


# ---- clients and shutdown ------------------------------------------------------------------

def test_async_client(start, pools, tokenizer):
    gateway = start()
    pools(gateway.model, default_script(tokenizer))

    async def main():
        async with AsyncGLMClient(gateway.address, timeout=CALL_S) as client:
            reply = await client.generate("Say [MASK]", seed=3)
            texts = [m.text async for m in client.generate_stream("Say [MASK]")]
            models = await client.list_models()
            tokens = await client.tokenize("Hello")
            with pytest.raises(GLMError) as info:
                await client.generate("Say [MASK]", top_k=10**6)
            return reply, texts, models, tokens, info.value

    reply, texts, models, tokens, error = asyncio.run(main())
    assert reply.text == "Hello world" and reply.seed == 3
    assert texts == ["Hello", " world", ""] and models[0].name == gateway.model
    assert list(tokens.token_ids)[-1] == 150001
    assert error.code == Code.INVALID_ARGUMENT and error.details.startswith("sampling.top_k")


def test_cli_client(start, pools, tokenizer, capsys):
    import json

    from services.cli.main import main

    gateway = start()
    pools(gateway.model, default_script(tokenizer))
    assert main(["client", "--address", gateway.address, "--prompt", "Say [MASK]",
                 "--temperature", "0", "--stop", "!", "--seed", "9"]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert main(["client", "--address", gateway.address, "--prompt", "Say [MASK]", "--stream"]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert main(["client", "--address", gateway.address, "--prompt-ids", "20005,150001",
                 "--json", "--seed", "4"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["text"] == "Hello world" and reply["seed"] == "4"
    assert main(["client", "--address", gateway.address, "--prompt", "Hi", "--top-p", "3"]) == 1
    assert "INVALID_ARGUMENT: sampling.top_p" in capsys.readouterr().err


def serving(address) -> bool:
    """The gateway answers its health check with SERVING (False once a stop has begun)."""
    try:
        return health_status(address) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_graceful_stop_lets_a_stream_finish(loop, checkpoint, pools, rdb):
    gateway = RunningGateway(loop, options(checkpoint))
    release = threading.Event()       # the rest of the stream is written once the stop has begun
    slow = [Event(EVENT_TOKENS, 0, token_ids=(20005,), text="a"), release,
            Event(EVENT_TOKENS, 1, index=1, token_ids=(20006,), text="b"),
            Event(EVENT_FINAL, 2, finish_reason="length", text="ab")]
    pools(gateway.model, lambda q: slow)
    with GLMClient(gateway.address, timeout=CALL_S) as client:
        stream = client.generate_stream("Say [MASK]")
        first = next(stream)
        stopping = asyncio.run_coroutine_threadsafe(gateway.gateway.stop(HANG_S), loop.loop)
        try:
            assert wait_for(lambda: not serving(gateway.address))   # NOT_SERVING or refused
        finally:
            release.set()
        rest = list(stream)
        stopping.result(HANG_S + 10)
    assert first.text == "a" and [m.text for m in rest] == ["b", ""]
    assert rest[-1].finish_reason == "length"
