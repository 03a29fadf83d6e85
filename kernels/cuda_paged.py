"""Decode attention straight from the paged KV pool, on a GPU: ``kernels/cuda/paged_attention.cu``.

The CUDA counterpart of ``kernels.cpu_paged``: for each (row, head), the query against the
row's cached keys, an fp32 softmax and the weighted sum of its values, read through the
row's block table where they lie in the pool (``model.paged_kv``). The lengths and tables
are read on the device, so the launch is the same for every step and can be captured in a
CUDA graph (``model.cuda_graphs``).

Compiled at run time with NVRTC through cupy for the GPU present, one module per (device,
arch, dtype), as ``kernels.cuda`` does for the quantized linears; nothing happens at import.
Where cupy or NVRTC is missing, or ``ENABLED`` is False (benchmarks compare both),
``supports`` is False and callers keep the torch path of ``model.paged_kv``, which computes the
same values. ``tests/test_kernels_cuda.py`` compiles the source with nvcc on every CI run and,
on a GPU, pins the kernel to the torch path; ``bench/gpu_check.py`` does both at GLM-130B's
shard shapes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from kernels.cuda import compile_source, cupy_stream, device_ptr, import_cupy

SOURCE = Path(__file__).with_name("cuda") / "paged_attention.cu"
THREADS = 128          # PA_THREADS in the .cu
MAX_DIM = 256          # PA_MAX_DIM
STATIC_SHARED = 48 << 10   # dynamic shared memory above this needs the function attribute raised
_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

ENABLED = True


@functools.cache
def _cupy_works() -> bool:
    try:
        import_cupy()
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception:
        return False
    return True


def supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """The kernel can serve a pool of ``dtype`` with ``head_dim`` on ``device``."""
    return (ENABLED and torch.device(device).type == "cuda" and dtype in _NAMES
            and head_dim % 32 == 0 and head_dim <= MAX_DIM and _cupy_works())


def _function(index: int, dtype: torch.dtype):
    module = compile_source(index, SOURCE, ("--std=c++17", "-DPA_ONLY", f"-DPA_TNAME={_NAMES[dtype]}"))
    return module.get_function(f"paged_decode_{_NAMES[dtype]}")


def paged_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, heads, dim]`` in the pool's dtype: each row's query ``q [rows, heads, dim]``
    (fp32, already scaled by ``1/sqrt(dim)``) over its first ``lens[row]`` cached tokens, found
    through ``tables [rows, max_blocks]`` (int64) in one layer of the pool, ``keys``/``values``
    ``[heads, slots, dim]``. A row of length 0 gives zeros. Launches on torch's current
    stream (so it can be captured in a CUDA graph)."""
    rows, heads, dim = q.shape
    if keys.shape[0] != heads or keys.shape[2] != dim or values.shape != keys.shape:
        raise ValueError(f"queries {tuple(q.shape)} do not match the pool's layer {tuple(keys.shape)}")
    if q.dtype != torch.float32 or tables.dtype != torch.long or lens.dtype != torch.long:
        raise ValueError("paged_decode takes fp32 queries and int64 tables and lengths")
    if tables.shape[0] != rows or lens.shape != (rows,):
        raise ValueError(f"tables {tuple(tables.shape)} / lengths {tuple(lens.shape)} for {rows} rows")
    for t in (q, keys, values, tables, lens):
        if not t.is_contiguous() or t.device != keys.device:
            raise ValueError("paged_decode needs contiguous tensors on the pool's device")
    if out is None:
        out = torch.empty((rows, heads, dim), dtype=keys.dtype, device=keys.device)
    if rows == 0:
        return out
    max_blocks = tables.shape[1]
    shared = max_blocks * block_size * 4
    index = keys.device.index if keys.device.index is not None else torch.cuda.current_device()
    fn = _function(index, keys.dtype)
    if shared > STATIC_SHARED and fn.max_dynamic_shared_size_bytes < shared:
        fn.max_dynamic_shared_size_bytes = shared      # raises past the device's limit
    cupy = import_cupy()
    with cupy.cuda.Device(index), cupy_stream(index):
        fn((heads, rows), (THREADS,),
           (device_ptr(q), device_ptr(keys), device_ptr(values), device_ptr(tables), device_ptr(lens),
            device_ptr(out), np.int32(heads), np.int32(dim), np.int32(block_size), np.int32(max_blocks),
            np.int64(keys.shape[1])),
           shared_mem=shared)
    return out
