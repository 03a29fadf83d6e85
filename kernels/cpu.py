"""CPU fast path: torch's weight-only INT8/INT4 matmuls for bf16 activations, dense otherwise.

torch ships two weight-only kernels:
  * `aten._weight_int8pack_mm(A [M,K], int8 [N,K], scales [N])`, scales in A's dtype;
  * `aten._weight_int4pack_mm_for_cpu(A [M,K], packed, g, qScaleAndZeros [K/g,N,2])` on weights
    repacked by `aten._convert_weight_to_int4pack_for_cpu(int32 [N,K] in 0..15, 2)`, computing
    `w = (u - 8) * scale + zero`; we pass `u = q + 8` and `zero = 0`.
Weights are repacked once, in `prepare_cpu`; the hot path only calls the kernel.

Only bf16 activations are fast in these kernels (fp16/fp32 are scalar loops), and even then they
lose to a dense matmul once the activation has enough rows. So an op dispatches on the row count
M of the 2-D-flattened activation: `M <= KERNEL_MAX_ROWS` and bf16 -> kernel; otherwise
dequantize (per call, like the official W8A16Linear, so no dense copy stays resident) and run a
dense matmul. The dense matmul for bf16 activations runs in `BF16_DENSE_COMPUTE` (see below);
fp16/fp32 activations run it in their own dtype, exactly `reference.quantized_matmul`.

Precision: the kernels take their scales in bf16, so the official fp16 scale is rounded to bf16
(relative error <= 2**-9 per row or group), the size of one bf16 rounding of the output itself.
Group-wise INT8 has no torch kernel and always takes the dense path.
"""

import torch

from kernels import cpu_int4
from kernels.cpu_dense import native_bf16
from kernels.reference import QuantizedWeight, dequantize, int_values

# Largest activation row count that uses the weight-only kernel (bf16 activations only).
# Measured with `python bench/quant_matmul.py` (threshold sweep, qkv shard [4608, 12288]) on this
# project's 2-core AMD EPYC (AVX2, no avx512/AMX), torch 2.13.0+cpu, 2 threads; median ms,
# kernel vs dequantize + dense: INT8 M=256 816 vs 1056, M=512 1626 vs 1435; INT4 M=256 396 vs
# 1058, M=512 1745 vs 1208 (docs/quantization.md). The kernel wins up to 256 rows, loses at 512.
KERNEL_MAX_ROWS = 256

# Dtype of the dense matmul for bf16 activations above the threshold: bf16 where oneDNN runs bf16
# natively (AVX-512-BF16 or AMX), fp32 elsewhere. On the AVX2-only 2-core EPYC above there is no
# native bf16 GEMM: dense bf16 cost ~11 ms per row on the qkv shard, dense fp32 (dequantized to fp32)
# ~2 ms per row, so fp32 is the choice there. On the Zen 5 with AVX-512-BF16 (`glm bench gemv`,
# docs/benchmarks.md "GEMV at batch 1"), qkv shard [4608, 12288], best ms over interleaved calls,
# kernel / dequantize+bf16 / dequantize+fp32: INT8 M=256 138 / 244 / 339, M=512 273 / 279 / 499;
# INT4 M=512 320 / 444 / 663: bf16 beats fp32 by ~1.5x, and the kernel still wins at 512 rows here,
# so KERNEL_MAX_ROWS = 256 stays the conservative threshold of both machines. The result is rounded
# back to bf16 either way.
BF16_DENSE_COMPUTE = torch.bfloat16 if native_bf16() else torch.float32



def bf16_dense_compute() -> torch.dtype:
    """Dtype of the dense matmul for bf16 activations above `KERNEL_MAX_ROWS`."""
    return BF16_DENSE_COMPUTE


# torch's int4 kernel accepts these group sizes along K.
_INT4_KERNEL_GROUPS = (256, 128, 64, 32)


def kernel_group(qw: QuantizedWeight) -> int | None:
    """The int4 kernel's group size that reproduces `qw`'s scales, or None if none does."""
    span = qw.in_features if qw.group_size is None else qw.group_size
    return next((g for g in _INT4_KERNEL_GROUPS if span % g == 0), None)


def pack_int8_kernel(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N,K] shared with `qw`, bf16 scales [N]) for `_weight_int8pack_mm`."""
    return qw.values.contiguous(), qw.scale.to(torch.bfloat16)


def pack_int4_kernel(qw: QuantizedWeight, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], bf16 qScaleAndZeros [K/group, N, 2]) for `_weight_int4pack_mm_for_cpu`."""
    n, k = qw.out_features, qw.in_features
    u = int_values(qw).to(torch.int32) + 8  # [N, K] in 1..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
    if qw.group_size is None:
        scale = qw.scale[:, None].expand(n, k // group)  # [N, K/g]: the row scale in every group
    else:
        scale = qw.scale.repeat_interleave(qw.group_size // group, dim=1)  # [N, K/g]
    scale_zeros = torch.zeros(k // group, n, 2, dtype=torch.bfloat16)
    scale_zeros[..., 0] = scale.t().to(torch.bfloat16)
    return packed, scale_zeros


class CpuQuantizedLinear:
    """`op(x) = x @ W.T` for a quantized W on CPU; built once per weight by `prepare_cpu`.

    INT4 at up to `gemv_rows` bf16 rows (measured, `kernels.cpu_int4.rows_faster`; `gemv=False`
    leaves it out) takes `kernels.cpu_int4`, which reads the canonical bytes themselves; more rows
    up to `kernel_max_rows` take torch's kernel, more still the dense path.
    """

    def __init__(self, qw: QuantizedWeight, *, kernel_max_rows: int = KERNEL_MAX_ROWS, repack: bool = True,
                 gemv: bool = True):
        self.qw = qw
        self.kernel_max_rows = kernel_max_rows
        self._int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self._int4: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.gemv_rows = 0                     # rows up to which kernels.cpu_int4 serves the call
        self._gemv_scale: torch.Tensor | None = None
        if not repack:
            pass
        elif qw.bits == 8 and qw.group_size is None:
            self._int8 = pack_int8_kernel(qw)
        elif qw.bits == 4 and (group := kernel_group(qw)) is not None:
            try:
                self._int4 = (*pack_int4_kernel(qw, group), group)
            except RuntimeError:  # shape the kernel rejects (N must be a multiple of 16 on AVX2)
                self._int4 = None
        if repack and gemv and qw.bits == 4:   # kernels.cpu_int4 on the canonical bytes where it wins
            self.gemv_rows = cpu_int4.rows_faster(qw, self._torch_int4 if self._int4 is not None else None)
            self._gemv_scale = cpu_int4.scales(qw) if self.gemv_rows else None

    @property
    def has_kernel(self) -> bool:
        return self._int8 is not None or self._int4 is not None

    @property
    def nbytes(self) -> int:
        """Bytes held: the canonical weight plus any repacked copy (INT8 shares its values; the
        INT4 GEMV reads the canonical bytes and scales themselves)."""
        extra = 0
        if self._int8 is not None:
            extra += self._int8[1].numel() * 2
        if self._int4 is not None:
            extra += self._int4[0].numel() + self._int4[1].numel() * 2
        return self.qw.nbytes + extra

    def uses_kernel(self, rows: int, dtype: torch.dtype) -> bool:
        """True when an activation of `rows` rows in `dtype` goes to the weight-only kernel."""
        return dtype == torch.bfloat16 and rows <= self.kernel_max_rows and self.has_kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.qw.in_features)  # [m, in]; the kernels take 2-D only
        if x.dtype == torch.bfloat16 and x2.shape[0] <= min(self.gemv_rows, self.kernel_max_rows):
            y = cpu_int4.matmul_t(x2, self.qw, self._gemv_scale)
        elif not self.uses_kernel(x2.shape[0], x.dtype):
            y = self._dense(x2)
        elif self._int8 is not None:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), *self._int8)
        else:
            y = self._torch_int4(x2)
        return y.reshape(*x.shape[:-1], self.qw.out_features)

    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        """Dequantize (per call) + dense matmul: ``[m, in] -> [m, out]`` in ``x2``'s dtype."""
        compute = bf16_dense_compute() if x2.dtype == torch.bfloat16 else x2.dtype
        return (x2.to(compute) @ dequantize(self.qw, compute).t()).to(x2.dtype)

    def _torch_int4(self, x2: torch.Tensor) -> torch.Tensor:
        packed, scale_zeros, group = self._int4
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group, scale_zeros)


def prepare_cpu(qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> CpuQuantizedLinear:
    """Build the CPU op for `qw`; repacking for the kernels happens here, once.

    `dtype` is the activation dtype the caller will use; only bf16 benefits from the kernels, so
    for any other dtype nothing is repacked and every call takes the dense path.
    """
    return CpuQuantizedLinear(qw, repack=dtype == torch.bfloat16)
