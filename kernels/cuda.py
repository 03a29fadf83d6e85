"""CUDA path for weight-only INT8/INT4 linears: fused dequantize-GEMV for decode,
dequantize into a workspace + cuBLAS (torch.matmul) for prefill.

The kernels are `kernels/cuda/quant_gemv.cu`, compiled at run time with NVRTC
through cupy for the GPU actually present (cupy picks `-arch=sm_<major><minor>` of
the current device; modules are cached per (device, arch, variant)). Nothing
happens at import time: cupy is imported, and code compiled, on first use.
Needs `pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12`. The kernels include no
CUDA headers, so no CUDA toolkit is needed on the serving machine.

`kernels.reference` defines the result (`quantized_matmul(x, qw)`);
tests/test_kernels_cuda.py and bench/gpu_check.py pin this path to it.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import torch

from kernels.reference import QuantizedWeight, dequantize

SOURCE = Path(__file__).with_name("cuda") / "quant_gemv.cu"
GEMV_MAX_ROWS = 8  # activation rows up to which the fused GEMV is used
DEFAULT_ROWS_PER_BLOCK = 4  # output rows per GEMV block (R in the .cu)
DEFAULT_GEMV_THREADS = 128
DEQUANT_THREADS = 256
_DTYPE_NAMES = {torch.float16: ("f16", "qg::F16"), torch.bfloat16: ("bf16", "qg::BF16")}

_lock = threading.Lock()
_modules: dict[tuple, object] = {}  # (device index, arch, source, options) -> cupy.RawModule
_streams: dict[tuple[int, int], object] = {}  # (device index, stream ptr) -> cupy stream
_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(
            "the CUDA kernels need cupy and NVRTC: "
            "install cupy-cuda12x (pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12)"
        ) from e
    return cupy


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled family of kernels: activation dtype, weight bits, scale scheme."""

    dtype: torch.dtype
    bits: int
    grouped: bool
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK

    @property
    def stem(self) -> str:
        return f"{_DTYPE_NAMES[self.dtype][0]}_w{self.bits}_{'grp' if self.grouped else 'row'}"

    def gemv_name(self, m: int) -> str:
        return f"qgemv_{self.stem}_m{m}_r{self.rows_per_block}"

    def dequant_name(self) -> str:
        return f"qdequant_{self.stem}"

    def defines(self) -> tuple[str, ...]:
        name, tag = _DTYPE_NAMES[self.dtype]
        return (
            "-DQG_ONLY",
            f"-DQG_TNAME={name}",
            f"-DQG_TAG={tag}",
            f"-DQG_BITS={self.bits}",
            f"-DQG_SCHEME={'grp' if self.grouped else 'row'}",
            f"-DQG_GROUPED={int(self.grouped)}",
            f"-DQG_ROWS={self.rows_per_block}",
        )


def compile_source(index: int, source: Path, options: tuple[str, ...]):
    """The cupy.RawModule of ``source`` built with ``options`` for device ``index``, compiled
    once per (device, arch, source, options)."""
    cupy = import_cupy()
    arch = "%d%d" % torch.cuda.get_device_capability(index)
    key = (index, arch, source.name, options)
    with _lock:
        module = _modules.get(key)
        if module is None:
            with cupy.cuda.Device(index):  # cupy adds -arch=sm_<arch> of this device
                module = cupy.RawModule(code=source.read_text(), options=options)
                module.compile()  # surface compile errors here, not at first launch
            _modules[key] = module
    return module


def compile_module(device: torch.device, variant: Variant):
    """The cupy.RawModule for `variant` on `device`, compiled once per (device, arch)."""
    return compile_source(torch.device(device).index or 0, SOURCE, ("--std=c++17", *variant.defines()))


def cupy_stream(index: int):
    """torch's current stream on device `index`, as a cupy stream (cached)."""
    cupy = import_cupy()
    ptr = torch.cuda.current_stream(index).cuda_stream
    stream = _streams.get((index, ptr))
    if stream is None:
        stream = _streams[(index, ptr)] = cupy.cuda.ExternalStream(ptr, index)
    return stream


def _workspace(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat buffer shared by every op on (device, dtype); grows to the largest weight.

    Safe because the dequantize kernel and the matmul that reads it are queued on
    the same (current) stream; do not run ops on one device from two streams at once.
    """
    buf = _workspaces.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = _workspaces[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def device_ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


class CudaQuantLinear:
    """`op(x) = x @ W^T` for x `[..., in]` fp16/bf16 on one CUDA device -> `[..., out]`."""

    def __init__(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype,
                 rows_per_block: int = DEFAULT_ROWS_PER_BLOCK,
                 gemv_threads: int = DEFAULT_GEMV_THREADS):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"activations must be float16 or bfloat16, got {dtype}")
        if qw.bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {qw.bits}")
        if gemv_threads % 32 or not 32 <= gemv_threads <= 128:
            raise ValueError("gemv_threads must be a multiple of 32 in [32, 128]")
        self.device = torch.device(device)
        self.dtype = dtype
        self.qw = QuantizedWeight(
            values=qw.values.to(self.device, torch.int8).contiguous(),
            scale=qw.scale.to(self.device, torch.float16).contiguous(),
            bits=qw.bits,
            in_features=qw.in_features,
            group_size=qw.group_size,
        )
        self.in_features = qw.in_features
        self.out_features = qw.values.shape[0]
        self.variant = Variant(dtype, qw.bits, qw.group_size is not None, rows_per_block)
        self.gemv_threads = gemv_threads
        self.vectorized = self._vectorizable()
        self._module = compile_module(self.device, self.variant) if self.vectorized else None

    @property
    def nbytes(self) -> int:
        """Device bytes held: packed values plus scales."""
        return self.qw.values.nbytes + self.qw.scale.nbytes

    def _vectorizable(self) -> bool:
        """The kernels' preconditions (see quant_gemv.cu); else the torch fallback runs."""
        per_chunk = 128 // self.qw.bits  # weights per 16-byte load
        k, g = self.in_features, self.qw.group_size
        aligned = self.qw.values.data_ptr() % 16 == 0
        return aligned and k % per_chunk == 0 and (g is None or (g % per_chunk == 0 and k % g == 0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"expected {self.dtype} on {self.device}, got {x.dtype} on {x.device}")
        lead, k, n = x.shape[:-1], self.in_features, self.out_features
        x2 = x.reshape(-1, k)  # [M, K]
        if not x2.is_contiguous() or x2.data_ptr() % 16:
            x2 = x2.clone(memory_format=torch.contiguous_format)
        m = x2.shape[0]
        if m == 0:
            return x.new_empty(*lead, n)
        if self.vectorized and m <= GEMV_MAX_ROWS:
            y = self.gemv(x2)
        else:
            y = torch.matmul(x2, self.dequantize().t())  # cuBLAS
        return y.reshape(*lead, n)

    def gemv(self, x2: torch.Tensor) -> torch.Tensor:
        """Fused dequantize-GEMV: x2 `[M, K]` (M <= 8, contiguous) -> `[M, N]`."""
        m, n = x2.shape[0], self.out_features
        y = torch.empty(m, n, dtype=self.dtype, device=self.device)
        chunks = self.in_features * self.qw.bits // 128
        threads = min(self.gemv_threads, max(32, -(-chunks // 32) * 32))
        grid = -(-n // self.variant.rows_per_block)
        fn = self._module.get_function(self.variant.gemv_name(m))
        self._launch(fn, grid, threads, (device_ptr(x2), device_ptr(self.qw.values),
                                         device_ptr(self.qw.scale), device_ptr(y),
                                         np.int32(n), np.int32(self.in_features),
                                         np.int32(self.qw.group_size or 0)))
        return y

    def dequantize(self) -> torch.Tensor:
        """W as `[N, K]` in self.dtype, in the shared workspace (valid until the next op)."""
        if not self.vectorized:
            return dequantize(self.qw, self.dtype)
        n, k = self.out_features, self.in_features
        out = _workspace(self.device, self.dtype, n * k).view(n, k)
        total = n * k * self.qw.bits // 128
        grid = min(-(-total // DEQUANT_THREADS), 1 << 20)
        fn = self._module.get_function(self.variant.dequant_name())
        self._launch(fn, grid, DEQUANT_THREADS, (device_ptr(self.qw.values), device_ptr(self.qw.scale),
                                                 device_ptr(out), np.int32(n), np.int32(k),
                                                 np.int32(self.qw.group_size or 0)))
        return out

    def _launch(self, fn, grid: int, block: int, args: tuple) -> None:
        cupy = import_cupy()
        index = self.device.index or 0
        with cupy.cuda.Device(index), cupy_stream(index):
            fn((grid,), (block,), args)


def prepare_cuda(qw: QuantizedWeight, device: torch.device | str, dtype: torch.dtype,
                 **tuning) -> CudaQuantLinear:
    """Move `qw` to `device` once and return `op` with `op(x) == x @ dequantize(qw).T`.

    Rows M <= GEMV_MAX_ROWS use the fused GEMV; larger M dequantizes into a shared
    workspace and calls torch.matmul. `tuning`: rows_per_block, gemv_threads.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"prepare_cuda needs a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return CudaQuantLinear(qw, device, dtype, **tuning)
