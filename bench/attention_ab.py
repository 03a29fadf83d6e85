"""Decode step time with the CPU attention as one fused call (``model.glm.fused_attention``,
what the model runs) against the official eager ops (scale, bmm, mask, fp32 softmax, bmm), in
one process, alternating in rounds so that a burst of load on the machine hits both alike.

    .venv/bin/python bench/attention_ab.py [--dtype bfloat16] [--batch 1,8,32,64] [--rounds 12]

Demo shape (glm-small), random weights; prints the median decode step per batch size.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import model.glm as glm
from model.config import PRESETS
from model.dummy import build_dummy_model
from model.engine import Batch, Engine
from services.bench.step import _decode_rows

FUSED = glm.SelfAttention.forward


def eager(self, x, cos, sin, mask, cache):
    """``SelfAttention.forward`` with the official ops on every device."""
    b, s, _ = x.shape
    hn, np_ = self.head_dim, self.heads_local
    q, k, v = self.query_key_value(x).view(b, s, np_, 3 * hn).split(hn, dim=-1)
    q = glm.apply_rotary(q, cos, sin).transpose(1, 2)
    k = glm.apply_rotary(k, cos, sin).transpose(1, 2)
    v = v.transpose(1, 2)
    if cache is not None:
        k, v = cache.write(self.layer_id, k, v)
    coeff = float(self.layer_id + 1)
    scores = torch.matmul(q / (math.sqrt(hn) * coeff), k.transpose(-1, -2)).masked_fill(mask, -10000.0)
    out = torch.matmul(F.softmax(scores.float() * coeff, dim=-1).to(v.dtype), v)
    return self.dense(out.transpose(1, 2).reshape(b, s, np_ * hn))


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
            for name, forward in (("eager", eager), ("fused", FUSED)):
                glm.SelfAttention.forward = forward
                batch = Batch(0, _decode_rows(size, 32, args.steps + 2))
                with torch.inference_mode():
                    engine.prefill(batch)
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        engine.decode(batch)
                        times[name].append(time.perf_counter() - start)
        glm.SelfAttention.forward = FUSED
        eager_ms, fused_ms = (statistics.median(times[n]) * 1e3 for n in ("eager", "fused"))
        print(f"{args.dtype} batch {size:>3}: eager {eager_ms:6.2f} ms, fused {fused_ms:6.2f} ms, "
              f"fused/eager {fused_ms / eager_ms:.2f}", flush=True)


if __name__ == "__main__":
    main()
