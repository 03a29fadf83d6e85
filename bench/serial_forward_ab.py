"""A paged decode forward with its element-wise ops on one thread (``kernels.threads``) against
the same forward with the rule off (``SERIAL_ELEMENTS = 0``), alternating call by call; median ms.

    OMP_WAIT_POLICY=PASSIVE python bench/serial_forward_ab.py [--dtype auto] [--batch 1,8,22,32]
        [--context-tokens 120] [--rounds 40]

The demo's shape (dummy glm-small weights), the workers' thread policy when run as shown.
"""

from __future__ import annotations

import argparse

import torch

from kernels import cbuild, threads
from model.engine import Engine
from model.parallel import ParallelContext
from services.bench import step as bench_step
from services.common.malloc import tune_malloc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", default="1,8,22,32")
    ap.add_argument("--context-tokens", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    tune_malloc()
    spec = bench_step.StepBench(load_format="dummy", preset="glm-small", dtype=args.dtype,
                                context_tokens=args.context_tokens)
    model = bench_step._build(ParallelContext(), spec)
    engine = Engine(model)
    rule = threads.SERIAL_ELEMENTS
    print(f"dtype {model.dtype}, torch threads {torch.get_num_threads()}, context {args.context_tokens} "
          f"tokens; median ms of {args.rounds} forwards each, alternating")

    def with_rule(value: int, forward):
        def call():
            threads.SERIAL_ELEMENTS = value
            return forward()
        return call

    for rows in (int(b) for b in args.batch.split(",")):
        batch, forward = bench_step.paged_decode(engine, rows, args.context_tokens, 2 * args.rounds + 10)
        with torch.inference_mode():
            med = cbuild.median_times({"serial": with_rule(rule, forward), "rule off": with_rule(0, forward)},
                                      args.rounds, untimed=5)
        threads.SERIAL_ELEMENTS = rule
        print(f"batch {rows:3d}  serial {med['serial'] * 1e3:.2f}  rule off {med['rule off'] * 1e3:.2f}  "
              f"ratio {med['serial'] / med['rule off']:.2f}")
        batch.release()


if __name__ == "__main__":
    main()
