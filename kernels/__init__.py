"""Quantized matmul and dequantization ops (torch reference, CPU and CUDA paths).

`kernels.reference` defines the canonical format (GLM-130B's official per-row scheme, plus an
optional group-wise one); `prepare` turns a `QuantizedWeight` into an op for a device:

    op = prepare(quantize(w, 8), device=torch.device("cpu"), dtype=torch.bfloat16)
    y = op(x)            # x [..., in] -> [..., out] in x.dtype, y == x @ W.T (no bias)
    op.qw, op.nbytes     # the canonical weight it was built from; the bytes the op holds

The CUDA backend (`kernels.cuda`) is imported only when a CUDA device is asked for.
"""

import torch

from kernels.reference import (
    QuantizedWeight,
    dequantize,
    pack_int4,
    quantize,
    quantized_matmul,
    unpack_int4,
)

__all__ = [
    "QuantizedWeight",
    "dequantize",
    "pack_int4",
    "prepare",
    "quantize",
    "quantized_matmul",
    "unpack_int4",
]


def prepare(qw: QuantizedWeight, *, device: torch.device | str, dtype: torch.dtype):
    """Build the op computing `x @ W.T` for activations of `dtype` on `device`; repacks once."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from kernels.cuda import prepare_cuda
        except ImportError as exc:
            raise RuntimeError(f"CUDA quantized kernels are unavailable (kernels.cuda: {exc})") from exc
        return prepare_cuda(qw, device, dtype)
    if device.type == "cpu":
        from kernels.cpu import prepare_cpu

        return prepare_cpu(qw, dtype)
    raise ValueError(f"no quantized matmul backend for device {device}")
