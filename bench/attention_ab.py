"""Decode step time with the CPU attention as one fused call (``model.glm.fused_attention``,
what the model runs) against the official eager ops (``model.glm.official_attention``: scale,
bmm, mask, fp32 softmax, bmm, what CUDA runs), in one process, alternating in rounds so that a
burst of load on the machine hits both alike.

    .venv/bin/python bench/attention_ab.py [--dtype bfloat16] [--batch 1,8,32,64] [--rounds 12]

Demo shape (glm-small), random weights; prints the median decode step per batch size.
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

FUSED = glm.fused_attention      # SelfAttention.forward looks it up at each call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--batch", default="1,8,32,64")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=10, help="decode steps per round and variant")
    args = p.parse_args()
    model = build_dummy_model(PRESETS["glm-small"], dtype=getattr(torch, args.dtype))
    engine = Engine(model)
    for size in (int(b) for b in args.batch.split(",")):
        times = {"eager": [], "fused": []}
        for _ in range(args.rounds):
            for name, attention in (("eager", glm.official_attention), ("fused", FUSED)):
                glm.fused_attention = attention
                batch = Batch(0, _decode_rows(size, 32, args.steps + 2))
                with torch.inference_mode():
                    engine.prefill(batch)
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        engine.decode(batch)
                        times[name].append(time.perf_counter() - start)
        glm.fused_attention = FUSED
        eager_ms, fused_ms = (statistics.median(times[n]) * 1e3 for n in ("eager", "fused"))
        print(f"{args.dtype} batch {size:>3}: eager {eager_ms:6.2f} ms, fused {fused_ms:6.2f} ms, "
              f"fused/eager {fused_ms / eager_ms:.2f}", flush=True)


if __name__ == "__main__":
    main()
