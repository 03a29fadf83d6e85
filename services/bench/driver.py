"""Send a workload to a server and time every streamed message.

Each request is one streaming call, sent at its planned arrival time (or later, when
``concurrency`` calls are already in flight: the wait is reported as ``client_wait_s``). Nothing
new is sent after ``duration_s``, and calls still running then are cancelled and reported as cut.
Two APIs: ``grpc`` (our gateway's ``GenerateStream``) and ``openai`` (any server speaking
``POST /v1/completions`` with server-sent events, ``services/bench/openai_client.py``); the
scheduling and the timings are the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.bench.stats import RequestResult
from services.bench.workload import BenchRequest

APIS = ("grpc", "openai")
CUT = "cut at --duration-s"
FINISHED = ("length", "stop")


class GRPCGenerate:
    """Our gateway's ``GenerateStream``, one call per request."""

    def __init__(self, address: str) -> None:
        from services.client import AsyncGLMClient

        self._client = AsyncGLMClient(address)

    async def __aenter__(self) -> "GRPCGenerate":
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.__aexit__(*exc)

    async def model_name(self) -> str:
        return ""                       # the gateway's default model

    async def measure(self, req: BenchRequest, res: RequestResult, *, model: str, temperature: float,
                      clock, timeout_s: float) -> None:
        from services.client import GLMError

        options = dict(model=model, max_new_tokens=req.max_new_tokens,
                       min_new_tokens=req.stop_after or req.max_new_tokens, temperature=temperature, timeout=timeout_s)
        if temperature > 0:
            options["seed"] = req.seed
        try:
            async with contextlib.aclosing(self._client.generate_stream(req.prompt, **options)) as stream:
                async for message in stream:
                    at = clock()
                    if message.token_ids:
                        if res.first_token_s is None:
                            res.first_token_s = at
                        res.token_times.append((at, len(message.token_ids)))
                    if req.stop_after and sum(n for _, n in res.token_times) >= req.stop_after:
                        early_stop(res, at, req.stop_after)
                        return                 # closing the stream cancels the call
                    if self._finished(message, res, at):
                        return
        except GLMError as error:
            res.error = f"{error.code.name}: {error.details}"[:200]

    @staticmethod
    def _finished(message, res: RequestResult, at: float) -> bool:
        """Record the final message of a stream; True when ``message`` is it."""
        if not message.finish_reason:
            return False
        res.finished_s = at
        res.finish_reason = message.finish_reason
        res.prompt_tokens = message.usage.prompt_tokens
        res.generated_tokens = message.usage.generated_tokens
        if message.finish_reason not in FINISHED:
            res.error = f"finish_reason {message.finish_reason}"
        return True


def early_stop(res: RequestResult, at: float, tokens: int) -> None:
    """The client ends a request after its drawn length (``BenchRequest.stop_after``)."""
    res.token_times[-1] = (at, res.token_times[-1][1] - (sum(n for _, n in res.token_times) - tokens))
    res.finished_s, res.finish_reason, res.generated_tokens = at, "stop", tokens


def connect(api: str, address: str, *, extra_body: dict | None = None):
    """The client of ``api`` for ``address`` (an async context manager with ``model_name`` and
    ``measure``)."""
    if api == "grpc":
        return GRPCGenerate(address)
    if api == "openai":
        from services.bench.openai_client import OpenAICompletions

        return OpenAICompletions(address, extra_body=extra_body)
    raise ValueError(f"--api: choose from {', '.join(APIS)}, got {api!r}")


async def _one(client, req: BenchRequest, res: RequestResult, *, slots: asyncio.Semaphore,
               clock, **options) -> None:
    async with slots:
        res.sent_s = clock()
        try:
            await client.measure(req, res, clock=clock, **options)
        except asyncio.CancelledError:
            res.error = CUT
            raise
        if res.finished_s is None and not res.error:
            res.error = "stream ended without a finish_reason"


async def run_load(address: str, workload: list[BenchRequest], *, api: str = "grpc", model: str = "",
                   concurrency: int = 32, duration_s: float = 120.0, temperature: float = 0.0,
                   timeout_s: float = 600.0, extra_body: dict | None = None) -> list[RequestResult]:
    """The timings of every request of ``workload`` (one entry each, in order)."""
    results = [RequestResult(r.index, r.stop_after or r.max_new_tokens, r.at_s) for r in workload]
    slots = asyncio.Semaphore(concurrency)
    async with connect(api, address, extra_body=extra_body) as client:
        origin = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - origin

        tasks = []
        for req, res in zip(workload, results):
            if req.at_s >= duration_s:
                break
            wait = req.at_s - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(_one(
                client, req, res, slots=slots, clock=clock, model=model, temperature=temperature,
                timeout_s=timeout_s)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, duration_s - clock()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    for res in results:     # queued behind --concurrency when the time ran out
        if res.sent_s is None and res.scheduled_s < duration_s and not res.error:
            res.error = CUT
    return results


async def server_model(api: str, address: str, *, extra_body: dict | None = None) -> str:
    """The model name to ask for when none was given: the gateway's default for gRPC (""), the
    first of ``GET /v1/models`` for an OpenAI server (which needs one in every request)."""
    async with connect(api, address, extra_body=extra_body) as client:
        return await client.model_name()
