"""The layers' small bf16 linears through ``kernels.cpu_gemv`` at one or two rows (as ``prepare``
measured them) against oneDNN's packed op for every row count: a paged decode forward of the
demo's shape (dummy weights), the two alternating call by call; median ms.

    OMP_WAIT_POLICY=PASSIVE python bench/layer_gemv_ab.py [--batch 1,2,4] [--context-tokens 120] [--rounds 40]

Needs a CPU with AVX-512-BF16 (elsewhere the layers keep their dense op and both sides agree).
"""

from __future__ import annotations

import argparse

import torch

from kernels import cbuild
from model.engine import Engine
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

    def with_gemv(on: bool, forward):
        def call():
            for m, r in zip(linears, measured):
                m.gemv_rows = r if on else 0
            return forward()
        return call

    for rows in (int(b) for b in args.batch.split(",")):
        batch, forward = bench_step.paged_decode(engine, rows, args.context_tokens, 2 * args.rounds + 10)
        with torch.inference_mode():
            med = cbuild.median_times({"gemv": with_gemv(True, forward), "packed": with_gemv(False, forward)},
                                      args.rounds, untimed=5)
        for m, r in zip(linears, measured):
            m.gemv_rows = r
        print(f"batch {rows:3d}  gemv {med['gemv'] * 1e3:.2f}  packed {med['packed'] * 1e3:.2f}  "
              f"ratio {med['gemv'] / med['packed']:.2f}")
        batch.release()


if __name__ == "__main__":
    main()
