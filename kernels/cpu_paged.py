"""Decode attention straight from the paged KV pool, on a CPU: a small C kernel.

A torch implementation must first gather each row's blocks into a contiguous tensor (one
copy of every key and value the step reads) before its batched matmuls; measured here that
copy, not the arithmetic, is most of the time at long contexts (docs/benchmarks.md, "Paged
KV"). This kernel reads keys and values where they lie, through the block tables: for each
(row, head), the scores of the query against the row's cached keys, an fp32 softmax, and the
probability-weighted sum of its values, all in fp32 (bf16 pools widened as they are read),
the official arithmetic of a decode step (docs/model.md, "Attention and QKV layout"). Where the
head size is a multiple of the CPU's vector width (AVX-512 or AVX2 with FMA), the query and the
output accumulator stay in registers and the exponentials are a branch-free polynomial within 2
ulp of ``expf`` that vectorises (3-4x the plain C loop: docs/benchmarks.md, "Paged KV"); other
sizes and CPUs take the plain C loop. The (row, head) pairs are shared among ``threads`` POSIX
threads.

It is compiled on first use with the machine's C compiler (``kernels.cbuild``: ``cc -O3
-march=native``, the vector units of the CPU at hand, cached in ``~/.cache/glm/kernels``) and
loaded with ctypes. Where no compiler or no build works (or ``ENABLED`` is False: benchmarks
compare both), ``supports`` is False and the caller keeps the torch path
(``model.paged_kv.PagedStep``), which computes the same values.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import cbuild, threads

SOURCE = cbuild.FAN_OUT + cbuild.SCALAR_MATH + r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

typedef struct {
    const float *q; const void *k; const void *v; const int64_t *tables; const int64_t *lens;
    int heads, dim, block_size, max_blocks, bf16; int64_t slots; float *out;
    int64_t begin, end, max_len;
} job_t;

/* scores[t] = exp(scores[t] - max) for t < len; their sum. */
static float softmax_numerators(float *scores, int64_t len) {
    float m = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < len; t++) m = scores[t] > m ? scores[t] : m;
    _Pragma("omp simd reduction(+:sum)")
    for (int64_t t = 0; t < len; t++) { scores[t] = exp_nonpositive(scores[t] - m); sum += scores[t]; }
    return sum;
}

#define DOT(T, LOAD)                                                                          \
    static inline float dot_##T(const float *q, const void *base, int64_t at, int dim) {     \
        float s = 0.0f;                                                                       \
        _Pragma("omp simd reduction(+:s)")                                                    \
        for (int i = 0; i < dim; i++) s += q[i] * LOAD(base, at + i);                         \
        return s;                                                                             \
    }                                                                                         \
    static inline void axpy_##T(float *acc, float w, const void *base, int64_t at, int dim) { \
        _Pragma("omp simd")                                                                   \
        for (int i = 0; i < dim; i++) acc[i] += w * LOAD(base, at + i);                       \
    }
#define LOAD_F32(b, i) (((const float *)(b))[i])
#define LOAD_BF16(b, i) bf16_at((const uint16_t *)(b), i)
DOT(f32, LOAD_F32)
DOT(bf16, LOAD_BF16)

/* One (row, head) in plain C, any dim: out = softmax(q . k_t) . v_t over the row's tokens. */
static void item_scalar(const job_t *j, const float *q, const int64_t *table, int64_t base, int64_t len,
                        float *scores, float *acc, float *out) {
    const int bs = j->block_size, dim = j->dim;
    for (int64_t t = 0; t < len; t++) {
        const int64_t at = (base + table[t / bs] * bs + t % bs) * dim;
        scores[t] = j->bf16 ? dot_bf16(q, j->k, at, dim) : dot_f32(q, j->k, at, dim);
    }
    const float sum = softmax_numerators(scores, len);
    memset(acc, 0, sizeof(float) * (size_t)dim);
    for (int64_t t = 0; t < len; t++) {
        const int64_t at = (base + table[t / bs] * bs + t % bs) * dim;
        if (j->bf16) axpy_bf16(acc, scores[t], j->v, at, dim); else axpy_f32(acc, scores[t], j->v, at, dim);
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < dim; i++) out[i] = acc[i] * inv;
}

/* The same with the CPU's vectors for a dim that is a multiple of their width (up to 256):
   the query and the accumulator held in registers, keys and values widened from bf16 as they
   are loaded, a block's tokens walked by pointer. */
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vec_t;
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_LOAD_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(                                 \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_MUL(a, b) _mm512_mul_ps(a, b)
#define V_SET1(x) _mm512_set1_ps(x)
#define V_STORE(p, a) _mm512_storeu_ps(p, a)
#define V_SUM(a) _mm512_reduce_add_ps(a)
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vec_t;
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_LOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(                                 \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_MUL(a, b) _mm256_mul_ps(a, b)
#define V_SET1(x) _mm256_set1_ps(x)
#define V_STORE(p, a) _mm256_storeu_ps(p, a)
static inline float V_SUM(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#ifdef VW
#define MAX_CHUNKS (256 / VW)
static inline __attribute__((always_inline)) void
item_vec(const job_t *j, const float *q, const int64_t *table, int64_t base, int64_t len, float *scores,
         float *out, const int chunks, const int bf16) {
    const int bs = j->block_size, dim = j->dim;
    vec_t qv[MAX_CHUNKS], acc[MAX_CHUNKS];
    for (int c = 0; c < chunks; c++) { qv[c] = V_LOAD(q + c * VW); acc[c] = V_SET1(0.0f); }
    for (int64_t t0 = 0; t0 < len; t0 += bs) {
        const int64_t n = len - t0 < bs ? len - t0 : bs;
        const int64_t at = (base + table[t0 / bs] * bs) * dim;
        for (int64_t t = 0; t < n; t++) {
            vec_t s;
            if (bf16) {
                const uint16_t *k = (const uint16_t *)j->k + at + t * dim;
                s = V_MUL(qv[0], V_LOAD_BF16(k));
                for (int c = 1; c < chunks; c++) s = V_FMA(qv[c], V_LOAD_BF16(k + c * VW), s);
            } else {
                const float *k = (const float *)j->k + at + t * dim;
                s = V_MUL(qv[0], V_LOAD(k));
                for (int c = 1; c < chunks; c++) s = V_FMA(qv[c], V_LOAD(k + c * VW), s);
            }
            scores[t0 + t] = V_SUM(s);
        }
    }
    const float sum = softmax_numerators(scores, len);
    for (int64_t t0 = 0; t0 < len; t0 += bs) {
        const int64_t n = len - t0 < bs ? len - t0 : bs;
        const int64_t at = (base + table[t0 / bs] * bs) * dim;
        for (int64_t t = 0; t < n; t++) {
            const vec_t w = V_SET1(scores[t0 + t]);
            if (bf16) {
                const uint16_t *v = (const uint16_t *)j->v + at + t * dim;
                for (int c = 0; c < chunks; c++) acc[c] = V_FMA(w, V_LOAD_BF16(v + c * VW), acc[c]);
            } else {
                const float *v = (const float *)j->v + at + t * dim;
                for (int c = 0; c < chunks; c++) acc[c] = V_FMA(w, V_LOAD(v + c * VW), acc[c]);
            }
        }
    }
    const vec_t inv = V_SET1(1.0f / sum);
    for (int c = 0; c < chunks; c++) V_STORE(out + c * VW, V_MUL(acc[c], inv));
}

/* Constant chunk counts for the head sizes served (GLM-130B's 128, the demo's 32, the test
   models' 16 and 64), so that each inner loop unrolls. */
#define ITEM_VEC_CASE(D)                                                                      \
    case D / VW: if (j->bf16) item_vec(j, q, table, base, len, scores, out, D / VW, 1);       \
                 else item_vec(j, q, table, base, len, scores, out, D / VW, 0);               \
                 return 1;
static int item_vectors(const job_t *j, const float *q, const int64_t *table, int64_t base, int64_t len,
                        float *scores, float *out) {
    if (j->dim % VW || j->dim > 256) return 0;
    switch (j->dim / VW) {
        ITEM_VEC_CASE(16)
        ITEM_VEC_CASE(32)
        ITEM_VEC_CASE(64)
        ITEM_VEC_CASE(128)
        ITEM_VEC_CASE(256)
        default:
            if (j->bf16) item_vec(j, q, table, base, len, scores, out, j->dim / VW, 1);
            else item_vec(j, q, table, base, len, scores, out, j->dim / VW, 0);
            return 1;
    }
}
#else
static int item_vectors(const job_t *j, const float *q, const int64_t *table, int64_t base, int64_t len,
                        float *scores, float *out) {
    (void)j; (void)q; (void)table; (void)base; (void)len; (void)scores; (void)out;
    return 0;
}
#endif

static void *run(void *arg) {
    job_t *j = (job_t *)arg;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(j->max_len > 0 ? j->max_len : 1));
    float *acc = (float *)malloc(sizeof(float) * (size_t)j->dim);
    const int dim = j->dim;
    for (int64_t item = j->begin; item < j->end; item++) {
        const int64_t row = item / j->heads, head = item % j->heads, len = j->lens[row];
        const float *q = j->q + item * dim;
        const int64_t *table = j->tables + row * j->max_blocks;
        float *out = j->out + item * dim;
        if (len <= 0) { memset(out, 0, sizeof(float) * (size_t)dim); continue; }   /* zeros */
        if (!item_vectors(j, q, table, head * j->slots, len, scores, out))
            item_scalar(j, q, table, head * j->slots, len, scores, acc, out);
    }
    free(scores); free(acc);
    return NULL;
}

/* q [rows, heads, dim] fp32 (already scaled); k, v: one layer of the pool [heads, slots, dim];
   tables [rows, max_blocks]; lens [rows]; out [rows, heads, dim] fp32. */
int glm_paged_decode(const float *q, const void *k, const void *v, const int64_t *tables,
                     const int64_t *lens, int rows, int heads, int dim, int64_t slots, int block_size,
                     int max_blocks, int bf16, float *out, int threads) {
    int64_t max_len = 0;
    for (int r = 0; r < rows; r++) if (lens[r] > max_len) max_len = lens[r];
    const int64_t items = (int64_t)rows * heads;
    if (threads < 1) threads = 1;
    if (threads > items) threads = (int)items;
    job_t jobs[GLM_MAX_THREADS];
    if (threads > GLM_MAX_THREADS) threads = GLM_MAX_THREADS;
    for (int i = 0; i < threads; i++) {
        job_t j = {q, k, v, tables, lens, heads, dim, block_size, max_blocks, bf16, slots, out,
                   items * i / threads, items * (i + 1) / threads, max_len};
        jobs[i] = j;
    }
    glm_fan_out(run, jobs, sizeof(job_t), threads);
    return 0;
}
"""

ENABLED = True                                   # False: every caller takes the torch path
THREAD_WORK = 750_000      # keys read per thread (elements) below which a call runs on fewer threads


# The compiled kernel (built once per process, cached on disk), or None.
kernel = cbuild.Kernel("paged_decode", SOURCE, "paged decode kernel", "glm_paged_decode",
                       [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3 + [ctypes.c_int64] + [ctypes.c_int] * 3
                       + [ctypes.c_void_p, ctypes.c_int])


def supports(pool_dtype: torch.dtype) -> bool:
    """Whether decode attention over a pool of ``pool_dtype`` goes through the kernel."""
    return ENABLED and pool_dtype in (torch.float32, torch.bfloat16) and kernel() is not None


def paged_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention of one query per row: ``q [rows, heads, dim]`` fp32, already scaled by
    ``1/sqrt(dim)``; ``keys``/``values`` one layer of a pool ``[heads, slots, dim]`` (fp32 or
    bf16, contiguous); ``tables [rows, max_blocks]`` and ``lens [rows]`` int64. The fp32 result
    ``[rows, heads, dim]`` (zeros for a row of length 0)."""
    lib = kernel()
    if lib is None:
        raise RuntimeError("the paged decode kernel is not available on this machine")
    rows, heads, dim = q.shape
    q, tables, lens = q.contiguous(), tables.contiguous(), lens.contiguous()
    if not (keys.is_contiguous() and values.is_contiguous()) or keys.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("paged_decode needs contiguous fp32 or bf16 keys and values")
    out = torch.empty((rows, heads, dim), dtype=torch.float32)
    lib.glm_paged_decode(q.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                         rows, heads, dim, keys.shape[1], block_size, tables.shape[1],
                         int(keys.dtype == torch.bfloat16), out.data_ptr(), threads_for(lens, heads, dim))
    return out


def threads_for(lens: torch.Tensor, heads: int, dim: int) -> int:
    """Threads for a call that reads ``sum(lens) * heads * dim`` keys (and as many values):
    one below ``THREAD_WORK`` per thread, since starting a thread costs more than such a share
    (docs/benchmarks.md, "Paged KV"), else up to torch's thread count."""
    work = int(lens.sum()) * heads * dim
    return threads.for_work(work, THREAD_WORK)
