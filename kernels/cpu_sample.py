"""The sampled draw of a few logit rows on a CPU: a small C kernel (``model.sampling``).

For each row of ``logits [b, V]``: the scores ``v = l / T`` (NaN as ``-inf``, clamped to
``+-LOGIT_BOUND``: ``model.sampling``'s rules), those below the row's top-k score (the k-th
largest logit's, ties kept: the official rule) removed, and the token ``argmax(v + g)`` for
Gumbel noise ``g = -log(-log u)``: the Gumbel-max form of drawing from ``softmax(v)``, what
``torch.multinomial`` does with exponentials (``argmax(p / q)``, ``q = -log u``). Here ``u``
at token ``i`` is a hash of ``i`` and the row's two 32-bit keys (``model.sampling.draw_keys``:
its seed and step), not a generator's stream, so the noise costs a few integer operations and
two logarithms (Cephes' polynomial) per token, vectorised, and a row's token depends on its
own logits, ``T`` and keys only (never on its batch). Like the exponential race, a change of
the logits far below the rounding of the winner's lead moves no draw (an inverse CDF would
move with its running sum). A row with no finite score gets -1 (the caller takes its argmax).

torch's ``multinomial`` draws its exponentials from the row's generator: 3.4 ms a row of
150 528 here, ~100 ms a 32-row step (docs/benchmarks.md, "Sampled requests"). Built on first
use by ``kernels.cbuild`` (plain C the compiler vectorises); where it does not build,
``supports`` is False and ``model.sampling.gumbel_draw`` computes the same in torch ops.
"""

from __future__ import annotations

import ctypes
import math

import torch

from kernels import cbuild, threads

ENABLED = True
THREAD_WORK = 400_000        # logits per thread below which a call runs on fewer threads

# no-trapping-math: the selects of the noise loop may compute both arms (else GCC keeps the
# branches and the loop stays scalar, ~20x slower); no arithmetic changes.
SOURCE = '#pragma GCC optimize ("no-trapping-math")\n' + cbuild.FAN_OUT + cbuild.SCALAR_MATH + r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct { const void *logits; const int64_t *rows; const float *temperature, *kth; const uint32_t *keys;
                 int64_t *out; int64_t begin, end, vocab; int bf16; float bound; } job_t;

static inline float score(float l, float t, float bound) {
    l = l != l ? -INFINITY : l;                           /* NaN: the lowest score */
    const float v = l / t;
    return v < -bound ? -bound : (v > bound ? bound : v);
}

static inline uint32_t fmix32(uint32_t x) {             /* MurmurHash3's finaliser */
    x ^= x >> 16; x *= 0x85ebca6bu; x ^= x >> 13; x *= 0xc2b2ae35u; x ^= x >> 16;
    return x;
}

/* log(x) for a positive normal x (Cephes' logf: the mantissa in [sqrt(1/2), sqrt 2), a degree-9
   polynomial), branch-free so that a loop of it vectorises. */
static inline float log_positive(float x) {
    int32_t bits; memcpy(&bits, &x, 4);
    int32_t e = ((bits >> 23) & 0xff) - 126;
    const int32_t mb = (bits & 0x807fffff) | 0x3f000000;
    float m; memcpy(&m, &mb, 4);                          /* [0.5, 1) */
    const int low = m < 0.707106781186547524f;
    e -= low;
    const float doubled = m + m - 1.0f, single = m - 1.0f;   /* both computed: a select, no branch */
    m = low ? doubled : single;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return m + y + 0.693359375f * fe;
}

/* The row's Gumbel noise at token i: -log(q), q = -log(u) ~ Exp(1), u in (0, 1) from a hash of
   (i, the row's two keys). Near u = 1 (the top 2^-8) q comes from 1 - u exactly, as log1p. */
static inline float gumbel(uint32_t i, uint32_t k1, uint32_t k2) {
    const uint32_t h = fmix32(fmix32(i ^ k1) ^ k2);
    const float u = ((float)h + 0.5f) * 2.3283064365386963e-10f;
    const float x = ((float)(uint32_t)(0u - h) - 0.5f) * 2.3283064365386963e-10f;   /* 1 - u */
    const float near = x * (1.0f + x * (0.5f + x * 0.333333333f));
    const float far = -log_positive(u);                   /* both computed: no branch in the loop */
    const float q = h >= 0xff000000u ? near : far;
    return -log_positive(q);
}

static int64_t draw(const void *base, int bf16, int64_t vocab, float t, float kth, uint32_t k1, uint32_t k2,
                    float bound, float *e) {
    const float floor = kth == -INFINITY ? -INFINITY : score(kth, t, bound);   /* top-k: kept from it up */
    if (bf16) {
        const uint16_t *row = (const uint16_t *)base;
        _Pragma("omp simd")
        for (int64_t i = 0; i < vocab; i++) e[i] = score(bf16_at(row, i), t, bound);
    } else {
        const float *row = (const float *)base;
        _Pragma("omp simd")
        for (int64_t i = 0; i < vocab; i++) e[i] = score(row[i], t, bound);
    }
    _Pragma("omp simd")
    for (int64_t i = 0; i < vocab; i++) {                 /* removed tokens: -inf, the others noised */
        const float noisy = e[i] + gumbel((uint32_t)i, k1, k2);
        e[i] = e[i] < floor ? -INFINITY : noisy;
    }
    float best = -INFINITY;
    _Pragma("omp simd reduction(max:best)")
    for (int64_t i = 0; i < vocab; i++) best = e[i] > best ? e[i] : best;
    if (best == -INFINITY) return -1;
    for (int64_t i = 0; i < vocab; i++) if (e[i] == best) return i;
    return -1;
}

static void *run(void *arg) {
    const job_t *j = (const job_t *)arg;
    float *e = (float *)malloc(sizeof(float) * (size_t)j->vocab);
    for (int64_t r = j->begin; r < j->end; r++) {
        if (e == NULL) { j->out[r] = -2; continue; }
        const size_t size = j->bf16 ? 2 : 4;
        const char *row = (const char *)j->logits + (size_t)j->rows[r] * (size_t)j->vocab * size;
        j->out[r] = draw(row, j->bf16, j->vocab, j->temperature[r], j->kth[r], j->keys[2 * r], j->keys[2 * r + 1],
                         j->bound, e);
    }
    free(e);
    return 0;
}

/* For each of n rows: logits row rows[i] of [*, vocab] (bf16 or fp32), its temperature, its
   top-k threshold (the k-th largest logit; -inf: none) and its two keys; out[i] the token, -1
   where no token has a finite score. */
int glm_sample(const void *logits, const int64_t *rows, const float *temperature, const float *kth,
               const uint32_t *keys, int64_t *out, int64_t n, int64_t vocab, int bf16, float bound, int threads) {
    job_t jobs[GLM_MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > GLM_MAX_THREADS) threads = GLM_MAX_THREADS;
    if (threads > n) threads = (int)(n > 0 ? n : 1);
    for (int i = 0; i < threads; i++) {
        job_t job = {logits, rows, temperature, kth, keys, out, n * i / threads, n * (i + 1) / threads, vocab, bf16,
                     bound};
        jobs[i] = job;
    }
    glm_fan_out(run, jobs, sizeof(job_t), threads);
    for (int64_t i = 0; i < n; i++) if (out[i] == -2) return -2;
    return 0;
}
"""

kernel = cbuild.Kernel("sample", SOURCE, "sampling kernel", "glm_sample",
                       [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_int, ctypes.c_float, ctypes.c_int])


def supports(logits: torch.Tensor) -> bool:
    """``draw(logits, ...)`` can run here: contiguous fp32 or bf16 ``[b, V]`` CPU logits."""
    return (ENABLED and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and logits.dim() == 2 and logits.is_contiguous() and logits.shape[1] > 0 and kernel() is not None)


def draw(logits: torch.Tensor, rows: list[int], temperature: list[float], keys: list[tuple[int, int]],
         bound: float, kth: list[float] | None = None) -> torch.Tensor:
    """The token of each of ``rows`` of ``logits`` (``supports(logits)``), by the module's rule,
    the row's noise from its two 32-bit ``keys``; ``kth``: per row the k-th largest logit of
    its top-k (``-inf``: none; the scores from it up are kept, ties included). -1 for a row
    where no token has a finite score."""
    index = torch.tensor(rows, dtype=torch.int64)
    temps = torch.tensor(temperature, dtype=torch.float32)
    floors = torch.tensor(kth if kth is not None else [-math.inf] * len(rows), dtype=torch.float32)
    words = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for pair in keys for w in pair],
                         dtype=torch.int32)                                 # the uint32 keys' bits
    out = torch.empty(len(rows), dtype=torch.int64)
    if rows:
        vocab = logits.shape[1]
        count = threads.for_work(len(rows) * vocab, THREAD_WORK)
        code = kernel().glm_sample(logits.data_ptr(), index.data_ptr(), temps.data_ptr(), floors.data_ptr(),
                                   words.data_ptr(), out.data_ptr(), len(rows), vocab,
                                   int(logits.dtype == torch.bfloat16), bound, count)
        if code != 0:
            raise RuntimeError(f"the sampling kernel failed ({code})")
    return out
