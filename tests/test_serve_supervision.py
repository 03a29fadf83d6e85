"""``glm serve`` supervises its schedulers (services/local.py): a scheduler killed with
SIGKILL is started again as a new consumer, the gateway's health follows its pool's
heartbeat, and the stack serves a request after the restart. Its own private Redis
(``glm serve`` without ``--redis-url``); verdicts on process ids, health statuses and
replies, ``HANG_S`` only bounds a hang."""

from __future__ import annotations

import os
import signal
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import GLMClient
from services.common.local_redis import LocalRedisError, find_redis_server
from services.common.net import free_port
from services.local import LocalStack
from services.local_options import ServeOptions

pytestmark = [pytest.mark.redis, pytest.mark.processes, pytest.mark.slow]
HANG_S = 90.0


def wait_until(predicate, what: str):
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {HANG_S} s")


def service_status(address: str, service: str) -> int:
    try:
        with grpc.insecure_channel(address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5).status
    except grpc.RpcError:
        return -1


def test_a_killed_scheduler_is_restarted(checkpoint, tmp_path):
    try:
        find_redis_server()
    except LocalRedisError as exc:
        pytest.skip(str(exc))
    name = f"sup-{uuid.uuid4().hex[:8]}"
    options = ServeOptions.from_flat(dtype="float32", checkpoint=checkpoint("glm-tiny", tp=1, seed=5), model_name=name,
                                     port=free_port(), tp=1, pools=1, workdir=str(tmp_path))
    stack = LocalStack(options).start()
    try:
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: service_status(stack.address, f"glm.v1.TextGeneration/{name}") == serving,
                   "the pool's heartbeat in the gateway's health")
        first = stack.schedulers[0]
        os.kill(first.pid, signal.SIGKILL)
        first.wait()

        def restarted():
            stack.check_alive()
            return stack.schedulers[0] is not first and stack.schedulers[0].poll() is None

        wait_until(restarted, "the scheduler started again")
        assert stack.restarts == [1] and stack.pool_ids[0].endswith("-r1")

        def serving_again():
            stack.check_alive()
            return service_status(stack.address, f"glm.v1.TextGeneration/{name}") == serving

        wait_until(serving_again, "the new scheduler's heartbeat")
        with GLMClient(stack.address, timeout=HANG_S) as client:
            reply = client.generate("Hello [gMASK]", max_new_tokens=4, temperature=0.0)
        assert reply.finish_reason in ("stop", "length")
    finally:
        stack.stop()
