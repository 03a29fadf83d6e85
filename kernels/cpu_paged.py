"""Decode attention straight from the paged KV pool, on a CPU: a small C kernel.

A torch implementation must first gather each row's blocks into a contiguous tensor (one
copy of every key and value the step reads) before its batched matmuls; measured here that
copy, not the arithmetic, is most of the time at long contexts (docs/benchmarks.md, "Paged
KV"). This kernel reads keys and values where they lie, through the block tables: for each
(row, head), the scores of the query against the row's cached keys, an fp32 softmax, and the
probability-weighted sum of its values, all in fp32 (bf16 pools widened as they are read),
the official arithmetic of a decode step (docs/model.md, "Attention and QKV layout"). The
(row, head) pairs are shared among ``threads`` POSIX threads.

It is compiled on first use with the machine's C compiler (``kernels.cbuild``: ``cc -O3
-march=native``, the vector units of the CPU at hand, cached in ``~/.cache/glm/kernels``) and
loaded with ctypes. Where no compiler or no build works (or ``ENABLED`` is False: benchmarks
compare both), ``supports`` is False and the caller keeps the torch path
(``model.paged_kv.PagedStep``), which computes the same values.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import cbuild

SOURCE = cbuild.FAN_OUT + r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *q; const void *k; const void *v; const int64_t *tables; const int64_t *lens;
    int heads, dim, block_size, max_blocks, bf16; int64_t slots; float *out;
    int64_t begin, end, max_len;
} job_t;

static inline float bf16_at(const uint16_t *p, int64_t i) {
    uint32_t u = ((uint32_t)p[i]) << 16; float f; memcpy(&f, &u, 4); return f;
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

static void *run(void *arg) {
    job_t *j = (job_t *)arg;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(j->max_len > 0 ? j->max_len : 1));
    float *acc = (float *)malloc(sizeof(float) * (size_t)j->dim);
    const int bs = j->block_size, dim = j->dim;
    for (int64_t item = j->begin; item < j->end; item++) {
        const int64_t row = item / j->heads, head = item % j->heads, len = j->lens[row];
        const float *q = j->q + item * dim;
        const int64_t *table = j->tables + row * j->max_blocks;
        const int64_t base = head * j->slots;
        float m = -INFINITY;
        for (int64_t t = 0; t < len; t++) {
            const int64_t at = (base + table[t / bs] * bs + t % bs) * dim;
            const float s = j->bf16 ? dot_bf16(q, j->k, at, dim) : dot_f32(q, j->k, at, dim);
            scores[t] = s;
            if (s > m) m = s;
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < len; t++) { scores[t] = expf(scores[t] - m); sum += scores[t]; }
        memset(acc, 0, sizeof(float) * (size_t)dim);
        for (int64_t t = 0; t < len; t++) {
            const int64_t at = (base + table[t / bs] * bs + t % bs) * dim;
            if (j->bf16) axpy_bf16(acc, scores[t], j->v, at, dim); else axpy_f32(acc, scores[t], j->v, at, dim);
        }
        float *out = j->out + item * dim;
        const float inv = len > 0 ? 1.0f / sum : 0.0f;       /* a row of length 0 gives zeros */
        for (int i = 0; i < dim; i++) out[i] = acc[i] * inv;
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
THREAD_WORK = 400_000      # keys read per thread (elements) below which a call runs on fewer threads


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
    return max(1, min(torch.get_num_threads(), work // THREAD_WORK))
