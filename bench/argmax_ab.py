"""The greedy rows' argmax (``model.sampling.first_argmax``) over the vocabulary: the C kernel
(``kernels/cpu_argmax.py``) against the torch path (``ENABLED`` off), alternating, median µs.

    python bench/argmax_ab.py [--rows 1,8,22,32] [--vocab 150528] [--dtypes float32,bfloat16] [--rounds 50]
"""

from __future__ import annotations

import argparse

import torch

from kernels import cbuild, cpu_argmax
from model.sampling import first_argmax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,22,32")
    ap.add_argument("--vocab", type=int, default=150528)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    print(f"C kernel available: {cpu_argmax.kernel() is not None}; torch threads {torch.get_num_threads()}; "
          f"vocabulary {args.vocab}; median µs of {args.rounds} calls each, alternating")
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.vocab).to(dtype)

            def with_kernel(on: bool):
                def call():
                    cpu_argmax.ENABLED = on
                    try:
                        return first_argmax(x)
                    finally:
                        cpu_argmax.ENABLED = True
                return call

            assert torch.equal(with_kernel(True)()[1], with_kernel(False)()[1])
            t = cbuild.median_times({"kernel": with_kernel(True), "torch": with_kernel(False)}, args.rounds, 5)
            print(f"{str(dtype).removeprefix('torch.'):9s} {rows:3d} rows  kernel {t['kernel'] * 1e6:7.0f}  "
                  f"torch {t['torch'] * 1e6:7.0f}  torch / kernel {t['torch'] / t['kernel']:.1f}")


if __name__ == "__main__":
    main()
