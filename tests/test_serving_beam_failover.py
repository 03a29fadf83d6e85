"""`kill -9` of the pool holding a beam search, on the whole system (real gateway, two
schedulers and their worker processes, this module's own database of the machine's Redis 7):
the other pool claims the request, restarts the search from its blank and the caller gets
`glm generate --num-beams`'s candidates, published once. No verdict depends on timing: the
workers are held with SIGSTOP while a scheduler takes the request."""

from __future__ import annotations

import os
import signal
import threading
import uuid

import pytest
import redis

from redis_harness import url

from services.client import GLMClient
from services.common import redis_keys as keys
from services.common.messages import Event
from services.common.net import free_port
from services.local import LocalStack
from services.local_options import ServeOptions
from tests.test_serving_e2e import CALL_S, PROMPTS, beam_reference, pending_by_consumer, wait_until

pytestmark = [pytest.mark.processes, pytest.mark.slow, pytest.mark.redis]

MACHINE_REDIS = url(__name__)      # this module's own database (tests/redis_harness.py)


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=7)


@pytest.fixture(scope="module")
def two_beam_pools(tiny, tmp_path_factory, redis_db):
    options = ServeOptions.from_flat(dtype="float32",
        checkpoint=tiny, model_name=f"e2e3-{uuid.uuid4().hex[:8]}", port=free_port(), tp=1, pools=2,
        redis_url=MACHINE_REDIS, scheduler_args=("--claim-idle-ms", "2000"),
        workdir=str(tmp_path_factory.mktemp("logs3")))
    s = LocalStack(options).start()
    yield s
    s.stop()


def test_kill_9_of_the_pool_holding_a_beam_search_restarts_it_elsewhere(two_beam_pools, tiny):
    """A beam search publishes nothing before its blank ends: killed with its pool, it is
    claimed by the other pool, restarted from its blank (its draws are seeded), and the caller
    gets the very candidates `glm generate --num-beams` gives, once. Both pools' workers are
    held (SIGSTOP) while a scheduler takes the request, so the kill comes before any of its
    steps whatever the machine's load; the survivor's worker is released after the kill."""
    stack, r = two_beam_pools, redis.Redis.from_url(MACHINE_REDIS)
    model, prompt, request_id = stack.options.model_name, PROMPTS[1], f"beams-{uuid.uuid4().hex}"
    want = beam_reference(tiny, prompt, 40, min_new_tokens=40, num_beams=3, length_penalty=0.8, beam_seed=77)
    internal = keys.namespaced(keys.ANONYMOUS, request_id)
    result: dict = {}

    def call():
        with GLMClient(stack.address) as client:
            result["reply"] = client.generate(prompt, model=model, max_new_tokens=40, min_new_tokens=40,
                                              num_beams=3, length_penalty=0.8, seed=77, request_id=request_id,
                                              timeout=CALL_S)

    workers = [pid for pool in stack.pools for pid in pool.pids]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    caller = threading.Thread(target=call)
    try:
        caller.start()
        owner = wait_until(lambda: [n for n, k in pending_by_consumer(r, model).items() if k > 0], "a pool takes it")
        index = next(i for i, p in enumerate(stack.pools) if owner[0].endswith(f"-{p.pids[0]}"))
        for pid in [stack.schedulers[index].pid] + stack.pools[index].pids:
            os.kill(pid, signal.SIGKILL)
        assert r.xlen(keys.events(internal)) == 0        # nothing of it was computed, nor published
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    caller.join(CALL_S)
    reply = result["reply"]
    assert [list(c.token_ids) for c in reply.candidates] == [ids for ids, _ in want]
    assert [c.score for c in reply.candidates] == pytest.approx([s for _, s in want], rel=2e-5)
    assert list(reply.token_ids) == want[0][0] and len(reply.token_ids) == 40
    assert [Event.from_json(f[keys.FIELD.encode()]).type for _, f in r.xrange(keys.events(internal))] == \
        ["tokens", "blank", "final"]                     # one publication, by the pool that resumed it
