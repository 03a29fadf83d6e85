"""Step time of the worker over gRPC: prefill of a batch, then decode steps.

    .venv/bin/python bench/worker_step.py [--checkpoint DIR] [--tp 1 2] [--batch 4]
        [--prompt-tokens 64] [--steps 32] [--dtype float32]

Starts a real pool (``services.worker.pool.start_pool``) per TP size, warms it up,
and times ``ShardClient`` calls end to end (client fan-out + every rank's forward
+ the sampling broadcast). Without ``--checkpoint`` it writes the demo model
(``init_tiny`` preset glm-small) to a temporary folder. Prints one JSON line per TP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from model.tiny import init_tiny
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.client import ShardClient
from services.worker.pool import start_pool


def batch(batch_id: int, size: int, prompt_tokens: int, steps: int) -> pb.Batch:
    context = [20100 + i for i in range(prompt_tokens - 2)] + [150001]      # + sop = prompt_tokens
    return pb.Batch(id=batch_id, requests=[
        pb.Request(id=batch_id * 1000 + i, input_ids=context, sampling=pb.SamplingParameters(greedy=True),
                   stopping=pb.StoppingCriteria(max_new_tokens=steps + 1)) for i in range(size)])


async def measure(addresses, args) -> dict:
    async with ShardClient(addresses, timeout_s=600) as c:
        await c.warmup(args.batch, args.prompt_tokens, args.prompt_tokens + args.steps + 1)
        prefill_ms, decode_ms = [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            reply = await c.prefill(batch(rep + 1, args.batch, args.prompt_tokens, args.steps))
            prefill_ms.append((time.perf_counter() - t0) * 1e3)
            cached = reply.batch
            for _ in range(args.steps):
                t0 = time.perf_counter()
                reply = await c.decode([cached])
                decode_ms.append((time.perf_counter() - t0) * 1e3)
                if not reply.HasField("batch"):
                    break
                cached = reply.batch
            await c.clear_cache()
    return {"prefill_ms_median": round(statistics.median(prefill_ms), 2),
            "decode_ms_median": round(statistics.median(decode_ms), 2),
            "decode_ms_p90": round(sorted(decode_ms)[int(0.9 * (len(decode_ms) - 1))], 2),
            "decode_steps": len(decode_ms)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or init_tiny(tmp, preset="glm-small", tp=1, seed=0) and tmp
        for tp in args.tp:
            pool = start_pool(ckpt, tp, dtype=args.dtype, kv_memory_gib=1.0)
            try:
                result = asyncio.run(measure(pool.addresses, args))
            finally:
                pool.stop()
            print(json.dumps({"tp": tp, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
                              "dtype": args.dtype, **result}), flush=True)


if __name__ == "__main__":
    main()
