"""Prefill time of a left-padded batch with the layers run on the real tokens only
(``model.glm.Packing``, what the engine does) against every padded slot, in one process,
alternating. The batch: 19 rows with the prompt lengths of ``glm bench serve``'s workload
(10-211 tokens, one of 211), demo shape, bf16, random weights.

    .venv/bin/python bench/prefill_packing_ab.py
"""
import torch, time, statistics, random
from model.config import PRESETS
from model.dummy import build_dummy_model
from model.engine import Engine, Batch
from services.bench.step import _decode_rows
import model.glm as G
ON = G.Packing.of
OFF = classmethod(lambda cls, v: None)
m = build_dummy_model(PRESETS["glm-small"], dtype=torch.bfloat16)
e = Engine(m)
lens = [10, 20, 20, 21, 30, 91, 95, 98, 211]
random.seed(0)
rows_len = [random.choice(lens) for _ in range(18)] + [211]
def rows():
    out = []
    for i, n in enumerate(rows_len):
        r = _decode_rows(1, n, 33)[0]; r.id = i; out.append(r)
    return out
res = {"padded": [], "packed": []}
with torch.inference_mode():
    for r in range(6):
        for name in res:
            G.Packing.of = ON if name == "packed" else OFF
            t = time.perf_counter(); e.prefill_logits(Batch(0, rows())); res[name].append(time.perf_counter() - t)
print("19 rows, %d real tokens, padded %d:" % (sum(rows_len) + 19, 19 * 212), {k: "%.1f ms" % (statistics.median(v[1:]) * 1e3) for k, v in res.items()})
