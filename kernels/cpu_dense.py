"""CPU dense linears: `x @ W.T (+ b)` with the weight held in a layout chosen once, at prepare time.

The same `[out, in]` weight can be held three ways; which one is fastest depends on the dtype and
the CPU (measured with `glm bench gemv`, docs/benchmarks.md "GEMV at batch 1"):

  * "linear": the checkpoint's `[out, in]` rows as they are, `F.linear` (ATen: MKL for fp32,
    oneDNN with a per-call weight reorder for bf16);
  * "transposed": a contiguous `[in, out]` copy, `x @ Wt` (MKL's non-transposed GEMM);
  * "packed": oneDNN's blocked layout for this ISA (`torch.ops.mkldnn._reorder_linear_weight`;
    `AB16b64a2b` for bf16 on AVX-512-BF16), run by oneDNN's brgemm inner product
    (`torch.ops.mkldnn._linear_pointwise`) with the bias fused. The layout serves every row count:
    oneDNN runs a 512-row prefill on it without reordering.

A linear of fewer than `SERIAL_MACS` multiply-adds (rows × out × in) runs on one thread.

`choose_layout` is the rule: "packed" for bf16 where oneDNN reports native bf16 (AVX-512-BF16 or
AMX), "transposed" for fp32 (MKL on either CPU family), "linear" otherwise (bf16 on AVX2-only
CPUs, where oneDNN would emulate bf16; fp16). The rule is verified by measurement on the CPUs named
in docs/benchmarks.md; `prepare_dense` also checks the op against `F.linear` on the real weight once
and falls back to "linear" if oneDNN is missing or disagrees.

A "transposed" op's `[in, out]` copy can take the place of the caller's weight: `op.weight.t()` is
the same `[out, in]` matrix stored column-major, so a module may keep that view as its parameter
(state dict, embedding lookups) and hold one copy only. A "packed" copy is opaque to torch;
`op.dense_weight()` rebuilds the plain `[out, in]` matrix from it when asked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import threads

LAYOUTS = ("linear", "transposed", "packed")
# Multiply-adds below which a linear runs on one thread: a sleeping OpenMP thread (the workers'
# OMP_WAIT_POLICY=PASSIVE) takes ~100 us to wake, more than a second thread saves on such a
# product (docs/benchmarks.md, "Threads").
SERIAL_MACS = 16_000_000


def native_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX-512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_layout(dtype: torch.dtype) -> str:
    """The layout `prepare_dense` uses for weights of `dtype` on this CPU."""
    if dtype == torch.float32:
        return "transposed"
    return "packed" if dtype == torch.bfloat16 and native_bf16() else "linear"


class CpuDenseLinear:
    """`op(x) = x @ W.T + b` on CPU for a dense `[out, in]` weight held in `layout`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, layout: str = "linear"):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown dense layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        if weight.dim() != 2:
            raise ValueError(f"a linear weight is 2-D [out, in], got shape {tuple(weight.shape)}")
        self.layout = layout
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = bias
        if layout == "packed":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
        elif layout == "transposed":
            self.weight = weight.detach().t().contiguous()  # [in, out]
        else:
            self.weight = weight

    @property
    def nbytes(self) -> int:
        """Bytes of the weight copy this op holds (0 for "linear", which uses the caller's)."""
        if self.layout == "linear":
            return 0
        if self.layout == "packed":
            return int(torch.ops.mkldnn._nbytes(self.weight))
        return self.weight.numel() * self.weight.element_size()

    def dense_weight(self) -> torch.Tensor:
        """The plain `[out, in]` weight (a view for "linear"/"transposed", rebuilt for "packed")."""
        if self.layout == "packed":
            return self.weight.to_dense()
        return self.weight.t() if self.layout == "transposed" else self.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() * self.out_features < SERIAL_MACS:
            with threads.serial():             # waking a second thread costs more than it saves
                return self._apply(x)
        with threads.parallel():               # every thread, inside a serial forward too
            return self._apply(x)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "linear":
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)
        if self.layout == "packed":
            y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.weight, self.bias, "none", [], "")
        else:
            y = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return y.reshape(*x.shape[:-1], self.out_features)


def prepare_dense(weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  layout: str | None = None) -> CpuDenseLinear:
    """The op for `weight` in `layout` (default: `choose_layout`), checked once against `F.linear`.

    A packed op that oneDNN cannot build, or whose output differs from `F.linear` beyond a few
    roundings, falls back to "linear" (the checkpoint's layout, no copy).
    """
    layout = layout or choose_layout(weight.dtype)
    if layout == "linear":
        return CpuDenseLinear(weight, bias, layout="linear")
    try:
        op = CpuDenseLinear(weight, bias, layout=layout)
        probe = torch.randn(2, op.in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        got, want = op(probe).float(), F.linear(probe, weight, bias).float()
    except RuntimeError:
        return CpuDenseLinear(weight, bias, layout="linear")
    tolerance = 1e-2 if weight.dtype in (torch.bfloat16, torch.float16) else 1e-4
    if (got - want).abs().max().item() > tolerance * max(want.abs().max().item(), 1e-6):
        return CpuDenseLinear(weight, bias, layout="linear")
    return op
