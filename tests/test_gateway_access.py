"""The gateway's health, reflection, API keys and TLS, its clients (sync, async, the CLI) and
its graceful stop, against the real Redis and real gRPC servers on loopback, with the
scripted fake pool of tests/gateway_harness.py (tests/test_gateway.py has the request path:
validation, queueing, streaming, cancellation). No verdict depends on how long a call took.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

from gateway_harness import (HANG_S, RunningGateway, call_code, closed_port, default_script, options,
                             self_signed, wait_for)
from gateway_harness import checkpoint, loop, pools, rdb, shared, start, tokenizer  # noqa: F401 (fixtures)
from services.common import redis_keys as keys
from services.common.messages import EVENT_FINAL, EVENT_TOKENS, Event
from services.client import AsyncGLMClient, GLMClient, GLMError

pytestmark = [pytest.mark.redis]
Code = grpc.StatusCode
CALL_S = HANG_S              # a caller's deadline where the deadline is not under test


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
    assert main(["client", "--address", gateway.address, "--prompt", "Say [MASK]", "--n", "2", "--seed", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["[0]", "[1]"] and lines[0].endswith("\tHello world")
    assert "seed=4\t" in lines[0]
    assert main(["client", "--address", gateway.address, "--prompt", "Hi", "--num-beams", "2", "--n", "2"]) == 1
    assert "INVALID_ARGUMENT: n:" in capsys.readouterr().err


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
