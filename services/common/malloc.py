"""glibc malloc settings for a process that allocates the same large temporaries every step.

A decode step allocates logits and activations of a few MB each. glibc serves blocks above
its mmap threshold with a fresh ``mmap`` and gives freed heap tops back to the OS above its
trim threshold, so each step touches new pages: with the defaults a 19 MB temporary cost
~1 650 minor page faults per allocation here, ~470 with the settings below (measured in
``docs/benchmarks.md``, "Worker step"). ``tune_malloc`` raises the mmap threshold to
glibc's maximum (32 MiB on 64-bit) and keeps up to 1 GiB of freed heap, as jemalloc or
tcmalloc would by design; the cost is that the process's resident size stays at its peak.
A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("glm.malloc")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20      # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30


def tune_malloc() -> bool:
    """Apply the settings; True when glibc took both."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; keeping the C library's defaults")
    return ok
