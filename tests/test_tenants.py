"""Tenant isolation in Redis, end to end: a real gateway with two API keys, a real
scheduler and a real worker pool (``glm serve``'s processes, ``services.local``), over
this module's own database of the machine's Redis (tests/redis_harness.py).

Tenant B first sends ids that, when a caller's id went into the keys as it was, spelled
the keys of tenant A's next requests: ``V:events`` (a string where A's event stream
goes: WRONGTYPE, and A's scheduler died), ``V:cancel`` (A's cancel key: A cancelled at
its first step), ``x:events``. Then A runs ``V`` and ``x``; then B re-uses A's id ``V``
with the same request. The order makes every collision certain, with no clock: B's keys
exist before A's requests are sent. Verdicts: A's requests run to their full length,
B's ``V`` is a generation of its own (not A's, re-attached), the scheduler is alive and
never logged WRONGTYPE, and every key in the database belongs to exactly one request.
"""

from __future__ import annotations

import uuid
from urllib.parse import unquote

import pytest

from services.client import GLMClient, GLMError
from services.common import redis_keys as keys
from services.common.messages import Event
from services.common.net import free_port
from services.gateway.auth import tenant_of
from services.local import LocalStack
from services.local_options import ServeOptions

pytestmark = [pytest.mark.processes, pytest.mark.slow, pytest.mark.redis]
HANG_S = 600.0                     # bounds a call: only a hang reaches it, on any load
KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"
NEW = 12                           # tokens of each of A's requests: min = max, so "length"


@pytest.fixture(scope="module")
def stack(checkpoint, redis_db, tmp_path_factory):
    options = ServeOptions.from_flat(dtype="float32",
        checkpoint=checkpoint("glm-tiny", tp=1, seed=11), model_name=f"tenants-{uuid.uuid4().hex[:8]}",
        port=free_port(), tp=1, pools=1, redis_url=redis_db.url,
        gateway_args=("--api-key", KEY_A, "--api-key", KEY_B), workdir=str(tmp_path_factory.mktemp("logs")))
    s = LocalStack(options).start()
    yield s
    s.stop()


def internal(api_key: str, request_id: str) -> str:
    return keys.namespaced(tenant_of(api_key), request_id)


def events_of(r, request_id: str) -> list[Event]:
    return [Event.from_json(fields[keys.FIELD.encode()]) for _, fields in r.xrange(keys.events(request_id))]


def stream(client: GLMClient, model: str, request_id: str, prompt: str, new: int):
    messages = list(client.generate_stream(prompt, model=model, request_id=request_id, temperature=0,
                                           max_new_tokens=new, min_new_tokens=new, timeout=HANG_S))
    return [t for m in messages for t in m.token_ids], messages[-1].finish_reason, {m.request_id for m in messages}


def test_one_tenant_cannot_touch_another_tenants_requests(stack, redis_db):
    r, model = redis_db.client, stack.options.model_name
    prompt = "The tenant's own [MASK]"
    made = []                                      # (api key, caller id): every request sent
    with GLMClient(stack.address, api_key=KEY_A) as a, GLMClient(stack.address, api_key=KEY_B) as b:
        for rid in ("V:events", "V:cancel", "x:events"):            # B first: A's future keys
            reply = b.generate("B [MASK]", model=model, request_id=rid, temperature=0, max_new_tokens=2,
                               timeout=HANG_S)
            assert reply.request_id == rid and reply.finish_reason
            made.append((KEY_B, rid))
        a_v = stream(a, model, "V", prompt, NEW)
        a_x = a.generate(prompt, model=model, request_id="x", temperature=0, max_new_tokens=NEW,
                         min_new_tokens=NEW, timeout=HANG_S)
        long_id = "L" * 128
        a_long = stream(a, model, long_id, prompt, NEW)
        made += [(KEY_A, "V"), (KEY_A, "x"), (KEY_A, long_id)]
        b_v = stream(b, model, "V", prompt, NEW)                     # B re-uses A's id
        made.append((KEY_B, "V"))
        for rid in ("V%3Acancel", "a/V", "V:événement", "L" * 129):  # refused, nothing written
            with pytest.raises(GLMError) as info:
                b.generate(prompt, model=model, request_id=rid, timeout=HANG_S)
            assert info.value.code.name == "INVALID_ARGUMENT" and info.value.details.startswith("request_id")

    # A's requests ran to their length, untouched: not cancelled, no error
    assert a_v[1] == "length" and len(a_v[0]) == NEW and a_v[2] == {"V"}
    assert a_x.finish_reason == "length" and len(a_x.token_ids) == NEW and a_x.request_id == "x"
    assert a_long[1] == "length" and a_long[2] == {long_id}
    # B's V is its own generation (greedy, same request: the same tokens), with its own events
    assert b_v[1] == "length" and b_v[0] == a_v[0] and b_v[2] == {"V"}
    assert events_of(r, internal(KEY_A, "V")) != [] and events_of(r, internal(KEY_B, "V")) != []
    assert [e.type for e in events_of(r, internal(KEY_B, "V"))][-1] == "final"

    # the scheduler is alive and never met a key of the wrong type
    stack.check_alive()
    for proc in stack.schedulers:
        assert "WRONGTYPE" not in stack.logs[proc.pid].read_text(errors="replace")

    # every key in the database belongs to one thing: the queue, the pool, or one request
    requests = {internal(key, rid) for key, rid in made}
    owned: dict[str, str] = {}
    for request_id in requests:
        for key, kind in ((keys.request(request_id), "string"), (keys.events(request_id), "stream")):
            assert r.type(key).decode() == kind, (key, request_id)
            owned[key] = request_id
    for raw in r.scan_iter("*"):
        key = raw.decode()
        if key in (keys.queue(model), *(keys.pool(p) for p in stack.pool_ids)):
            continue
        assert key in owned, f"{key}: a key no request of this test owns"
        prefix, kind, escaped, *_ = key.split(":")
        assert unquote(escaped) == owned[key]
    assert not any(r.exists(keys.cancel(request_id)) for request_id in requests)
    assert not r.exists(keys.dead_letter(model))
