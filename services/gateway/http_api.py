"""The gateway's OpenAI-compatible HTTP front (``--http-port``), on aiohttp.

Routes: ``POST /v1/completions`` (unary, or server-sent events with ``stream: true`` ending in
``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``. A completion
is the same call as the gRPC ``Generate``/``GenerateStream``: the body becomes a
``GenerateRequest`` and runs through the same ``TextGenerationService`` in this process, with
an ``HttpCall`` standing in for the gRPC call context, so validation, tenants, idempotency,
the concurrent-call limit, metrics, tracing (a ``traceparent`` header is honoured) and the
cancel-on-abandon rule are one code path for both APIs.

The body (OpenAI's completions fields): ``model``, ``prompt`` (text with ``[MASK]``,
``[sMASK]`` or ``[gMASK]``, or token ids; one prompt a request), ``max_tokens`` (16 when
absent, as OpenAI's), ``temperature`` (0 = greedy), ``top_p``, ``stop`` (text or list),
``seed``, ``logprobs`` (the per-token detail with that many alternatives, up to the
gateway's limit, 5),
``presence_penalty``, ``frequency_penalty``, ``stream``, ``stream_options.include_usage``,
``n`` (choices: samples ``GenerateRequest.n``, each with its ``seed``; streamed, their chunks
interleave, each naming its ``index``), ``best_of`` (unary: ``best_of`` samples, the ``n``
with the highest summed log-probability returned, as OpenAI's), ``echo`` (false only),
``user`` (ignored). GLM's extras, as extra body fields: ``top_k``, ``repetition_penalty``,
``min_tokens``, ``request_id`` (the idempotency key), the beam search (``num_beams`` >= 2,
``length_penalty``, ``no_repeat_ngram_size``, ``beam_deterministic``: the choices are the
``n`` best beams, each with its ``score``; streamed, the best beam's text comes when its blank
ends, then the other choices); and vLLM's ``ignore_eos`` (``min_tokens`` = ``max_tokens``).
Each choice carries GLM's ``blanks`` (the text of each filled blank; the first choice only)
and ``output_text`` (the prompt with its blanks filled) beside ``text``; ``seed`` is reported
at the top level (sample 0's).

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad body or a value out of range (``param`` names the body field), 401 without a valid API key
(``Authorization: Bearer KEY``, the gateway's keys), 404 for an unknown model or route, 409 for
a reused ``request_id``, 429 when the queue or the gateway is full, 503 when the queue cannot
be reached, 504 past a deadline. A stream that fails after its first event ends with one
``data: {"error": ...}`` event. A client that disconnects cancels its generation (the
request's cancel key is set; the pool drops it within one step).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from typing import Any

import grpc
from aiohttp import web

from services.gateway.auth import ApiKeyInterceptor
from services.gateway.catalog import Catalog
from services.gateway.service import TextGenerationService
from services.proto_gen.glm.v1 import generation_pb2 as pb

log = logging.getLogger("glm.gateway")

OPENAI_MAX_TOKENS = 16                # OpenAI's default max_tokens for completions
UINT32, UINT64 = 2**32 - 1, 2**64 - 1   # the protobuf fields' ranges; the gateway checks the limits
FORWARDED_HEADERS = ("authorization", "traceparent", "tracestate")

# gRPC status -> (HTTP status, OpenAI error type)
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
# the GenerateRequest field a validation message names -> the body field it came from
BODY_FIELD = {
    "prompt": "prompt", "prompt_token_ids": "prompt", "request_id": "request_id", "model": "model",
    "sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
    "sampling.repetition_penalty": "repetition_penalty", "sampling.presence_penalty": "presence_penalty",
    "sampling.frequency_penalty": "frequency_penalty", "sampling.seed": "seed",
    "stopping.max_new_tokens": "max_tokens", "stopping.min_new_tokens": "min_tokens", "stopping.stop": "stop",
    "output.top_logprobs": "logprobs", "output.logprobs": "logprobs", "n": "n",
    "beam_search.num_beams": "num_beams", "beam_search.length_penalty": "length_penalty",
    "beam_search.no_repeat_ngram_size": "no_repeat_ngram_size",
}


class BadRequest(Exception):
    """A body the front cannot turn into a GenerateRequest: 400 naming ``param``."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class Aborted(Exception):
    """What ``HttpCall.abort`` raises: the servicer ended the call with ``code``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class HttpCall:
    """The part of a ``grpc.aio`` call context ``TextGenerationService`` uses, for one HTTP
    request: its metadata (the forwarded headers), no deadline, done-callbacks (run by
    ``done``, however the request ended), and ``abort`` (raises ``Aborted``)."""

    def __init__(self, request: web.Request) -> None:
        self._metadata = tuple((name, request.headers[name]) for name in FORWARDED_HEADERS
                               if name in request.headers)
        self._callbacks: list = []

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> float | None:
        return None

    def add_done_callback(self, callback) -> None:
        self._callbacks.append(callback)

    async def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)

    def done(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)


# ---- the body -> GenerateRequest ----------------------------------------------------------

def _number(body: dict, name: str, kind=float, low=None, high=None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(name, f"{name}: must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadRequest(name, f"{name}: {value} is outside [{low}, {high}]")
    return kind(value)


def _prompt(body: dict, request: pb.GenerateRequest) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise BadRequest("prompt", f"prompt: {len(prompt)} prompts; this server takes one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        request.prompt_token_ids.extend(prompt)
    else:
        raise BadRequest("prompt", "prompt: must be a string, a list of token ids, or a list of one of them")


def _choices(body: dict, request: pb.GenerateRequest) -> int:
    """``n``, ``best_of`` and the beam-search extras into ``request``; the choices to return."""
    n = _number(body, "n", int, 1, UINT32) or 1
    best_of = _number(body, "best_of", int, 1, UINT32)
    if best_of is not None and best_of < n:
        raise BadRequest("best_of", f"best_of: {best_of} is less than n {n}")
    beams = _number(body, "num_beams", int, 0, UINT32) or 0
    b = request.beam_search
    b.num_beams = beams
    if (v := _number(body, "length_penalty")) is not None:
        b.length_penalty = v
    if (v := _number(body, "no_repeat_ngram_size", int, 0, UINT32)) is not None:
        b.no_repeat_ngram_size = v
    deterministic = body.get("beam_deterministic", False)
    if not isinstance(deterministic, bool):
        raise BadRequest("beam_deterministic", "beam_deterministic: must be true or false")
    b.deterministic = deterministic
    if beams >= 2:
        if n > beams:
            raise BadRequest("n", f"n: {n} choices, more than the {beams} beams")
        if best_of is not None and best_of != beams:
            raise BadRequest("best_of", "best_of: with a beam search the candidates are its num_beams beams")
        return n
    if body.get("stream") and best_of is not None and best_of != n:
        raise BadRequest("best_of", "best_of: cannot be streamed (the best are known once every sample ended)")
    request.n = best_of or n
    return n


def completion_request(body: Any) -> tuple[pb.GenerateRequest, int | None, int]:
    """The ``GenerateRequest`` of a completions body, its ``logprobs`` (None: not asked) and
    the number of choices to return."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the body must be a JSON object")
    request = pb.GenerateRequest()
    model = body.get("model", "")
    if not isinstance(model, str):
        raise BadRequest("model", "model: must be a string")
    request.model = model
    _prompt(body, request)
    choices = _choices(body, request)
    if body.get("echo"):
        raise BadRequest("echo", "echo: not supported; the reply's output_text holds the prompt with its blanks filled")
    if body.get("suffix"):
        raise BadRequest("suffix", "suffix: not supported; put [MASK] where the text should go")
    if body.get("logit_bias"):
        raise BadRequest("logit_bias", "logit_bias: not supported")
    request_id = body.get("request_id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise BadRequest("request_id", "request_id: must be a string")
        request.request_id = request_id
    s = request.sampling
    if (v := _number(body, "temperature")) is not None:
        s.temperature = v
    if (v := _number(body, "top_p")) is not None:
        s.top_p = v
    if (v := _number(body, "top_k", int, 0, UINT32)) is not None:
        s.top_k = v
    if (v := _number(body, "repetition_penalty")) is not None:
        s.repetition_penalty = v
    if (v := _number(body, "presence_penalty")) is not None:
        s.presence_penalty = v
    if (v := _number(body, "frequency_penalty")) is not None:
        s.frequency_penalty = v
    if (v := _number(body, "seed", int, 0, UINT64)) is not None:
        s.seed = v
    st = request.stopping
    max_tokens = _number(body, "max_tokens", int, 0, UINT32)
    st.max_new_tokens = OPENAI_MAX_TOKENS if max_tokens is None else max_tokens
    if (v := _number(body, "min_tokens", int, 0, UINT32)) is not None:
        st.min_new_tokens = v
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos", "ignore_eos: must be true or false")
    if ignore_eos:                          # vLLM's extension: no end token before max_tokens
        st.min_new_tokens = st.max_new_tokens
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise BadRequest("stop", "stop: must be a string or a list of strings")
        st.stop.extend(stops)
    logprobs = _number(body, "logprobs", int, 0, UINT32)
    if logprobs is not None:
        request.output.logprobs = True
        request.output.top_logprobs = logprobs
    return request, logprobs, choices


# ---- replies ------------------------------------------------------------------------------

def _logprobs(tokens, offset: int) -> dict:
    """OpenAI's completions ``logprobs`` object of ``tokens`` (GeneratedToken), text offsets
    from ``offset`` in the completion's text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(t.text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({alt.text: alt.logprob for alt in t.top_logprobs})
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


def _usage(usage: pb.Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.generated_tokens,
            "total_tokens": usage.prompt_tokens + usage.generated_tokens}


def completion_response(reply: pb.GenerateResponse, logprobs: int | None, created: int, n: int = 1,
                        beams: bool = False) -> dict:
    """The completion of ``reply``: one choice, or ``n`` of its candidates (``beams``: the
    first ``n``, best first; samples: in order, or of ``best_of`` > ``n`` the ``n`` best by
    summed log-probability, best first)."""
    if not reply.candidates:
        choices = [{"text": reply.text, "index": 0, "finish_reason": reply.finish_reason or None,
                    "logprobs": _logprobs(reply.tokens, 0) if logprobs is not None else None,
                    "blanks": list(reply.blanks), "output_text": reply.output_text}]
    else:
        chosen = list(reply.candidates)
        if not beams and len(chosen) > n:                                    # best_of samples
            chosen = sorted(chosen, key=lambda c: -c.score)
        choices = [_choice(c, i, logprobs) for i, c in enumerate(chosen[:n])]
        choices[0]["blanks"] = list(reply.blanks) if chosen[0].index == 0 else []
    return {"id": f"cmpl-{reply.request_id}", "object": "text_completion", "created": created,
            "model": reply.model, "choices": choices, "usage": _usage(reply.usage), "seed": reply.seed}


def _choice(c: pb.Candidate, index: int, logprobs: int | None) -> dict:
    return {"text": c.text, "index": index, "finish_reason": c.finish_reason or None,
            "logprobs": _logprobs(c.tokens, 0) if logprobs is not None else None,
            "output_text": c.output_text, "seed": c.seed, "score": c.score}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _grpc_error(exc: Aborted) -> tuple[int, dict]:
    status, kind = STATUS.get(exc.code, (500, "server_error"))
    message, param = exc.details, None
    field = message.split(":", 1)[0].split("[", 1)[0] if ":" in message else ""
    if field in BODY_FIELD:
        param = BODY_FIELD[field]
        message = param + message[len(field):]
    code = exc.code.name.lower()
    return status, error_body(message, kind, param, code)


def _json(status: int, body: dict) -> web.Response:
    return web.json_response(body, status=status)


# ---- the server ---------------------------------------------------------------------------

class OpenAIFront:
    """The aiohttp application over ``service``; ``start`` binds it, ``stop`` drains it."""

    def __init__(self, service: TextGenerationService, catalog: Catalog, *, api_keys=(), healthy=None,
                 on_denied=None) -> None:
        self.service, self.catalog = service, catalog
        self.keys = ApiKeyInterceptor(list(api_keys)) if api_keys else None
        self.healthy = healthy or (lambda: True)       # () -> bool: Redis reachable and a pool alive
        self.on_denied = on_denied
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    shutdown_timeout: float = 30.0) -> int:
        # handler_cancellation: a client that goes away cancels its handler, so its generation stops
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                    shutdown_timeout=shutdown_timeout)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _json(exc.status, error_body(exc.reason, "invalid_request_error" if exc.status < 500
                                                else "server_error"))

    def _denied(self, request: web.Request) -> web.Response | None:
        if self.keys is None or self.keys.authorized(HttpCall(request).invocation_metadata()):
            return None
        if self.on_denied is not None and request.path == "/v1/completions":
            self.on_denied("/glm.v1.TextGeneration/Generate")
        missing = "authorization" not in request.headers
        message = ("missing API key: send 'Authorization: Bearer <key>'" if missing else "invalid API key")
        return _json(401, error_body(message, "authentication_error", None, "invalid_api_key"))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _json(400, error_body(f"the body is not JSON: {exc}", "invalid_request_error"))
        try:
            message, logprobs, n = completion_request(body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("stream", "stream: must be true or false")
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise BadRequest("stream_options", "stream_options: must be an object")
        except BadRequest as exc:
            return _json(400, error_body(str(exc), "invalid_request_error", exc.param))
        call = HttpCall(request)
        try:
            if stream:
                return await self._stream(request, call, message, logprobs, bool(options.get("include_usage")), n)
            try:
                reply = await self.service.Generate(message, call)
            except Aborted as exc:
                return _json(*_grpc_error(exc))
            return _json(200, completion_response(reply, logprobs, int(time.time()), n,
                                                  beams=message.beam_search.num_beams >= 2))
        finally:
            call.done()        # the servicer's done-callback: cancel a generation left behind

    async def _stream(self, request: web.Request, call: HttpCall, message: pb.GenerateRequest,
                      logprobs: int | None, include_usage: bool, n: int = 1) -> web.StreamResponse:
        """Server-sent chunks: one choice each (samples interleave, each naming its ``index``);
        a beam search's other ``n - 1`` choices come whole after the best one ended; then the
        usage chunk (when asked) and ``data: [DONE]``."""
        created, response, offsets = int(time.time()), None, {}
        beams = message.beam_search.num_beams >= 2
        chunks = self.service.GenerateStream(message, call)
        try:
            async for part in chunks:
                if response is None:                 # headers once the request is accepted
                    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache"})
                    await response.prepare(request)
                index = part.candidate
                offset = offsets.get(index, 0)
                choice = {"text": part.text, "index": index, "finish_reason": part.finish_reason or None,
                          "logprobs": _logprobs(part.tokens, offset) if logprobs is not None else None}
                offsets[index] = offset + len(part.text)
                chunk = {"id": f"cmpl-{part.request_id}", "object": "text_completion", "created": created,
                         "model": self.catalog.get(message.model).name, "choices": [choice]}
                if part.finish_reason:
                    choice.update(output_text=part.output_text, seed=part.seed)
                    chunk["seed"] = part.seed
                    if beams:
                        choice["score"] = part.candidates[0].score if part.candidates else 0.0
                await _event(response, chunk)
                last = part.finish_reason and (part.candidates or not message.n or message.n == 1)
                if last and beams:
                    for i, c in enumerate(part.candidates[1:n], start=1):
                        await _event(response, {**chunk, "choices": [_choice(c, i, logprobs)]})
                if last and include_usage:
                    await _event(response, {**chunk, "choices": [], "usage": _usage(part.usage)})
        except Aborted as exc:
            status, body = _grpc_error(exc)
            if response is None:
                return _json(status, body)
            await _event(response, body)
        finally:
            await chunks.aclose()
        if response is None:                         # ended before its first event
            return _json(500, error_body("the stream ended without a message", "server_error"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return _json(200, {"object": "list", "data": [_model(served.spec()) for served in self.catalog]})

    async def model(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        name = request.match_info["model"]
        served = next((m for m in self.catalog if m.name == name), None)
        if served is None:
            return _json(404, error_body(f"model: {name!r} is not served here", "not_found_error", "model",
                                         "model_not_found"))
        return _json(200, _model(served.spec()))

    async def health(self, request: web.Request) -> web.Response:
        up = self.healthy()
        return _json(200 if up else 503, {"status": "ok" if up else "unavailable"})


def _model(spec: pb.ModelSpec) -> dict:
    return {"id": spec.name, "object": "model", "created": 0, "owned_by": "glm",
            "max_model_len": spec.max_sequence_length}


async def _event(response: web.StreamResponse, body: dict) -> None:
    await response.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")
