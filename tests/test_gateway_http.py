"""The gateway's OpenAI-compatible HTTP front (``--http-port``, ``services/gateway/http_api.py``)
through the official ``openai`` client, against a real gateway on loopback and the real Redis,
with the scripted fake pool of tests/gateway_harness.py standing in for the scheduler: unary and
streamed completions and what reaches the queue, logprobs, errors in OpenAI's shape with their
HTTP statuses, API keys, the model list and health, and a client that disconnects cancelling
its generation."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid

import openai
import pytest

from gateway_harness import HANG_S, default_script, internal_id, self_signed, wait_for
from gateway_harness import checkpoint, loop, pools, rdb, start, tokenizer  # noqa: F401 (fixtures)
from services.common import redis_keys as keys
from services.common.messages import EVENT_TOKENS, Event

pytestmark = [pytest.mark.redis]


def client_of(gateway, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.gateway.http_port}/v1", api_key=api_key,
                         timeout=HANG_S, max_retries=0)


# the openai package's own HTTP client class (httpx2 in openai 3, httpx before)
http_client = getattr(openai, "DefaultHttpx2Client", None) or openai.DefaultHttpxClient


def get(gateway, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.gateway.http_port}{path}", timeout=HANG_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_completion_is_the_generate_call(start, pools, tokenizer):
    gateway = start(http_port=0)
    pool = pools(gateway.model, default_script(tokenizer))
    reply = client_of(gateway).completions.create(
        model=gateway.model, prompt="Say [MASK]", max_tokens=7, temperature=0.5, top_p=0.9, seed=42,
        stop=["\n\n"], extra_body={"top_k": 20, "repetition_penalty": 1.1, "min_tokens": 2})
    choice = reply.choices[0]
    assert choice.text == "Hello world" and choice.finish_reason == "stop" and choice.index == 0
    assert choice.model_extra["blanks"] == ["Hello world"] and choice.model_extra["output_text"] == "Say Hello world"
    assert reply.object == "text_completion" and reply.model == gateway.model and reply.id.startswith("cmpl-")
    assert reply.usage.completion_tokens == len(tokenizer.encode("Hello")) + len(tokenizer.encode(" world"))
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    queued = pool.seen[0]
    assert (queued.max_new_tokens, queued.min_new_tokens, queued.stop) == (7, 2, ("\n\n",))
    s = queued.sampling
    assert (s.temperature, s.top_k, s.seed) == (0.5, 20, 42)
    assert s.top_p == pytest.approx(0.9) and s.repetition_penalty == pytest.approx(1.1)
    # OpenAI's default max_tokens is 16; temperature 0 is greedy; vLLM's ignore_eos
    client_of(gateway).completions.create(model=gateway.model, prompt="Say [MASK]", temperature=0)
    assert pool.seen[1].max_new_tokens == 16 and pool.seen[1].sampling.temperature == 0
    client_of(gateway).completions.create(model=gateway.model, prompt="Say [MASK]", max_tokens=5,
                                          extra_body={"ignore_eos": True})
    assert pool.seen[2].min_new_tokens == pool.seen[2].max_new_tokens == 5


def test_a_streamed_completion_sends_deltas_then_done(start, pools, tokenizer):
    gateway = start(http_port=0)
    pools(gateway.model, default_script(tokenizer))
    chunks = list(client_of(gateway).completions.create(
        model=gateway.model, prompt="Say [MASK]", max_tokens=8, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == "Hello world" and texts[:2] == ["Hello", " world"]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop" and all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0       # the usage chunk
    assert len({c.id for c in chunks}) == 1


def test_logprobs_in_openais_completions_shape(start, pools, tokenizer):
    gateway = start(http_port=0)
    pools(gateway.model, default_script(tokenizer))
    reply = client_of(gateway).completions.create(model=gateway.model, prompt="Say [MASK]", max_tokens=8, logprobs=2)
    lp = reply.choices[0].logprobs
    n = reply.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(v == pytest.approx(-0.5) for v in lp.token_logprobs)
    assert all(len(alts) >= 1 for alts in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(t for t in lp.tokens)                    # each token's own text, as the gRPC API gives it


BAD = [  # (body fields, status, param)
    (dict(temperature=101.0), 400, "temperature"),            # the gateway's own range check, renamed
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(top_p=1.5), 400, "top_p"),
    (dict(logprobs=6), 400, "logprobs"),
    (dict(n=17), 400, "n"),                                    # over the gateway's max_n
    (dict(n=3, best_of=2), 400, "best_of"),
    (dict(num_beams=17), 400, "num_beams"),
    (dict(num_beams=2, n=3), 400, "n"),
    (dict(num_beams=2, stop=["x"]), 400, "stop"),
    (dict(num_beams=2, length_penalty=11.0), 400, "length_penalty"),
    (dict(stop=[1, 2]), 400, "stop"),
    (dict(prompt=["a [MASK]", "b [MASK]"]), 400, "prompt"),
    (dict(prompt=""), 400, "prompt"),
    (dict(max_tokens="8"), 400, "max_tokens"),
    (dict(request_id="has space"), 400, "request_id"),
]


@pytest.mark.parametrize("fields,status,param", BAD, ids=[p for _, _, p in BAD])
def test_bad_input_is_a_400_naming_the_field(start, rdb, fields, status, param):
    gateway = start(http_port=0)
    extra = dict(fields)
    prompt = extra.pop("prompt", "Say [MASK]")
    with pytest.raises(openai.BadRequestError) as info:
        client_of(gateway).completions.create(model=gateway.model, prompt=prompt, extra_body=extra)
    error = info.value
    assert error.status_code == status and error.param == param, error.body
    assert error.body["type"] == "invalid_request_error" and error.body["message"].startswith(param)
    assert rdb.xlen(keys.queue(gateway.model)) == 0                 # nothing was queued


def test_unknown_model_is_404_and_other_statuses_follow_grpc(start, rdb):
    gateway = start(http_port=0, max_queue_depth=1)
    with pytest.raises(openai.NotFoundError) as info:
        client_of(gateway).completions.create(model="no-such-model", prompt="Say [MASK]")
    assert info.value.body["code"] == "not_found"
    rdb.xadd(keys.queue(gateway.model), {"x": "1"})                 # the queue is full: 429
    with pytest.raises(openai.RateLimitError):
        client_of(gateway).completions.create(model=gateway.model, prompt="Say [MASK]")
    status, body = get(gateway, "/v1/nowhere")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


def test_api_keys_guard_the_http_front(start, pools, tokenizer):
    gateway = start(http_port=0, api_keys=("k-one",))
    pools(gateway.model, default_script(tokenizer))
    with pytest.raises(openai.AuthenticationError) as info:
        client_of(gateway, "wrong").completions.create(model=gateway.model, prompt="Say [MASK]")
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client_of(gateway, "wrong").models.list()
    reply = client_of(gateway, "k-one").completions.create(model=gateway.model, prompt="Say [MASK]")
    assert reply.choices[0].text == "Hello world"


def test_tls_serves_https_with_the_grpc_certificate(start, pools, tokenizer, tmp_path):
    import ssl

    cert, key = self_signed(tmp_path)
    gateway = start(http_port=0, tls_cert=str(cert), tls_key=str(key))
    pools(gateway.model, default_script(tokenizer))
    client = openai.OpenAI(base_url=f"https://localhost:{gateway.gateway.http_port}/v1", api_key="none",
                           timeout=HANG_S, max_retries=0, http_client=http_client(
                               verify=ssl.create_default_context(cafile=str(cert))))
    assert client.completions.create(model=gateway.model, prompt="Say [MASK]").choices[0].text == "Hello world"
    plaintext = openai.OpenAI(base_url=f"http://localhost:{gateway.gateway.http_port}/v1", api_key="none",
                              timeout=HANG_S, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        plaintext.models.list()


def test_models_and_health(start, rdb):
    gateway = start(http_port=0)
    models = client_of(gateway).models.list()
    assert [m.id for m in models.data] == [gateway.model]
    assert client_of(gateway).models.retrieve(gateway.model).model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        client_of(gateway).models.retrieve("no-such-model")
    assert get(gateway, "/health") == (503, {"status": "unavailable"})     # no pool alive yet
    heartbeat = keys.pool(f"http-{uuid.uuid4().hex[:8]}")
    rdb.hset(heartbeat, mapping={"model": gateway.model})
    rdb.expire(heartbeat, 60)
    try:
        assert wait_for(lambda: get(gateway, "/health") == (200, {"status": "ok"}))
    finally:
        rdb.delete(heartbeat)


def test_a_client_that_disconnects_cancels_its_generation(start, pools, rdb):
    gateway = start(http_port=0)
    stall = threading.Event()
    tokens = [Event(EVENT_TOKENS, i, index=i, token_ids=(20005,), text="a") for i in range(3)]
    pools(gateway.model, lambda q: [tokens[0], 0.2, tokens[1], 0.2, tokens[2], stall])
    request_id = f"leave-{gateway.model}"
    try:
        stream = client_of(gateway).completions.create(model=gateway.model, prompt="Say [MASK]", stream=True,
                                                       extra_body={"request_id": request_id})
        first = next(iter(stream))
        assert first.choices[0].text == "a"
        stream.close()                                   # the connection goes away
        assert wait_for(lambda: rdb.get(keys.cancel(internal_id(request_id))) == b"1")
    finally:
        stall.set()
