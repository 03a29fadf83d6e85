"""The CPU ops (torch's weight-only kernels and the dequantize + dense path) equal the reference,
and the dispatcher picks the kernel by the activation's row count."""

import pytest
import torch

import kernels
import kernels.cpu as cpu
from kernels import prepare, quantize, quantized_matmul
from kernels.reference import dequantize

OUT, IN = 96, 512  # N a multiple of 16 (the int4 kernel's packing), K a multiple of 256


def weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g) * 0.02
    w[:, ::97] *= 20  # a few outliers per row
    return w.half()


def reference(x: torch.Tensor, qw) -> torch.Tensor:
    """fp32 x @ W.T with the exactly dequantized W: what every path approximates."""
    return quantized_matmul(x.float(), qw)


def assert_close_bf16(y: torch.Tensor, ref: torch.Tensor) -> None:
    # bf16 has 8 significant bits: allow a few roundings of the output's magnitude
    err = (y.float() - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), f"max error {err} vs output max {ref.abs().max().item()}"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("path", ["kernel", "dense"])
def test_cpu_op_matches_reference(bits, group_size, rows, path):
    qw = quantize(weight(bits + rows), bits, group_size)
    op = cpu.CpuQuantizedLinear(qw, kernel_max_rows=1 << 30 if path == "kernel" else 0)
    x = torch.randn(rows, IN).to(torch.bfloat16)
    y = op(x)
    assert y.shape == (rows, OUT) and y.dtype == torch.bfloat16
    assert_close_bf16(y, reference(x, qw))
    if path == "dense":  # the reference semantics, computed in BF16_DENSE_COMPUTE then rounded to bf16
        assert torch.equal(y, quantized_matmul(x.to(cpu.BF16_DENSE_COMPUTE), qw).to(torch.bfloat16))


def test_kernels_exist_for_per_row_and_int4_groups_but_not_int8_groups():
    assert cpu.CpuQuantizedLinear(quantize(weight(), 8)).has_kernel
    assert cpu.CpuQuantizedLinear(quantize(weight(), 4)).has_kernel
    assert cpu.CpuQuantizedLinear(quantize(weight(), 4, 128)).has_kernel
    assert not cpu.CpuQuantizedLinear(quantize(weight(), 8, 128)).has_kernel  # no torch kernel
    odd = quantize(torch.randn(24, 256).half(), 4)  # N not a multiple of 16: int4 packing refuses
    assert not cpu.CpuQuantizedLinear(odd).has_kernel


def test_int4_kernel_uses_the_nibble_order():
    # identity activations read the weight back out: catches swapped nibbles or a lost sign
    qw = quantize(weight(5), 4)
    op = cpu.CpuQuantizedLinear(qw, kernel_max_rows=1 << 30)
    w_t = op(torch.eye(IN, dtype=torch.bfloat16))  # [in, out] = W.T
    expected = (dequantize(qw, torch.float32) / qw.scale.float()[:, None]).round()  # the integers
    got = (w_t.t().float() / qw.scale.to(torch.bfloat16).float()[:, None]).round()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_take_the_dense_path_in_their_own_dtype(dtype):
    qw = quantize(weight(6), 8)
    op = prepare(qw, device="cpu", dtype=dtype)
    x = torch.randn(2, 5, IN).to(dtype)
    y = op(x)
    assert y.shape == (2, 5, OUT) and y.dtype == dtype
    assert torch.equal(y, quantized_matmul(x, qw))
    assert op.nbytes == qw.nbytes  # nothing repacked


def test_dispatch_by_rows(monkeypatch):
    calls = []

    def spy(qw, dtype=torch.float16):
        calls.append(dtype)
        return dequantize(qw, dtype)

    monkeypatch.setattr(cpu, "dequantize", spy)
    op = prepare(quantize(weight(7), 8), device="cpu", dtype=torch.bfloat16)
    limit = cpu.KERNEL_MAX_ROWS
    assert op.kernel_max_rows == limit and op.uses_kernel(limit, torch.bfloat16)
    assert not op.uses_kernel(limit + 1, torch.bfloat16)
    assert not op.uses_kernel(1, torch.float32)
    op(torch.randn(1, 1, IN, dtype=torch.bfloat16))  # rows counted after flattening: 1
    assert calls == []
    op(torch.randn(limit + 1, IN, dtype=torch.bfloat16))
    assert calls == [cpu.BF16_DENSE_COMPUTE]


def test_prepare_exposes_the_canonical_weight_and_its_memory():
    for bits in (8, 4):
        qw = quantize(weight(8), bits)
        op = kernels.prepare(qw, device=torch.device("cpu"), dtype=torch.bfloat16)
        assert op.qw is qw
        assert op.nbytes >= qw.nbytes
    op8 = kernels.prepare(quantize(weight(8), 8), device="cpu", dtype=torch.bfloat16)
    assert op8.nbytes == op8.qw.nbytes + OUT * 2  # int8 values shared with the kernel; bf16 scales added


def test_prepare_rejects_unknown_devices():
    with pytest.raises(ValueError):
        prepare(quantize(weight(), 8), device="meta", dtype=torch.bfloat16)
