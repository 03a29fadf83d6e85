"""The tied LM head in fp32 on an AVX2/FMA CPU: a small C GEMM over a micro-panel copy.

``y [m, n] = x [m, k] @ W [n, k]^T`` for fp32 ``x`` and ``W``, any ``m``. ``Panels`` holds ``W`` as
micro-panels of ``NR`` = 16 columns, ``[n / 16, k, 16]``, each one contiguous run of memory; a tile
multiplies up to six rows of ``x`` by one to four micro-panels with its accumulators in registers;
the panels are taken ``GROUP`` at a time (192 KB at k = 256: the L2 cache) and each group, read
from memory once, is multiplied from the cache by every block of six rows. So the matrix is read
once per call at any batch, where torch's MKL call on this shape reads it again for every few rows
(on an AMD Zen 3 with AVX2 only, 150 528 x 256: 1.4-2x this kernel's time from two rows on;
docs/benchmarks.md, "The fp32 head on AVX2"). The threads claim ``CLAIM`` groups at a time from a
shared counter, so a thread the OS leaves waiting holds back only its last claim.

Every output is the same sum over ``k`` in the same order whatever rows share the call, so a row's
logits do not depend on its batch (MKL's do, by a rounding); they differ from ``F.linear`` by the
rounding of another summation order.

Built on first use by ``kernels.cbuild``; only where the compiler targets AVX2 and FMA
(``-march=native``) does the library report itself usable (``glm_gemm_f32_ok``). Whether it is
faster than MKL depends on the CPU: ``faster`` measures both on the real weight when the model is
prepared; ``CHOICE`` = "on" / "off" answers without measuring.
"""

from __future__ import annotations

import ctypes
from typing import Callable

import torch

from kernels import cbuild, threads

ENABLED = True
CHOICE = "auto"               # "auto": measured by ``faster``; "on" / "off": without measuring
WIN = 0.9                     # the kernel is taken where its median time is below WIN x the dense op's
ROUNDS = 5                    # alternating timed calls of each, after two untimed ones
PROBE_ROWS = (1, 32)          # row counts ``faster`` measures: the kernel must win at both
MEASURE_BYTES = 16 << 20      # smaller weights take the kernel without measuring (it costs nothing there)

NR = 16                       # columns of a micro-panel: two ymm registers
GROUP = 12                    # micro-panels reused from L2 by every block of x's rows (192 KB at k = 256)
KC = 256                      # rows of a micro-panel a tile sums before it adds into y
CLAIM = 4                     # groups a thread claims at a time (the last thread to finish waits for one claim)
TILES = ((1, 4), (2, 2), (3, 1), (4, 1), (5, 1), (6, 1), (1, 1), (2, 1))     # (rows of x, micro-panels)


def _tile(mr: int, np_: int) -> str:
    """The C of one tile: ``mr`` rows of x times ``np_`` micro-panels of w (each ``[k, NR]``,
    contiguous) over rows p0..p1, its accumulators named one by one (GCC keeps an array of them
    on the stack), stored (the first rows) or added into y."""
    cols = [(q, h) for q in range(np_) for h in range(2)]          # (micro-panel, half)
    acc = [[f"a{i}_{q}_{h}" for q, h in cols] for i in range(mr)]
    lines = [f"static void tile_{mr}_{np_}(const float *x, int k, const float *w, int64_t ldw, float *y, int64_t ldy,",
             "                   int p0, int p1, int add, const float *pf) {"]
    lines += [f"    __m256 {', '.join(row)};" for row in acc]
    lines += [f"    {a} = _mm256_setzero_ps();" for row in acc for a in row]
    lines += ["    for (int p = p0; p < p1; p++) {"]
    lines += ["        if (pf) {"]
    lines += [f"            _mm_prefetch((const char *)(pf + {q} * ldw + (int64_t)p * NR), _MM_HINT_T0);" for q in range(np_)]
    lines += ["        }"]
    lines += [f"        const __m256 w{q}_{h} = _mm256_loadu_ps(w + {q} * ldw + (int64_t)p * NR + {8 * h});"
              for q, h in cols]
    for i in range(mr):
        lines.append(f"        {{ const __m256 b = _mm256_broadcast_ss(x + (int64_t){i} * k + p);")
        lines += [f"          {acc[i][c]} = _mm256_fmadd_ps(b, w{q}_{h}, {acc[i][c]});" for c, (q, h) in enumerate(cols)]
        lines.append("        }")
    lines.append("    }")
    for i in range(mr):
        for c, (q, h) in enumerate(cols):
            y = f"y + (int64_t){i} * ldy + {q * 16 + 8 * h}"
            lines.append(f"    _mm256_storeu_ps({y}, add ? _mm256_add_ps(_mm256_loadu_ps({y}), {acc[i][c]}) : {acc[i][c]});")
    lines.append("}")
    return "\n".join(lines) + "\n"


SOURCE = cbuild.FAN_OUT + f"#define NR {NR}\n#define GROUP {GROUP}\n#define KC {KC}\n#define CLAIM {CLAIM}\n" + r"""
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GLM_OK 1
#else
#define GLM_OK 0
#endif

int glm_gemm_f32_ok(void) { return GLM_OK; }

#if GLM_OK
typedef struct { const float *x; const float *w; float *y; int64_t *next; int64_t panels, ldy; int k, m; } job_t;

""" + "".join(_tile(mr, np_) for mr, np_ in TILES) + r"""
typedef void (*tile_fn)(const float *, int, const float *, int64_t, float *, int64_t, int, int, int, const float *);
static const tile_fn TILE[7] = {0, tile_1_4, tile_2_2, tile_3_1, tile_4_1, tile_5_1, tile_6_1};
static const tile_fn ONE[7] = {0, tile_1_1, tile_2_1, tile_3_1, tile_4_1, tile_5_1, tile_6_1};
static const int PANELS[7] = {0, 4, 2, 1, 1, 1, 1};

/* micro-panels begin..end of w [panels, k, NR], GROUP at a time: each KC rows of a group (read
   from memory once) times every block of six rows of x (from the cache) */
static void span(const job_t *j, int64_t begin, int64_t end) {
    const int k = j->k;
    const int64_t ldw = (int64_t)k * NR;
    for (int64_t g0 = begin; g0 < end; g0 += GROUP) {
        const int64_t g1 = g0 + GROUP < end ? g0 + GROUP : end;
        for (int p0 = 0; p0 < k; p0 += KC) {
            const int p1 = p0 + KC < k ? p0 + KC : k;
            for (int r = 0; r < j->m; r += 6) {
                const int mr = j->m - r < 6 ? j->m - r : 6;
                const float *x = j->x + (int64_t)r * k;
                float *y = j->y + (int64_t)r * j->ldy;
                /* with more than one block of rows, the first block also prefetches the next
                   group's same rows (measured: at 16-32 rows 10 % faster; at one block of rows,
                   slower) */
                const int pre = j->m > 6 && r == 0 && g1 + GROUP <= end;
                int64_t q = g0;
                for (; q + PANELS[mr] <= g1; q += PANELS[mr])
                    TILE[mr](x, k, j->w + q * ldw, ldw, y + q * NR, j->ldy, p0, p1, p0 > 0,
                             pre ? j->w + (q + GROUP) * ldw : 0);
                for (; q < g1; q++)                     /* fewer micro-panels left than a tile takes */
                    ONE[mr](x, k, j->w + q * ldw, ldw, y + q * NR, j->ldy, p0, p1, p0 > 0, 0);
            }
        }
    }
}

/* The threads claim CLAIM groups at a time from a shared counter, so that a thread the OS
   leaves waiting (another process on its core) holds back only what it claimed. */
static void *run(void *arg) {
    const job_t *j = (const job_t *)arg;
    const int64_t step = (int64_t)GROUP * CLAIM;
    for (;;) {
        const int64_t begin = __atomic_fetch_add(j->next, step, __ATOMIC_RELAXED);
        if (begin >= j->panels) break;
        span(j, begin, begin + step < j->panels ? begin + step : j->panels);
    }
    return 0;
}
#endif

/* x [m, k] fp32, w [panels, k, NR] fp32 (Panels), y [m, panels * NR] fp32; 0 on success. */
int glm_gemm_f32(const float *x, const float *w, float *y, int64_t panels, int k, int m, int threads) {
#if GLM_OK
    job_t jobs[GLM_MAX_THREADS];
    int64_t next = 0;
    if (threads < 1) threads = 1;
    if (threads > GLM_MAX_THREADS) threads = GLM_MAX_THREADS;
    for (int i = 0; i < threads; i++) {
        job_t job = {x, w, y, &next, panels, panels * NR, k, m};
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
kernel = cbuild.Kernel("gemm_f32", SOURCE, "fp32 head GEMM kernel", "glm_gemm_f32",
                       [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_int] * 3, ok="glm_gemm_f32_ok")


def supports(weight: torch.Tensor) -> bool:
    """``Panels(weight)`` can run here: an fp32 ``[n, k]`` CPU weight."""
    return (ENABLED and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and kernel() is not None)


class Panels:
    """``op(x) = x @ W^T`` for an fp32 ``[n, k]`` weight, held as a packed copy in micro-panels of
    ``NR`` columns, ``[n / NR, k, NR]`` (the last one zero-padded): each one contiguous run of
    memory the kernel streams once per call. ``layout`` and ``nbytes`` as
    ``kernels.cpu_dense.CpuDenseLinear``."""

    layout = "panels"

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.dtype = torch.float32
        panels = -(-self.out_features // NR)
        padded = torch.zeros((panels * NR, self.in_features), dtype=torch.float32)
        padded[: self.out_features] = weight.detach()
        self.weight = padded.view(panels, NR, self.in_features).transpose(1, 2).contiguous()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        panels, k, _ = self.weight.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        y = torch.empty((x2.shape[0], panels * NR), dtype=torch.float32)
        if x2.shape[0]:
            if kernel().glm_gemm_f32(x2.data_ptr(), self.weight.data_ptr(), y.data_ptr(), panels, k,
                                     x2.shape[0], threads.outer()) != 0:
                raise RuntimeError("the fp32 GEMM kernel is not usable on this CPU")
        if panels * NR != self.out_features:
            y = y[:, : self.out_features].contiguous()
        return y.reshape(*lead, self.out_features)


def faster(op: Panels, dense: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``op(x)`` beats ``dense(x)`` here at every row count of ``PROBE_ROWS``: timed, the
    two alternating (``ROUNDS`` calls each, medians), the kernel winning where it takes less than
    ``WIN`` of the dense time. True without timing for a weight under ``MEASURE_BYTES``; ``CHOICE``
    "on" / "off" answers without timing."""
    if CHOICE in ("on", "off"):
        return CHOICE == "on"
    if op.nbytes < MEASURE_BYTES:
        return True
    with torch.inference_mode():
        for rows in PROBE_ROWS:
            x = torch.randn((rows, op.in_features))
            median = cbuild.median_times({"kernel": lambda: op(x), "dense": lambda: dense(x)}, ROUNDS)
            if median["kernel"] >= WIN * median["dense"]:
                return False
    return True
