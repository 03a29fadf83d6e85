"""INT4 weight-only GEMV at a few bf16 rows on a CPU with AVX-512-BF16: a small C kernel.

``y [m, n] = x [m, k] @ (q [n, k] * scale)^T`` straight from the canonical INT4 layout
(docs/quantization.md: byte ``j`` of a row holds column ``2j`` in its high nibble and ``2j + 1``
in its low one, two's complement), so no second copy of the weight is made. torch's
``_weight_int4pack_mm_for_cpu`` read INT4 at 36-38 GB/s on a Zen 5 whatever bandwidth the
machine had (docs/benchmarks.md, "GEMV at batch 1", its part "INT4 at one row"): it turns every
nibble into an fp32 and multiplies it by its scale before the dot. This kernel spends three
vector instructions on 64 weights before the dot:

* ``vpmovzxbw`` widens 32 bytes of the row to 32 16-bit lanes (lane ``j`` = byte ``j``);
* each lane's low nibble, flipped by ``^ 8`` (``u = q + 8``, 0..15) and or-ed into the bits of
  the bf16 128.0 (``0x4300``), is the bf16 ``128 + u`` exactly (one ``vpternlogd``); the high
  nibble is the same after a shift;
* ``vdpbf16ps`` multiplies them with the row of ``x`` split once per call into its even and odd
  columns (the high nibbles meet the even ones), summing pairs of products in fp32.

So a row's sum is ``sum x (q + 136)``, and ``y = scale * (sum - 136 * sum(x))`` per row (or per
group, a multiple of 64 columns), the sums of ``x`` taken once per call, each output rounded once
to bf16 (round to nearest even); the fp16 scales are read as they are stored. The products are exact in fp32; the shifted sum adds about one
fp32 rounding of ``136 * |x|`` per term, far below the bf16 rounding of the output
(``tests/test_cpu_int4.py`` holds it to the exact product). A thread reads eight rows at once at
one activation row (four, against two activation rows at a time, above it) and prefetches 1.5 KB
ahead in each: the streams' own prefetch left one thread at 16 GB/s, this reads at 27-31.

Built on first use by ``kernels.cbuild``; only where the compiler targets AVX-512-BF16 does the
library report itself usable. ``CpuQuantizedLinear`` measures it against torch's kernel on its
own weight when the model is prepared (``rows_faster``) and takes it at the row counts where it
wins (``MAX_ROWS`` at most); ``CHOICE`` "on" / "off" skips the measurement.
"""

from __future__ import annotations

import ctypes
from typing import Callable

import torch

from kernels import cbuild, threads

MAX_ROWS = 4                 # rows up to which a layer may take this kernel
ENABLED = True
CHOICE = "auto"              # "auto": measured by rows_faster; "on" / "off": without measuring
WIN = 0.95                   # the kernel is taken where its median time is below WIN x torch's
ROUNDS = 7                   # alternating timed calls of each, after two untimed ones
THREAD_WORK = 4_000_000      # weight elements per thread below which a call runs on fewer threads
BLOCK = 64                   # columns one step of the kernel reads (32 bytes of a row)

SOURCE = cbuild.FAN_OUT + cbuild.SCALAR_MATH + r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

int glm_int4_ok(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__
#define ROWS 8                /* rows of w a thread's share is cut in */
#define PREFETCH 1536         /* bytes ahead in a row: the streams' own prefetch is too short */
typedef struct {
    const uint16_t *xs;      /* [m][2][k/2] bf16: each x row's even, then odd columns */
    const float *bias;       /* [m][groups]: 136 * sum of x over each group */
    const uint8_t *w;        /* [n][k/2] canonical INT4 */
    const uint16_t *scale;   /* [n][groups] fp16, the canonical scales */
    uint16_t *y;             /* [m][n] bf16 */
    int64_t begin, end, n;
    int k, m, group;
} job_t;

/* Rows [r0, r0 + R) of w against x rows [x0, x0 + M): y = the sum over groups of
   scale * (dot - bias). R and M are constants at each call, so the accumulators stay in
   registers; each 64-column step widens and splits the R rows' bytes once for all M rows. */
static inline __attribute__((always_inline)) void tile(const job_t *j, int64_t r0, int x0, const int R, const int M) {
    const int half = j->k / 2, groups = j->k / j->group, gbytes = j->group / 2;
    const __m512i nib = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4308);
    float out[8][4] = {{0}};
    for (int g = 0; g < groups; g++) {
        __m512 acc[8][4][2];
        for (int i = 0; i < R; i++)
            for (int r = 0; r < M; r++) acc[i][r][0] = acc[i][r][1] = _mm512_setzero_ps();
        for (int b = g * gbytes; b < (g + 1) * gbytes; b += 32) {
            for (int i = 0; i < R; i++) {
                const uint8_t *row = j->w + (r0 + i) * half;
                _mm_prefetch((const char *)(row + b + PREFETCH), _MM_HINT_T0);
                const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + b)));
                const __m512i lo = _mm512_ternarylogic_epi32(v, nib, magic, 0x6A);   /* (v & F) ^ 4308 */
                const __m512i hi = _mm512_xor_si512(_mm512_srli_epi16(v, 4), magic);
                for (int r = 0; r < M; r++) {
                    const uint16_t *xe = j->xs + (int64_t)(x0 + r) * j->k;
                    acc[i][r][0] = _mm512_dpbf16_ps(acc[i][r][0], (__m512bh)hi,
                                                    (__m512bh)_mm512_loadu_si512((const void *)(xe + b)));
                    acc[i][r][1] = _mm512_dpbf16_ps(acc[i][r][1], (__m512bh)lo,
                                                    (__m512bh)_mm512_loadu_si512((const void *)(xe + half + b)));
                }
            }
        }
        for (int r = 0; r < M; r++) {
            const float bias = j->bias[(int64_t)(x0 + r) * groups + g];
            for (int i = 0; i < R; i++) {
                const float dot = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][r][0], acc[i][r][1]));
                out[i][r] += _cvtsh_ss(j->scale[(r0 + i) * groups + g]) * (dot - bias);
            }
        }
    }
    for (int r = 0; r < M; r++)
        for (int i = 0; i < R; i++) j->y[(int64_t)(x0 + r) * j->n + r0 + i] = to_bf16(out[i][r]);
}

/* Rows [r0, r0 + R) against every x row, M at a time, then the rest (M <= 4). */
#define TILES(R, M)                                                                                \
    static void tiles_##R(const job_t *j, int64_t r0) {                                           \
        int x0 = 0;                                                                                \
        for (; x0 + M <= j->m; x0 += M) tile(j, r0, x0, R, M);                                   \
        switch (j->m - x0) {                                                                       \
        case 3: tile(j, r0, x0, R, 3); break;                                                      \
        case 2: tile(j, r0, x0, R, 2); break;                                                      \
        case 1: tile(j, r0, x0, R, 1); break;                                                      \
        default: break;                                                                            \
        }                                                                                          \
    }
TILES(8, 1)
TILES(4, 2)
TILES(1, 4)

static void *run(void *arg) {
    const job_t *j = (const job_t *)arg;
    int64_t r = j->begin;
    if (j->m == 1)
        for (; r + 8 <= j->end; r += 8) tiles_8(j, r);
    for (; r + 4 <= j->end; r += 4) tiles_4(j, r);
    for (; r < j->end; r++) tiles_1(j, r);
    return 0;
}
#endif

/* x [m, k] bf16, w [n, k/2] canonical INT4, scale [n, k/group] fp16, y [m, n] bf16;
   k and group multiples of 64, group dividing k; 0 on success. */
int glm_int4_gemv(const uint16_t *x, const uint8_t *w, const uint16_t *scale, uint16_t *y,
                  int64_t n, int k, int m, int group, int threads, uint16_t *xs, float *bias) {
#ifdef __AVX512BF16__
    const int half = k / 2, groups = k / group;
    for (int r = 0; r < m; r++) {                    /* split x into even and odd columns */
        const uint16_t *xr = x + (int64_t)r * k;
        uint16_t *xe = xs + (int64_t)r * k, *xo = xe + half;
        for (int i = 0; i < half; i++) { xe[i] = xr[2 * i]; xo[i] = xr[2 * i + 1]; }
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int i = g * group; i < (g + 1) * group; i++) s += bf16_at(xr, i);
            bias[r * groups + g] = 136.0f * s;
        }
    }
    job_t jobs[GLM_MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > GLM_MAX_THREADS) threads = GLM_MAX_THREADS;
    for (int i = 0; i < threads; i++) {                 /* row blocks of ROWS, shared evenly */
        const int64_t blocks = (n + ROWS - 1) / ROWS;
        int64_t b = blocks * i / threads * ROWS, e = blocks * (i + 1) / threads * ROWS;
        if (e > n) e = n;
        job_t job = {xs, bias, w, scale, y, b, e, n, k, m, group};
        jobs[i] = job;
    }
    glm_fan_out(run, jobs, sizeof(job_t), threads);
    return 0;
#else
    return -1;
#endif
}
"""

kernel = cbuild.Kernel("int4_gemv", SOURCE, "INT4 GEMV kernel", "glm_int4_gemv",
                       [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 2,
                       ok="glm_int4_ok")


def supports(qw) -> bool:
    """``matmul_t(x, qw, scales(qw))`` can run here: an INT4 CPU weight whose columns (and groups)
    are multiples of ``BLOCK``."""
    group = qw.in_features if qw.group_size is None else qw.group_size
    return (ENABLED and qw.bits == 4 and qw.values.device.type == "cpu" and qw.values.is_contiguous()
            and qw.in_features % BLOCK == 0 and group % BLOCK == 0 and kernel() is not None)


def scales(qw) -> torch.Tensor:
    """The fp16 scales as ``[n, groups]`` (one group per row for the official scheme): a view of
    ``qw.scale`` itself, so the kernel adds no memory; it widens each to fp32 exactly."""
    scale = qw.scale if qw.scale.is_contiguous() else qw.scale.contiguous()
    return scale[:, None] if qw.group_size is None else scale


def matmul_t(x: torch.Tensor, qw, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., k] @ W^T`` in bf16 for the INT4 ``qw`` (``supports(qw)``; ``scale`` =
    ``scales(qw)``); at most ``MAX_ROWS`` rows are what it is fast for, any count is correct."""
    n, k = qw.out_features, qw.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=torch.bfloat16)
    if m:
        xs = torch.empty((m, k), dtype=torch.bfloat16)
        bias = torch.empty((m, scale.shape[1]), dtype=torch.float32)
        count = threads.for_work(n * k, THREAD_WORK)
        if kernel().glm_int4_gemv(x2.data_ptr(), qw.values.data_ptr(), scale.data_ptr(), y.data_ptr(), n, k, m,
                                  k // scale.shape[1], count, xs.data_ptr(), bias.data_ptr()) != 0:
            raise RuntimeError("the INT4 GEMV kernel is not usable on this CPU")
    return y.reshape(*lead, n)


# Measured row counts by weight shape: the layers of a model share a few shapes, so each is
# timed once per process. Key: (out, in, group).
_measured: dict[tuple[int, int, int], int] = {}


def rows_faster(qw, other: Callable[[torch.Tensor], torch.Tensor] | None) -> int:
    """The most rows (0 to ``MAX_ROWS``) up to which ``matmul_t`` beats ``other`` (torch's INT4
    kernel) on ``qw``'s shape here, timed alternating on ``qw`` itself the first time the shape
    is seen (``cbuild.rows_won``). 0 when the kernel does not serve ``qw``; ``MAX_ROWS`` when
    there is no ``other`` (the dequantize path is far slower); ``CHOICE`` "on" / "off" answers
    without timing."""
    if not supports(qw):
        return 0
    if CHOICE in ("on", "off") or other is None:
        return 0 if CHOICE == "off" else MAX_ROWS
    key = (qw.out_features, qw.in_features, qw.group_size or qw.in_features)
    if key not in _measured:
        scale = scales(qw)
        with torch.inference_mode():
            _measured[key] = cbuild.rows_won(
                lambda x: matmul_t(x, qw, scale), other,
                lambda rows: torch.randn((rows, qw.in_features), dtype=torch.bfloat16), MAX_ROWS, ROUNDS, WIN)
    return _measured[key]
