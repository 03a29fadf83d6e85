"""Decode step time with each CPU attention, in one process, alternating in rounds so that a
burst of load on the machine hits them alike: the official eager ops
(``model.glm.official_attention``: scale, bmm, mask, fp32 softmax, bmm; what CUDA runs), torch's
fused call (``model.glm.fused_attention``: what a CPU prefill runs) and the chunked fp32 decode
attention (``model.glm.decode_attention``: what a CPU decode step runs).

    .venv/bin/python bench/attention_ab.py [--dtype bfloat16] [--batch 1,8,32,64] \\
        [--context 32,220] [--rounds 8] [--steps 10]

Demo shape (glm-small), random weights; prints the median decode step per batch size and
context length (the served workload's left-padded rows reach about 220 slots).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import model.glm as glm
from model.config import PRESETS
from model.dummy import build_dummy_model
from model.engine import Batch, Engine
from services.bench.step import _decode_rows

VARIANTS = {"eager": glm.official_attention, "fused": glm.fused_attention,
            "decode": glm.cpu_attention}   # SelfAttention.forward looks cpu_attention up at each call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--batch", default="1,8,32,64")
    p.add_argument("--context", default="32,220", help="context tokens of every row, comma-separated")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="decode steps per round and variant")
    args = p.parse_args()
    model = build_dummy_model(PRESETS["glm-small"], dtype=getattr(torch, args.dtype))
    engine = Engine(model)
    try:
        for context in (int(c) for c in args.context.split(",")):
            for size in (int(b) for b in args.batch.split(",")):
                times: dict[str, list[float]] = {name: [] for name in VARIANTS}
                for _ in range(args.rounds):
                    for name, attention in VARIANTS.items():
                        glm.cpu_attention = attention
                        batch = Batch(0, _decode_rows(size, context, args.steps + 2))
                        with torch.inference_mode():
                            engine.prefill(batch)
                            for _ in range(args.steps):
                                start = time.perf_counter()
                                engine.decode(batch)
                                times[name].append(time.perf_counter() - start)
                ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                print(f"{args.dtype} context {context:>4} batch {size:>3}: "
                      + ", ".join(f"{name} {value:6.2f} ms" for name, value in ms.items())
                      + f"; decode/fused {ms['decode'] / ms['fused']:.2f}", flush=True)
    finally:
        glm.cpu_attention = VARIANTS["decode"]


if __name__ == "__main__":
    main()
