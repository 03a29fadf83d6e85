"""Send a workload to a gateway and time every streamed message.

Each request is one ``GenerateStream`` call, sent at its planned arrival time (or later, when
``concurrency`` calls are already in flight: the wait is reported as ``client_wait_s``). Nothing
new is sent after ``duration_s``, and calls still running then are cancelled and reported as cut.
"""

from __future__ import annotations

import asyncio
import time

from services.bench.stats import RequestResult
from services.bench.workload import BenchRequest
from services.client import AsyncGLMClient, GLMError

CUT = "cut at --duration-s"
FINISHED = ("length", "stop")


async def _one(client: AsyncGLMClient, req: BenchRequest, res: RequestResult, *, model: str,
               temperature: float, clock, slots: asyncio.Semaphore, timeout_s: float) -> None:
    options = dict(model=model, max_new_tokens=req.max_new_tokens, min_new_tokens=req.max_new_tokens,
                   temperature=temperature, timeout=timeout_s)
    if temperature > 0:
        options["seed"] = req.seed
    async with slots:
        res.sent_s = clock()
        try:
            async for message in client.generate_stream(req.prompt, **options):
                at = clock()
                if message.token_ids:
                    if res.first_token_s is None:
                        res.first_token_s = at
                    res.token_times.append((at, len(message.token_ids)))
                if message.finish_reason:
                    res.finished_s = at
                    res.finish_reason = message.finish_reason
                    res.prompt_tokens = message.usage.prompt_tokens
                    res.generated_tokens = message.usage.generated_tokens
                    if message.finish_reason not in FINISHED:
                        res.error = f"finish_reason {message.finish_reason}"
        except GLMError as error:
            res.error = f"{error.code.name}: {error.details}"[:200]
        except asyncio.CancelledError:
            res.error = CUT
            raise
        if res.finished_s is None and not res.error:
            res.error = "stream ended without a finish_reason"


async def run_load(address: str, workload: list[BenchRequest], *, model: str = "",
                   concurrency: int = 32, duration_s: float = 120.0, temperature: float = 0.0,
                   timeout_s: float = 600.0) -> list[RequestResult]:
    """The timings of every request of ``workload`` (one entry each, in order)."""
    results = [RequestResult(r.index, r.max_new_tokens, r.at_s) for r in workload]
    slots = asyncio.Semaphore(concurrency)
    async with AsyncGLMClient(address) as client:
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
                client, req, res, model=model, temperature=temperature, clock=clock, slots=slots,
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
