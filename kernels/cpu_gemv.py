"""The tied LM head at one or two rows on a CPU with AVX-512-BF16: a small C GEMV.

``y [m, n] = x [m, k] @ W [n, k]^T`` for bf16 ``x`` and ``W`` (the embedding itself, row-major:
no second copy), fp32 accumulation with ``vdpbf16ps`` (pairs of bf16 products summed in fp32),
each output rounded once to bf16 (round to nearest even), the rows of ``W`` shared among
torch's thread count of POSIX threads. At one row of the demo model's head (150 528 × 256, 77 MB)
oneDNN's packed bf16 inner product reads 18–24 GB/s here while this reads 40–45
(docs/benchmarks.md, "GEMV at batch 1"); from four rows on oneDNN is faster, so ``MAX_ROWS`` = 2.

Built on first use by ``kernels.cbuild``; only where the compiler targets AVX-512-BF16
(``-march=native`` on such a CPU) does the library report itself usable (``glm_gemv_ok``).
Elsewhere, or with ``ENABLED`` False, ``supports`` is False and the head keeps its dense op.

Whether it is faster depends on the CPU: on an Intel Xeon with AMX, oneDNN's AMX inner product
reads the same head faster than this kernel does at one and two rows (1.8–1.9 ms against
2.3–3.2 and 5.5 ms), and the forward around it gets slower too (docs/benchmarks.md, "GEMV at
batch 1"). So the head measures it on its own weight when the model is prepared
(``rows_faster``) and takes it only at the row counts where it wins; ``CHOICE`` = "on" or
"off" skips the measurement (benchmarks compare both; "on": every row count up to ``MAX_ROWS``).
"""

from __future__ import annotations

import ctypes
from typing import Callable

import torch

from kernels import cbuild, threads

MAX_ROWS = 2                 # rows up to which the head takes this kernel
ENABLED = True
CHOICE = "auto"              # "auto": measured by rows_faster; "on" / "off": without measuring
WIN = 0.9                    # the kernel is taken where its median time is below WIN x the dense op's
ROUNDS = 7                   # alternating timed calls of each, after two untimed ones
THREAD_WORK = 2_000_000      # weight elements per thread below which a call runs on fewer threads

SOURCE = cbuild.FAN_OUT + cbuild.SCALAR_MATH + r"""
#include <stdint.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

int glm_gemv_ok(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__
typedef struct { const uint16_t *x; const uint16_t *w; uint16_t *y; int64_t begin, end, n; int k, m; } job_t;

static void *run(void *arg) {
    const job_t *j = (const job_t *)arg;
    const int k = j->k;
    for (int64_t n = j->begin; n < j->end; n++) {
        const uint16_t *row = j->w + n * k;
        for (int r = 0; r < j->m; r++) {
            const uint16_t *x = j->x + (int64_t)r * k;
            __m512 acc = _mm512_setzero_ps();
            for (int i = 0; i < k; i += 32)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(x + i)),
                                       (__m512bh)_mm512_loadu_si512((const void *)(row + i)));
            j->y[(int64_t)r * j->n + n] = to_bf16(_mm512_reduce_add_ps(acc));
        }
    }
    return 0;
}
#endif

/* x [m, k] bf16, w [n, k] bf16 (k a multiple of 32), y [m, n] bf16; 0 on success. */
int glm_gemv(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t n, int k, int m, int threads) {
#ifdef __AVX512BF16__
    job_t jobs[GLM_MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > GLM_MAX_THREADS) threads = GLM_MAX_THREADS;
    for (int i = 0; i < threads; i++) {
        job_t job = {x, w, y, n * i / threads, n * (i + 1) / threads, n, k, m};
        jobs[i] = job;
    }
    glm_fan_out(run, jobs, sizeof(job_t), threads);
    return 0;
#else
    return -1;
#endif
}
"""

# The compiled kernel when this CPU runs it (built once per process, cached on disk).
kernel = cbuild.Kernel("gemv_bf16", SOURCE, "bf16 GEMV kernel", "glm_gemv",
                       [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_int] * 3, ok="glm_gemv_ok")


def supports(weight: torch.Tensor) -> bool:
    """``matmul_t(x, weight)`` can run here: a contiguous bf16 ``[n, k]`` CPU weight, k % 32 == 0."""
    return (ENABLED and weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[1] % 32 == 0 and kernel() is not None)


def matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., k] @ weight [n, k]^T`` in bf16 (``supports(weight)``; at most ``MAX_ROWS`` rows
    are what it is fast for, any count is correct)."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    y = torch.empty((x2.shape[0], n), dtype=torch.bfloat16)
    if x2.shape[0]:
        count = threads.for_work(n * k, THREAD_WORK)                 # a thread start costs ~30 µs
        if kernel().glm_gemv(x2.data_ptr(), weight.data_ptr(), y.data_ptr(), n, k, x2.shape[0], count) != 0:
            raise RuntimeError("the bf16 GEMV kernel is not usable on this CPU")
    return y.reshape(*lead, n)


def rows_faster(weight: torch.Tensor, dense: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """The most rows (0 to ``MAX_ROWS``) up to which ``matmul_t(x, weight)`` beats ``dense(x)``
    here: each row count timed on the real weight, the two alternating (``ROUNDS`` calls each,
    medians), the kernel kept while it takes less than ``WIN`` of the dense time. 0 when the
    kernel does not serve ``weight``; ``CHOICE`` "on" / "off" answers without timing."""
    if not supports(weight):
        return 0
    if CHOICE in ("on", "off"):
        return MAX_ROWS if CHOICE == "on" else 0
    with torch.inference_mode():
        return cbuild.rows_won(lambda x: matmul_t(x, weight), dense,
                               lambda rows: torch.randn((rows, weight.shape[1]), dtype=torch.bfloat16),
                               MAX_ROWS, ROUNDS, WIN)
