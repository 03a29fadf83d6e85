"""Prefill time of a left-padded batch three ways, in one process, alternating: every padded
slot through the layers ("padded"); the layers on the real tokens only, attention still over
the padded ``[b, s, s]`` ("packed layers"); and attention too row by row on each row's own
slots (``model.glm.Packing.attend``, "packed rows": what the engine does on CPU). The batch:
19 rows with the prompt lengths of ``glm bench serve``'s workload (10-211 tokens, one of 211),
demo shape, bf16, random weights.

    .venv/bin/python bench/prefill_packing_ab.py
"""
import dataclasses
import random
import statistics
import time

import torch

import model.glm as G
from model.config import PRESETS
from model.dummy import build_dummy_model
from model.engine import Batch, Engine
from services.bench.step import _decode_rows

ROWS = G.Packing.of
VARIANTS = {
    "padded": classmethod(lambda cls, valid: None),
    "packed layers": classmethod(lambda cls, valid: dataclasses.replace(ROWS(valid), starts=None)),
    "packed rows": ROWS,
}
m = build_dummy_model(PRESETS["glm-small"], dtype=torch.bfloat16)
e = Engine(m)
lens = [10, 20, 20, 21, 30, 91, 95, 98, 211]
random.seed(0)
rows_len = [random.choice(lens) for _ in range(18)] + [211]


def rows():
    out = []
    for i, n in enumerate(rows_len):
        r = _decode_rows(1, n, 33)[0]
        r.id = i
        out.append(r)
    return out


res = {name: [] for name in VARIANTS}
try:
    with torch.inference_mode():
        for r in range(6):
            for name, of in VARIANTS.items():
                G.Packing.of = of
                t = time.perf_counter()
                e.prefill_logits(Batch(0, rows()))
                res[name].append(time.perf_counter() - t)
finally:
    G.Packing.of = ROWS
print("19 rows, %d real tokens, padded %d:" % (sum(rows_len) + 19, 19 * 212),
      {k: "%.1f ms" % (statistics.median(v[1:]) * 1e3) for k, v in res.items()})
