"""Small C kernels built on first use with the machine's compiler, for the CPU at hand.

``build(name, source)`` compiles ``source`` with ``cc -O3 -march=native`` (the vector units of
this CPU) into ``CACHE`` (``~/.cache/glm/kernels``) under a name that hashes the source, the
compiler, the flags and the CPU's flags, and loads it with ctypes. Concurrent builders agree
(the library is moved into place atomically); a later process loads the cached file. Where no
compiler or no build works it returns None and logs why: every caller has a torch path.
``Kernel`` is how a kernel module holds its library (built on first call, its signature set);
``median_times`` times a kernel against the op it may replace, alternating, and ``rows_won``
finds up to how many activation rows the kernel wins.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger("glm.kernels")

# C both kernels share (prepend to a source): run ``run`` on each of ``threads`` jobs of ``size``
# bytes, the first on the calling thread, the others on POSIX threads (inline where one cannot
# start), and wait for all.
FAN_OUT = r"""
#include <pthread.h>
#include <stddef.h>
#define GLM_MAX_THREADS 64
static void glm_fan_out(void *(*run)(void *), void *jobs, size_t size, int threads) {
    pthread_t ids[GLM_MAX_THREADS];
    char *at = (char *)jobs;
    int started = 0;
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&ids[i], NULL, run, at + i * size) != 0) break;
        started = i;
    }
    for (int i = started + 1; i < threads; i++) run(at + i * size);   /* threads that did not start */
    run(at);
    for (int i = 1; i <= started; i++) pthread_join(ids[i], NULL);
}
"""

# C the kernels share (prepend to a source): bf16 loads, the bf16 rounding of an fp32 result,
# and an exponential for x <= 0.
SCALAR_MATH = r"""
#include <stdint.h>
#include <string.h>
static inline float bf16_at(const uint16_t *p, int64_t i) {
    uint32_t u = ((uint32_t)p[i]) << 16; float f; memcpy(&f, &u, 4); return f;
}

static inline uint16_t to_bf16(float f) {          /* round to nearest even, as torch does */
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);   /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* exp(x) for x <= 0 (a score minus the row's maximum), within 2 ulp of expf: x = n ln2 + r,
   |r| <= ln2/2, a degree-6 polynomial for exp(r) (Cephes' coefficients), times 2^n built in
   the exponent bits. Below -87 it gives exp(-87) ~ 1.6e-38 where expf underflows further:
   against a sum >= 1 (the maximum's own term) the difference is below any fp32 rounding.
   Branch-free, so a loop of it vectorises. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round(x / ln2) */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale; memcpy(&scale, &bits, 4);
    return p * scale;
}
"""

FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-shared", "-fPIC")
CACHE = Path.home() / ".cache" / "glm" / "kernels"


def cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build(name: str, source: str, what: str) -> ctypes.CDLL | None:
    """The loaded library of ``source`` (``name`` names its file; ``what`` its log lines)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("%s: no C compiler; the torch path is used", what)
        return None
    key = hashlib.sha256("\0".join([source, compiler, *FLAGS, cpu_flags()]).encode()).hexdigest()[:16]
    target = CACHE / f"{name}-{key}.so"
    if not target.exists():
        try:
            CACHE.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([compiler, *FLAGS, "-o", str(lib), str(src), "-lpthread", "-lm"],
                               check=True, capture_output=True, timeout=120)
                os.replace(lib, target)                    # atomic: concurrent builders agree
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            log.warning("%s: build failed (%s %s); the torch path is used", what, exc,
                        detail.decode(errors="replace")[:500])
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        log.warning("%s: cannot load %s (%s); the torch path is used", what, target, exc)
        return None


class Kernel:
    """A kernel library built and loaded on first call, once per process: ``kernel()`` is the
    loaded library with ``function``'s ctypes signature set, or None where it does not build or
    its ``ok`` function (when named) says this CPU cannot run it."""

    def __init__(self, name: str, source: str, what: str, function: str, argtypes: Sequence,
                 ok: str | None = None) -> None:
        self.name, self.source, self.what = name, source, what
        self.function, self.argtypes, self.ok = function, list(argtypes), ok
        self._lib: ctypes.CDLL | None | bool = False      # False: not tried yet

    def __call__(self) -> ctypes.CDLL | None:
        if self._lib is False:
            lib = build(self.name, self.source, self.what)
            if lib is not None and self.ok is not None and getattr(lib, self.ok)() != 1:
                lib = None
            if lib is not None:
                fn = getattr(lib, self.function)
                fn.restype, fn.argtypes = ctypes.c_int, self.argtypes
            self._lib = lib
        return self._lib


def median_times(calls: dict[str, Callable[[], object]], rounds: int, untimed: int = 2) -> dict[str, float]:
    """The median seconds of each of ``calls``, called in turn for ``untimed + rounds`` rounds
    (the first ``untimed`` not timed), so that a burst of other load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(untimed + rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ >= untimed:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def rows_won(kernel: Callable[[object], object], other: Callable[[object], object], make_x: Callable[[int], object],
             max_rows: int, rounds: int, win: float) -> int:
    """The most rows (0 to ``max_rows``) up to which ``kernel(x)`` beats ``other(x)`` here, for
    ``x = make_x(rows)``: each row count timed by ``median_times``, the kernel kept while its
    median is below ``win`` x the other's (the first row count it loses at ends the search)."""
    best = 0
    for rows in range(1, max_rows + 1):
        x = make_x(rows)
        median = median_times({"kernel": lambda: kernel(x), "other": lambda: other(x)}, rounds)
        if median["kernel"] >= win * median["other"]:
            break
        best = rows
    return best
