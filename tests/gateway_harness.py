"""Test harness for the gateway: a real ``grpc.aio`` gateway on its own event-loop
thread, and a scripted fake pool that takes entries from the real Redis queue and
writes events the way a scheduler does (the real scheduler is tested on its own).

Every wait here is for an event, with a bound (``HANG_S``) that only turns a hang into a
failure: a busy machine makes a test slower, never red."""

from __future__ import annotations

import asyncio
import datetime
import socket
import threading
import time
import uuid
from dataclasses import replace

import pytest
import redis

from model.tokenizer import GLMTokenizer
from redis_harness import SKIP_REASON, RedisDb, reachable, url
from services.common import redis_keys as keys
from services.common.messages import (EVENT_BLANK, EVENT_FINAL, EVENT_TOKENS, Event,
                                      QueuedRequest)
from services.gateway.auth import tenant_of
from services.client import GLMError
from services.gateway.server import Gateway, GatewayOptions

REDIS_URL = url("test_gateway")                 # the gateway tests' own database
HANG_S = 60.0                                   # bounds a wait for an event: only a hang reaches it


class LoopThread:
    """An asyncio loop on a daemon thread; ``run`` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = HANG_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class RunningGateway:
    """A ``Gateway`` started on a ``LoopThread``; ``address`` is where it listens."""

    def __init__(self, loop: LoopThread, options: GatewayOptions) -> None:
        self.loop = loop
        self.options = options
        self.gateway = Gateway(options)
        self.port = loop.run(self.gateway.start())
        self.address = f"127.0.0.1:{self.port}"
        self.model = options.models[0][0]

    def stop(self, grace: float = 0.0) -> None:
        self.loop.run(self.gateway.stop(grace), timeout=grace + HANG_S)


def internal_id(request_id: str, api_key: str | None = None) -> str:
    """The id the gateway gives a caller's ``request_id`` in Redis: namespaced by the
    tenant of ``api_key`` (``anonymous`` on a gateway without keys)."""
    return keys.namespaced(tenant_of(api_key), request_id)


def unique_model() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = HANG_S, interval: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def default_script(tokenizer):
    """Events of a plain one-blank generation: two token deltas, the blank, the final."""

    def script(queued: QueuedRequest):
        pieces = ["Hello", " world"]
        ids = [tokenizer.encode(p) for p in pieces]
        events, seq, index = [], 0, 0
        for piece, piece_ids in zip(pieces, ids):
            events.append(Event(EVENT_TOKENS, seq, blank=0, index=index, token_ids=tuple(piece_ids),
                                logprobs=tuple(-0.5 for _ in piece_ids) if queued.logprobs else (),
                                top_logprobs=tuple(((t, -0.5), (20005, -1.5)) for t in piece_ids)
                                if queued.top_logprobs else (),
                                text=piece))
            seq, index = seq + 1, index + len(piece_ids)
        all_ids = tuple(i for piece_ids in ids for i in piece_ids)
        events.append(Event(EVENT_BLANK, seq, blank=0, text="Hello world", token_ids=all_ids,
                            finish_reason="stop"))
        events.append(Event(EVENT_FINAL, seq + 1, finish_reason="stop", text="Hello world",
                            blanks=("Hello world",), output_text="Say Hello world",
                            prompt_tokens=len(queued.prompt_ids), generated_tokens=len(all_ids),
                            seed=queued.sampling.seed))
        return events

    return script


class FakePool:
    """Consumes ``glm:queue:{model}`` in group ``pools`` and plays ``script(queued)``:
    an ``Event`` is appended to the request's event stream, a float sleeps, a
    ``threading.Event`` is waited on (a stalled pool, until the test sets it)."""

    def __init__(self, model: str, script, delay: float = 0.0, redis_url: str = REDIS_URL) -> None:
        self.model = model
        self.script = script
        self.delay = delay
        self.seen: list[QueuedRequest] = []
        self.redis = redis.Redis.from_url(redis_url)
        self.stopped = threading.Event()
        try:
            self.redis.xgroup_create(keys.queue(model), keys.GROUP, id="0", mkstream=True)
        except redis.ResponseError:
            pass  # BUSYGROUP
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        queue = keys.queue(self.model)
        while not self.stopped.is_set():
            reply = self.redis.xreadgroup(keys.GROUP, "fake", {queue: ">"}, count=1, block=50)
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    queued = QueuedRequest.from_json(fields[keys.FIELD.encode()])
                    self.seen.append(queued)
                    time.sleep(self.delay)
                    self._play(queued)
                    self.redis.xack(queue, keys.GROUP, entry_id)
                    self.redis.xdel(queue, entry_id)

    def _play(self, queued: QueuedRequest) -> None:
        for step in self.script(queued):
            if isinstance(step, float):
                time.sleep(step)
            elif isinstance(step, threading.Event):
                step.wait(HANG_S)
            else:
                self.redis.xadd(keys.events(queued.id), {keys.FIELD: step.to_json()})
                self.redis.expire(keys.events(queued.id), keys.RESULT_TTL_S)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(HANG_S)
        self.redis.close()


def options(checkpoint, model: str | None = None, **overrides) -> GatewayOptions:
    base = GatewayOptions(models=((model or unique_model(), str(checkpoint)),), host="127.0.0.1",
                          port=0, redis_url=REDIS_URL, grace_period_s=1.0)
    return replace(base, **overrides)


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


# ---- fixtures of the gateway test modules (imported by name there) ------------------------

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
def rdb():
    """The gateway tests' database (``REDIS_URL``, the one every gateway and fake pool here
    uses), flushed before a module's first test and after its last, as a client; the module's
    tests are skipped when no Redis answers."""
    if not reachable():
        pytest.skip(SKIP_REASON)
    db = RedisDb("test_gateway")
    db.flush()
    yield db.client
    db.flush()
    db.close()


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
