"""Each row's maximum and its first index, for fp32 or bf16 logits on an AVX2 CPU: a small C kernel.

Greedy decoding takes one argmax over the vocabulary per row (150 528 logits). torch's
max-with-indices reduction and ``model.sampling.first_argmax``'s block-wise ``amax`` read the
logits two to three times; this reads them once, 32 logits a step in four independent chains of
eight lanes (bf16 widened to fp32 as loaded, exact), each lane keeping its maximum and its first
index, then the first index among the lanes holding the row's maximum: what ``torch.max(x,
dim=-1)`` returns, ties and infinities included. A row holding a NaN gets the value NaN (its
index is then unspecified; the sampler sends such rows down its full rule). Rows are shared
among the threads. ``python bench/argmax_ab.py`` on a Zen 4 (docs/benchmarks.md, "Paged KV",
its part "Zen 4 again"): one bf16 row 33 µs against the torch path's 144, 32 rows 0.49 ms
against 1.17.

Built on first use by ``kernels.cbuild``; only where the compiler targets AVX2
(``-march=native``) does the library report itself usable; elsewhere ``supports`` is False and
``first_argmax`` keeps its torch path.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import cbuild, threads

ENABLED = True
ROWS_PER_THREAD = 4           # rows below which a call stays on one thread (a thread start costs ~30 µs)

SOURCE = cbuild.FAN_OUT + r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

int glm_argmax_ok(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX2__
typedef struct { const void *x; float *values; int64_t *indices; int64_t begin, end, n; int bf16; } job_t;

/* Eight logits widened to fp32 (bf16: the upper half of each fp32, exact), one logit. */
#define LOAD8_F32(x, i) _mm256_loadu_ps((const float *)(x) + (i))
#define LOAD8_BF16(x, i) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(            \
    _mm_loadu_si128((const __m128i *)((const uint16_t *)(x) + (i)))), 16))
static inline float load1_f32(const void *x, int64_t i) { return ((const float *)x)[i]; }
static inline float load1_bf16(const void *x, int64_t i) {
    const uint32_t u = ((uint32_t)((const uint16_t *)x)[i]) << 16; float f; memcpy(&f, &u, 4); return f;
}

/* Four chains of eight lanes (32 logits a step, so that no compare-blend waits on the one
   before), each lane keeping its maximum and the first index holding it; the chains' lanes are
   merged (the larger value, the smaller index on a tie), then the lanes, then the tail. */
#define ROW_MAX(NAME, LOAD8, LOAD1)                                                            \
static void NAME(const void *x, int64_t n, float *value, int64_t *index) {                    \
    float best = -INFINITY;                                                                    \
    int64_t at = 0, i = 0;                                                                     \
    int nan = 0;                                                                               \
    if (n >= 32) {                                                                             \
        __m256 vbest[4], vnan[4];                                                              \
        __m256i vidx[4], cur[4];                                                               \
        for (int c = 0; c < 4; c++) {                                                          \
            vbest[c] = LOAD8(x, 8 * c);                                                        \
            vidx[c] = cur[c] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),     \
                                                _mm256_set1_epi32(8 * c));                     \
            vnan[c] = _mm256_cmp_ps(vbest[c], vbest[c], _CMP_UNORD_Q);                         \
        }                                                                                      \
        const __m256i step = _mm256_set1_epi32(32);                                            \
        for (i = 32; i + 32 <= n; i += 32) {                                                   \
            for (int c = 0; c < 4; c++) {                                                      \
                const __m256 v = LOAD8(x, i + 8 * c);                                          \
                cur[c] = _mm256_add_epi32(cur[c], step);                                       \
                const __m256 gt = _mm256_cmp_ps(v, vbest[c], _CMP_GT_OQ);  /* strictly: first index kept */ \
                vnan[c] = _mm256_or_ps(vnan[c], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));            \
                vbest[c] = _mm256_blendv_ps(vbest[c], v, gt);                                  \
                vidx[c] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx[c]),   \
                                                               _mm256_castsi256_ps(cur[c]), gt)); \
            }                                                                                  \
        }                                                                                      \
        for (; i + 8 <= n; i += 8) {                 /* whole groups of eight left: chain 0 */ \
            const __m256 v = LOAD8(x, i);                                                      \
            const __m256i here = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),   \
                                                  _mm256_set1_epi32((int32_t)i));              \
            const __m256 gt = _mm256_cmp_ps(v, vbest[0], _CMP_GT_OQ);                          \
            vnan[0] = _mm256_or_ps(vnan[0], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));                \
            vbest[0] = _mm256_blendv_ps(vbest[0], v, gt);                                      \
            vidx[0] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx[0]),       \
                                                           _mm256_castsi256_ps(here), gt));    \
        }                                                                                      \
        float lanes[32];                                                                       \
        int32_t lane_idx[32];                                                                  \
        for (int c = 0; c < 4; c++) {                                                          \
            _mm256_storeu_ps(lanes + 8 * c, vbest[c]);                                         \
            _mm256_storeu_si256((__m256i *)(lane_idx + 8 * c), vidx[c]);                       \
            nan |= _mm256_movemask_ps(vnan[c]) != 0;                                           \
        }                                                                                      \
        best = lanes[0];                                                                       \
        at = lane_idx[0];                                                                      \
        for (int l = 1; l < 32; l++)                                                           \
            if (lanes[l] > best || (lanes[l] == best && lane_idx[l] < at)) { best = lanes[l]; at = lane_idx[l]; } \
    }                                                                                          \
    for (; i < n; i++) {                      /* the tail (all of a row shorter than 32) */    \
        const float v = LOAD1(x, i);                                                           \
        if (v != v) nan = 1;                                                                   \
        else if (v > best || (i == 0 && n < 32)) { best = v; at = i; }                         \
    }                                                                                          \
    *value = nan ? NAN : best;                                                                 \
    *index = at;                                                                               \
}
ROW_MAX(row_max_f32, LOAD8_F32, load1_f32)
ROW_MAX(row_max_bf16, LOAD8_BF16, load1_bf16)

static void *run(void *arg) {
    const job_t *j = (const job_t *)arg;
    for (int64_t r = j->begin; r < j->end; r++) {
        if (j->bf16) row_max_bf16((const uint16_t *)j->x + r * j->n, j->n, j->values + r, j->indices + r);
        else row_max_f32((const float *)j->x + r * j->n, j->n, j->values + r, j->indices + r);
    }
    return 0;
}
#endif

/* x [rows, n] fp32 (bf16 = 0) or bf16 (bf16 = 1); values [rows] fp32, indices [rows] int64;
   0 on success. */
int glm_argmax(const void *x, int64_t rows, int64_t n, float *values, int64_t *indices, int threads, int bf16) {
#ifdef __AVX2__
    job_t jobs[GLM_MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > GLM_MAX_THREADS) threads = GLM_MAX_THREADS;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    for (int i = 0; i < threads; i++) {
        job_t job = {x, values, indices, rows * i / threads, rows * (i + 1) / threads, n, bf16};
        jobs[i] = job;
    }
    glm_fan_out(run, jobs, sizeof(job_t), threads);
    return 0;
#else
    (void)x; (void)rows; (void)n; (void)values; (void)indices; (void)threads; (void)bf16;
    return -1;
#endif
}
"""

# The compiled kernel when this CPU runs it (built once per process, cached on disk).
kernel = cbuild.Kernel("argmax", SOURCE, "argmax kernel", "glm_argmax",
                       [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                        ctypes.c_int, ctypes.c_int], ok="glm_argmax_ok")


def supports(x: torch.Tensor) -> bool:
    """``first_max(x)`` can run here: contiguous fp32 or bf16 ``[rows, n]`` CPU logits, n ≥ 1."""
    return (ENABLED and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2
            and x.is_contiguous() and x.shape[1] > 0 and kernel() is not None)


def first_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of each row's maximum of ``x`` (``supports(x)``), the first index
    among ties; NaN as the value of a row holding one. The values are in ``x``'s dtype (bf16
    maxima are widened to fp32 in the kernel and narrowed back, both exact)."""
    rows, n = x.shape
    values = torch.empty(rows, dtype=torch.float32)
    indices = torch.empty(rows, dtype=torch.int64)
    if rows:
        count = threads.for_work(rows, ROWS_PER_THREAD)
        if kernel().glm_argmax(x.data_ptr(), rows, n, values.data_ptr(), indices.data_ptr(), count,
                               int(x.dtype == torch.bfloat16)) != 0:
            raise RuntimeError("the argmax kernel is not usable on this CPU")
    return (values if x.dtype == torch.float32 else values.to(x.dtype)), indices
