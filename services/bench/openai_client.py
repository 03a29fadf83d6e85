"""Stream one benchmark request from an OpenAI-compatible completions server (``--api openai``).

Each request is one ``POST /v1/completions`` with ``stream: true``; the server answers with
server-sent events, one JSON completion chunk per ``data:`` event, then ``data: [DONE]``. The
request asks for exactly ``max_new_tokens`` tokens: ``max_tokens`` plus vLLM's extra fields
``min_tokens`` and ``ignore_eos`` (servers that do not know them ignore or reject them;
``--extra-body`` changes the fields sent). Greedy is ``temperature: 0``. The prompt is the
workload's text as it is: a server without GLM's blank-filling sees ``[MASK]`` as plain text.

How tokens are counted (the stream carries text, and one chunk may hold several tokens):

* per chunk, in this order of preference: the chunk's ``token_ids`` (vLLM's
  ``return_token_ids``), else the growth of its running ``usage.completion_tokens`` (vLLM's
  ``stream_options.continuous_usage_stats``), else one token for a chunk with text;
* per request, the final ``usage`` (``stream_options.include_usage``) is the count
  (``generated_tokens``). Where the chunks said nothing of their own count and the final usage
  differs from the number of chunks with text, the usage count is spread over those chunks as
  evenly as whole numbers allow (a server that streams every k tokens sends k per chunk).

The arrival time of each chunk then gives TTFT and ITL exactly as for the gRPC stream
(``services/bench/stats.py``). Which rule counted a request is kept in ``count_source``.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from services.bench.stats import RequestResult
from services.bench.workload import BenchRequest

BODY_CHARS = 200        # of an error body, in the report
FINISHED = ("length", "stop")

SOURCE_TOKEN_IDS = "token_ids"
SOURCE_RUNNING_USAGE = "running usage"
SOURCE_CHUNKS = "one per chunk"
SOURCE_SPREAD = "final usage spread over chunks"


class OpenAIError(RuntimeError):
    """The server could not be reached or refused a request; the message says which and why."""


def base_url(address: str) -> str:
    """``HOST:PORT`` or ``http(s)://HOST:PORT[/PREFIX]`` to the API's root (``.../v1``)."""
    url = address if "://" in address else f"http://{address}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"--address/--peer: expected HOST:PORT or http://HOST:PORT, got {address!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/') or '/v1'}"


def completion_body(req: BenchRequest, *, model: str, temperature: float,
                    extra_body: dict | None = None) -> dict:
    """The JSON body of one request; ``extra_body`` entries replace the defaults (None drops one)."""
    body = {
        "model": model, "prompt": req.prompt, "max_tokens": req.max_new_tokens,
        "min_tokens": req.stop_after or req.max_new_tokens, "ignore_eos": True, "temperature": temperature,
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if temperature > 0:
        body["seed"] = req.seed
    for key, value in (extra_body or {}).items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


async def sse_data(lines):
    """The ``data`` of each server-sent event read from an async iterator of byte lines (the
    fields ``event``, ``id``, ``retry`` and comments are skipped; multi-line data is joined by
    ``\\n``, as the event-stream format says)."""
    data: list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` whole numbers as equal as can be, the larger ones last."""
    low, extra = divmod(total, parts)
    return [low] * (parts - extra) + [low + 1] * extra


class ChunkCounter:
    """Applies the counting rule of the module docstring to one request's chunks."""

    def __init__(self) -> None:
        self.counts: list[int] = []      # tokens per chunk with tokens, as the chunk said or 1
        self.guessed = False             # a chunk that gave no count of its own
        self.by_ids = False
        self.running = 0                 # the last running usage.completion_tokens seen

    def tokens_in(self, chunk: dict) -> int:
        """Tokens the chunk carries (0 for a chunk without any: the usage chunk, a keep-alive)."""
        usage = chunk.get("usage") or {}
        choices = chunk.get("choices") or []
        ids = [c.get("token_ids") for c in choices if isinstance(c.get("token_ids"), list)]
        if ids:
            n, self.by_ids = sum(map(len, ids)), True
        elif choices and isinstance(usage.get("completion_tokens"), int):
            n = usage["completion_tokens"] - self.running
        elif any(c.get("text") for c in choices):
            n, self.guessed = 1, True
        else:
            n = 0
        if isinstance(usage.get("completion_tokens"), int):
            self.running = usage["completion_tokens"]
        if n > 0:
            self.counts.append(n)
        return max(n, 0)

    def settle(self, final_tokens: int | None) -> tuple[list[int], str]:
        """Per-chunk counts after the final usage, and which rule gave them."""
        if self.guessed and final_tokens is not None and final_tokens != len(self.counts) and self.counts:
            return spread(final_tokens, len(self.counts)), SOURCE_SPREAD
        if self.guessed:
            return self.counts, SOURCE_CHUNKS
        return self.counts, SOURCE_TOKEN_IDS if self.by_ids else SOURCE_RUNNING_USAGE


class OpenAICompletions:
    """An async client of one OpenAI-compatible server, streaming ``/v1/completions``."""

    def __init__(self, address: str, *, extra_body: dict | None = None) -> None:
        self.root = base_url(address)
        self.extra_body = dict(extra_body or {})
        self._session = None

    async def __aenter__(self) -> "OpenAICompletions":
        try:
            import aiohttp
        except ImportError:
            raise OpenAIError("--api openai needs aiohttp (a dependency of glm-serve): pip install 'aiohttp>=3.9'") from None
        self._aiohttp = aiohttp
        # no pool limit: --concurrency is the only bound on calls in flight
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def model_name(self, timeout_s: float = 30.0) -> str:
        """The first model the server lists at ``GET /v1/models``."""
        url = f"{self.root}/models"
        try:
            async with self._session.get(url, timeout=self._aiohttp.ClientTimeout(total=timeout_s)) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise OpenAIError(f"GET {url}: HTTP {resp.status}: {text[:BODY_CHARS]}")
                models = json.loads(text).get("data") or []
        except (self._aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise OpenAIError(f"GET {url}: {_describe(exc)}") from None
        if not models or "id" not in models[0]:
            raise OpenAIError(f"GET {url}: the server lists no model; name one")
        return models[0]["id"]

    async def measure(self, req: BenchRequest, res: RequestResult, *, model: str, temperature: float,
                      clock, timeout_s: float) -> None:
        """Send one request and fill ``res`` with what its stream measured."""
        body = completion_body(req, model=model, temperature=temperature, extra_body=self.extra_body)
        url = f"{self.root}/completions"
        try:
            async with self._session.post(url, json=body,
                                          timeout=self._aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status >= 400:
                    text = await resp.text()
                    res.error = f"HTTP {resp.status}: {' '.join(text.split())[:BODY_CHARS]}"
                    return
                await self._read(sse_data(resp.content), res, clock, req.stop_after)
        except self._aiohttp.ClientError as exc:
            res.error = _describe(exc)
        except asyncio.TimeoutError:
            res.error = f"no answer within {timeout_s:g} s"

    async def _read(self, events, res: RequestResult, clock, stop_after: int = 0) -> None:
        """Fill ``res`` from the stream; with ``stop_after``, end it after that many tokens (the
        response is closed on return: the server sees the client go)."""
        counter = ChunkCounter()
        final_usage: dict = {}
        async for data in events:
            at = clock()
            if data.strip() == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                res.error = f"not JSON in the stream: {data[:BODY_CHARS]}"
                return
            if "error" in chunk:
                error = chunk["error"]
                res.error = f"stream error: {error.get('message', error) if isinstance(error, dict) else error}"
                res.error = res.error[:BODY_CHARS]
                return
            n = counter.tokens_in(chunk)
            if n:                       # kept as it comes: a request cut short keeps what it got
                res.token_times.append((at, n))
                if res.first_token_s is None:
                    res.first_token_s = at
            for choice in chunk.get("choices") or []:
                if choice.get("finish_reason"):
                    res.finished_s = at
                    res.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                final_usage = chunk["usage"]
            if stop_after and sum(n for _, n in res.token_times) >= stop_after:
                from services.bench.driver import early_stop

                res.count_source = "chunks"
                early_stop(res, at, stop_after)
                res.prompt_tokens = int(final_usage.get("prompt_tokens") or 0)
                return
        final = final_usage.get("completion_tokens")
        counts, res.count_source = counter.settle(final if isinstance(final, int) else None)
        res.token_times = [(at, n) for (at, _), n in zip(res.token_times, counts)]
        res.prompt_tokens = int(final_usage.get("prompt_tokens") or 0)
        res.generated_tokens = final if isinstance(final, int) else sum(counts)
        if res.finish_reason and res.finish_reason not in FINISHED:
            res.error = f"finish_reason {res.finish_reason}"


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:BODY_CHARS]
