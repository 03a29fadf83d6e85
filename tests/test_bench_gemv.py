"""``glm bench gemv``'s cases (``services.bench.gemv.run_case``): every candidate is timed with its
bytes, one row per batch is marked fastest, and the row marked as the model's is the op the model
runs for that shape and batch (the GEMV head at one or two bf16 rows where it runs)."""

from __future__ import annotations

import torch

from kernels import cpu_gemv
from kernels.cpu_dense import native_bf16
from services.bench.gemv import GEMV_NAME, model_choice, run_case


def test_a_head_case_marks_the_models_op_and_the_fastest():
    results = run_case("lm_head", 1000, 256, torch.bfloat16, "none", [1, 4], repeats=2, with_compile=False,
                       read_gb_s=10.0, seed=0)
    for batch in (1, 4):
        rows = [r for r in results if r.batch == batch]
        timed = [r for r in rows if not r.note]
        # oneDNN's packed bf16 needs native bf16 (or AVX-512): on an AVX2-only CPU it says so
        assert len(timed) >= (4 if native_bf16() else 3) and all(r.ms > 0 and r.bytes > 0 for r in timed)
        assert all(r.note.startswith("unavailable") for r in rows if r.note)
        assert sum(r.winner for r in rows) == 1
        marked = [r.impl for r in rows if r.model]
        assert marked == [model_choice(torch.bfloat16, "none", batch, "lm_head")]
    names = {r.impl for r in results}
    assert (GEMV_NAME in names) == (cpu_gemv.kernel() is not None)
    if cpu_gemv.kernel() is not None:
        assert model_choice(torch.bfloat16, "none", 1, "lm_head") == GEMV_NAME
        assert model_choice(torch.bfloat16, "none", 4, "lm_head") != GEMV_NAME
    assert model_choice(torch.bfloat16, "none", 1, "qkv") != GEMV_NAME        # the layers keep their op
