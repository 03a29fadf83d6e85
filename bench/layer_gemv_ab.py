"""The layers' small bf16 linears through ``kernels.cpu_gemv`` at one or two rows (as ``prepare``
measured them) against oneDNN's packed op for every row count: a paged decode forward of the
demo's shape (dummy weights), the two alternating call by call; median ms.

    OMP_WAIT_POLICY=PASSIVE python bench/layer_gemv_ab.py [--batch 1,2,4] [--context-tokens 120] [--rounds 40]

Needs a CPU with AVX-512-BF16 (elsewhere the layers keep their dense op and both sides agree).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.engine import Batch, Engine
from model.paged_kv import PagedStep
from model.parallel import ColumnParallelLinear, ParallelContext, RowParallelLinear
from services.bench import step as bench_step
from services.common.malloc import tune_malloc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,2,4")
    ap.add_argument("--context-tokens", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    tune_malloc()
    spec = bench_step.StepBench(load_format="dummy", preset="glm-small", dtype="bfloat16",
                                context_tokens=args.context_tokens)
    model = bench_step._build(ParallelContext(), spec)
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    measured = [m.gemv_rows for m in linears]
    print(f"rows each layer linear takes the kernel at (measured by prepare): {measured}; "
          f"median ms of {args.rounds} forwards each, alternating")
    engine = Engine(model)
    for rows in (int(b) for b in args.batch.split(",")):
        budget = 2 * args.rounds + 10
        engine.pool = bench_step._pool(model, rows, args.context_tokens + budget + 1, 16)
        batch = engine.prefill(Batch(0, bench_step._decode_rows(rows, args.context_tokens, budget))).batch
        positions = batch.decode_positions(engine.device).view(-1)
        times: dict[str, list[float]] = {"gemv": [], "packed": []}
        with torch.inference_mode():
            for round_ in range(args.rounds + 5):
                for name in times:
                    for m, r in zip(linears, measured):
                        m.gemv_rows = r if name == "gemv" else 0
                    start = time.perf_counter()
                    model.step_logits(batch.pending, positions, PagedStep.build(batch.cache, rows, []))
                    if round_ >= 5:
                        times[name].append(time.perf_counter() - start)
        for m, r in zip(linears, measured):
            m.gemv_rows = r
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"batch {rows:3d}  gemv {med['gemv']:.2f}  packed {med['packed']:.2f}  ratio {med['gemv'] / med['packed']:.2f}")
        batch.release()


if __name__ == "__main__":
    main()
