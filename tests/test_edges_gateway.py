"""A real ``glm gateway`` process at its edges: bytes that are not a valid message,
values at the end of their range, where it listens, and what a SIGTERM leaves behind.

- a request whose bytes do not parse (not protobuf; a string field holding invalid
  UTF-8, built by hand: tag + length + ``b"\\xff\\xfe"``) ends INVALID_ARGUMENT naming the
  field, on every RPC and on the health service, and enqueues nothing; with API keys a
  call without a key is refused UNAUTHENTICATED first;
- a seed of 2**64 - 1 (the API's uint64) is accepted and queued as it is;
- the metrics endpoint listens on loopback unless told otherwise;
- SIGTERM with streams running: after the grace period the calls are cancelled and
  every one of their cancel keys is in Redis when the process has exited.

The gateway runs against this module's own Redis database (tests/redis_harness.py);
no pool consumes the queue, so a generation call waits until it is cancelled. Waits are
for events, bounded by ``HANG_S``, which only a hang reaches.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from gateway_harness import HANG_S, internal_id, wait_for
from services.client import GLMClient, GLMError
from services.common import redis_keys as keys
from services.common.messages import QueuedRequest
from services.common.net import free_port
from listening import listening_hosts

pytestmark = [pytest.mark.redis, pytest.mark.processes]
ROOT = Path(__file__).resolve().parents[1]
Code = grpc.StatusCode
BAD_UTF8 = b"\xff\xfe"


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited field on the wire: tag, length, bytes (payloads < 128 bytes)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


class GatewayProcess:
    """``glm gateway`` as a child process; ``address`` once it is listening."""

    def __init__(self, checkpoint: str, redis_url: str, *args: str) -> None:
        self.model = f"edge{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, "-m", "services.cli.main", "gateway", "--model", f"{self.model}={checkpoint}",
               "--port", "0", "--redis-url", redis_url, *args]
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()          # "glm gateway: listening on port N"
        assert "listening on port" in line, f"the gateway did not start: {line!r}"
        self.address = f"127.0.0.1:{int(line.split()[-1])}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(HANG_S)


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=5)


@pytest.fixture
def gateway(tiny, redis_db):
    started = []

    def start(*args: str) -> GatewayProcess:
        started.append(GatewayProcess(tiny, redis_db.url, *args))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def raw_call(address: str, method: str, data: bytes, *, streaming: bool = False, metadata=()):
    """Send ``data`` as the request bytes of ``method``; the reply bytes, or the RpcError."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream if streaming else channel.unary_unary
        stub = call(method, request_serializer=None, response_deserializer=None)
        try:
            reply = stub(data, timeout=HANG_S, metadata=metadata)
            return list(reply) if streaming else reply
        except grpc.RpcError as error:
            return error


GENERATE, STREAM = "/glm.v1.TextGeneration/Generate", "/glm.v1.TextGeneration/GenerateStream"
MALFORMED = [
    (GENERATE, b"\xff\xff\xff", "request: not a glm.v1.GenerateRequest message"),
    (GENERATE, b"\x0a\x05abc", "request: not a glm.v1.GenerateRequest message"),     # runs past the end
    (GENERATE, field(2, BAD_UTF8), "prompt: invalid UTF-8"),
    (STREAM, field(2, BAD_UTF8), "prompt: invalid UTF-8"),
    (GENERATE, field(2, b"x [MASK]") + field(4, BAD_UTF8), "request_id: invalid UTF-8"),
    (STREAM, field(6, field(3, b"ok") + field(3, BAD_UTF8)), "stopping.stop[1]: invalid UTF-8"),
    ("/glm.v1.TextGeneration/Tokenize", field(2, BAD_UTF8), "prompt: invalid UTF-8"),
    ("/glm.v1.TextGeneration/ModelInfo", field(1, BAD_UTF8), "model: invalid UTF-8"),
    ("/grpc.health.v1.Health/Check", field(1, BAD_UTF8), "service: invalid UTF-8"),
]


def test_bytes_that_do_not_parse_are_invalid_argument_naming_the_field(gateway, redis_db):
    running = gateway()
    for method, data, needle in MALFORMED:
        error = raw_call(running.address, method, data, streaming=method == STREAM)
        assert isinstance(error, grpc.RpcError), (method, data)
        assert error.code() == Code.INVALID_ARGUMENT and error.details().startswith(needle), \
            (method, data, error.code(), error.details())
    assert not redis_db.client.exists(keys.queue(running.model)), "a malformed call enqueued something"
    # The same gateway still answers well-formed calls.
    reply = raw_call(running.address, "/grpc.health.v1.Health/Check", b"")
    assert health_pb2.HealthCheckResponse.FromString(reply).status == health_pb2.HealthCheckResponse.SERVING


def test_a_call_without_an_api_key_is_refused_before_its_bytes_are_judged(gateway):
    running = gateway("--api-key", "k1")
    error = raw_call(running.address, GENERATE, field(2, BAD_UTF8))
    assert error.code() == Code.UNAUTHENTICATED
    error = raw_call(running.address, GENERATE, field(2, BAD_UTF8), metadata=(("authorization", "Bearer k1"),))
    assert error.code() == Code.INVALID_ARGUMENT and error.details().startswith("prompt: invalid UTF-8")


def test_the_largest_uint64_seed_is_accepted_and_queued_as_it_is(gateway, redis_db):
    running = gateway()
    request_id = f"seed-{uuid.uuid4().hex[:8]}"
    with GLMClient(running.address) as client:
        # No pool consumes the queue: the call ends at its deadline, after the enqueue.
        with pytest.raises(GLMError) as info:
            client.generate("Say [MASK]", request_id=request_id, seed=2**64 - 1, temperature=1.0, timeout=10.0)
    assert info.value.code == Code.DEADLINE_EXCEEDED
    [(_, fields)] = redis_db.client.xrange(keys.queue(running.model))
    assert QueuedRequest.from_json(fields[keys.FIELD.encode()]).sampling.seed == 2**64 - 1


def test_metrics_listen_on_loopback_by_default(gateway):
    port = free_port()
    gateway("--metrics-port", str(port))
    assert listening_hosts(port) == {"127.0.0.1"}


def test_sigterm_cancels_the_running_calls_and_writes_their_cancel_keys(gateway, redis_db):
    running = gateway("--grace-period-s", "1")
    ids = [f"term-{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
    codes: list[Code] = []

    def stream(request_id: str) -> None:
        with GLMClient(running.address, timeout=HANG_S) as client:
            try:
                for _ in client.generate_stream("Say [MASK]", request_id=request_id):
                    pass
            except GLMError as error:
                codes.append(error.code)

    threads = [threading.Thread(target=stream, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    queue = keys.queue(running.model)
    assert wait_for(lambda: redis_db.client.xlen(queue) == len(ids)), "the streams were not all enqueued"
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(HANG_S) == 0
    for thread in threads:
        thread.join(HANG_S)
    assert len(codes) == len(ids) and Code.OK not in codes, codes
    missing = [i for i in ids if redis_db.client.get(keys.cancel(internal_id(i))) != b"1"]
    assert not missing, f"no cancel key after SIGTERM for {missing}"
