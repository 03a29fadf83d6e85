"""What a request joining a running batch costs, as the batch's KV grows: the dense design
(a prefill of its own, then ``Batch.concatenate``, which copies every row's cache into a new
left-padded one) against the paged pool (the new prompt rides in the running rows' decode
step: ``Engine.mixed``; no KV moves).

    python bench/join_cost.py [--rows 16] [--contexts 64,256,1024] [--prompt 20] [--rounds 5]

Per context length, medians over ``rounds`` (alternating the two designs in each round):
dense ``prefill + concatenate`` (the join) and a decode step of the joined batch; paged, a
decode step of the running rows alone and the same step with the new request admitted (the
join is the difference). The model is the demo's shape (glm-small, 4 layers) with dummy
weights, in the machine's default dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kernels import cpu_paged
from model.config import GMASK_ID, dummy_config
from model.dummy import build_dummy_model
from model.engine import Batch, Engine, RequestState
from model.kv_footprint import blocks_for
from model.paged_kv import DEFAULT_BLOCK_SIZE, BlockPool
from model.prompt import Blank
from model.runner import parse_dtype
from model.sampling import SamplingParams
from services.common.malloc import tune_malloc


def rows(n: int, context: int, first_id: int = 0, budget: int = 64) -> list[RequestState]:
    blank = Blank.first([20100 + i % 1000 for i in range(context - 1)] + [GMASK_ID])
    return [RequestState(first_id + i, blank, SamplingParams(greedy=True), allowed=budget, min_new=budget,
                         logprobs=False) for i in range(n)]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def dense_round(model, n: int, context: int, prompt: int) -> dict:
    engine = Engine(model)
    running = engine.prefill(Batch(1, rows(n, context))).batch
    running = engine.decode(running).batch
    decode_s, _ = timed(lambda: engine.decode(running))
    new = Batch(2, rows(1, prompt, first_id=n))
    prefill_s, out = timed(lambda: engine.prefill(new))
    concat_s, joined = timed(lambda: Batch.concatenate([running, out.batch]))
    return {"join_s": prefill_s + concat_s, "prefill_s": prefill_s, "concat_s": concat_s, "decode_s": decode_s}


def paged_round(model, n: int, context: int, prompt: int) -> dict:
    c = model.config
    pool = BlockPool(c.num_layers, (n + 1) * blocks_for(context + 80, DEFAULT_BLOCK_SIZE), DEFAULT_BLOCK_SIZE,
                     c.num_attention_heads, c.head_dim, dtype=model.dtype)
    engine = Engine(model, pool=pool)
    running = engine.prefill(Batch(1, rows(n, context))).batch
    running = engine.decode(running).batch
    decode_s, out = timed(lambda: engine.decode(running))
    running = out.batch
    mixed_s, out = timed(lambda: engine.mixed(running, Batch(2, rows(1, prompt, first_id=n))))
    out.batch.release()
    return {"join_s": mixed_s - decode_s, "mixed_s": mixed_s, "decode_s": decode_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--contexts", default="64,256,1024")
    ap.add_argument("--prompt", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-kernel", action="store_true", help="paged decode attention through torch, not the C kernel")
    args = ap.parse_args()
    cpu_paged.ENABLED = not args.no_kernel
    tune_malloc()                                                  # as the worker does
    model = build_dummy_model(dummy_config("glm-small"), dtype=parse_dtype("auto"))
    print(f"glm-small dummy, {model.dtype}, {torch.get_num_threads()} threads, paged decode attention: "
          f"{'C kernel' if cpu_paged.supports(model.dtype) else 'torch'}; {args.rows} running rows, "
          f"a {args.prompt}-token request joins; ms, medians of {args.rounds}")
    print(f"{'context':>8} {'dense join':>11} {'(prefill':>9} {'concat)':>8} {'dense step':>11} "
          f"{'paged join':>11} {'paged step':>11} {'step+join':>10}")
    for context in (int(x) for x in args.contexts.split(",")):
        dense, paged = [], []
        for _ in range(args.rounds + 1):                           # the first round warms up
            dense.append(dense_round(model, args.rows, context, args.prompt))
            paged.append(paged_round(model, args.rows, context, args.prompt))
        med = lambda runs, key: statistics.median(r[key] for r in runs[1:]) * 1e3   # noqa: E731
        print(f"{context:>8} {med(dense, 'join_s'):>11.1f} {med(dense, 'prefill_s'):>9.1f} {med(dense, 'concat_s'):>8.1f} "
              f"{med(dense, 'decode_s'):>11.1f} {med(paged, 'join_s'):>11.1f} {med(paged, 'decode_s'):>11.1f} "
              f"{med(paged, 'mixed_s'):>10.1f}")


if __name__ == "__main__":
    main()
