"""Which torch thread count a CPU op runs on, inside a forward whose element-wise work is small.

A worker's torch threads sleep between parallel regions (``OMP_WAIT_POLICY=PASSIVE``,
docs/benchmarks.md "Threads"), and waking one costs ~50-100 µs on the KVM guests measured. ATen
splits an element-wise op over the threads from 32 768 elements, a LayerNorm over its rows and
a GELU from fewer: at the demo model's decode sizes each such op then costs the wake-up, several
times its own work (bf16, two threads against one: LayerNorm over 32 rows × 256 41 µs against 7,
GELU over 64 × 688 68 against 26; docs/benchmarks.md, "Threads", its part on element-wise ops).

``serial()`` runs a block on one torch thread; inside it ``parallel()`` gives a block back the
thread count the process had outside (``outer()``), for the ops whose work pays for more: the
dense linears above ``kernels.cpu_dense.SERIAL_MACS``, the quantized linears, and the C kernels,
which start their own POSIX threads (at most ``outer()``: ``for_work``). Outside ``serial()`` both are
no-ops. The regions are per thread (a worker runs its forwards on one model thread).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

# Elements of the largest element-wise operand below which a forward runs its element-wise ops
# on one thread (measured, docs/benchmarks.md "Threads", element-wise ops: one thread is
# faster up to ~400 000 elements for LayerNorm, GELU and products, two from ~800 000).
SERIAL_ELEMENTS = 1 << 19

_state = threading.local()


def outer() -> int:
    """The torch thread count outside any ``serial()`` region of this thread."""
    return getattr(_state, "outer", None) or torch.get_num_threads()


def for_work(work: int, per_thread: int) -> int:
    """POSIX threads for a C kernel call of ``work`` units: one per ``per_thread`` of them (a
    thread start costs more than a smaller share), at least one, at most ``outer()``."""
    return max(1, min(outer(), work // per_thread))


@contextmanager
def serial(enabled: bool = True) -> Iterator[None]:
    """The block on one torch thread (``enabled`` False, or already inside one: no change)."""
    if not enabled or getattr(_state, "outer", None) is not None:
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    _state.outer = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _state.outer = None


@contextmanager
def parallel() -> Iterator[None]:
    """Inside ``serial()``: the block on the outer thread count; elsewhere no change."""
    threads = getattr(_state, "outer", None)
    if threads is None:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)
