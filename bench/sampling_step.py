"""The sampled rows' step (``model.sampling.Sampler.choose``) over bf16 logits of the demo's
vocabulary: median ms of a step per parameter set, as a benchmark of one checkout; to compare
two, run each with ``PYTHONPATH`` set to it.

    python bench/sampling_step.py [--rows 1,32] [--vocab 150528] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.sampling import Sampler, SamplingParams

CASES = {
    "temperature 0.8": SamplingParams(temperature=0.8),
    "temperature 0.8, top_k 40": SamplingParams(temperature=0.8, top_k=40),
    "temperature 0.8, top_p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
    "temperature 1.0, repetition 1.1": SamplingParams(temperature=1.0, repetition_penalty=1.1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--vocab", type=int, default=150528)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}; vocabulary {args.vocab}; median ms of {args.rounds} steps")
    for rows in (int(r) for r in args.rows.split(",")):
        logits = (torch.randn(rows, args.vocab, generator=gen) * 3).bfloat16()
        outputs = [[20100 + i, 20200] for i in range(rows)]
        for name, params in CASES.items():
            sampler = Sampler([params] * rows)
            times = []
            for _ in range(args.rounds + 2):
                start = time.perf_counter()
                sampler.choose(logits, outputs, outputs)
                times.append((time.perf_counter() - start) * 1000.0)
            print(f"{rows:3d} rows  {name:34s} {statistics.median(times[2:]):8.2f} ms")


if __name__ == "__main__":
    main()
