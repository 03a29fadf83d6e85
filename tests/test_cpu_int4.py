"""The INT4 GEMV (``kernels.cpu_int4``): on a CPU with AVX-512-BF16 it equals the exact product of
the bf16 activation and the dequantized weight to one bf16 rounding of the output, reads the
canonical nibble order and sign (one column at a time it returns ``q * scale`` exactly), for the
official per-row scales and for groups, any row count and any output count; the quantized CPU op
takes it up to its measured row count only; elsewhere it says it is not there."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu as cpu
from kernels import cpu_int4, quantize
from kernels.reference import QuantizedWeight, dequantize, int_values

needs_kernel = pytest.mark.skipif(cpu_int4.kernel() is None, reason="this CPU has no AVX-512-BF16 (or no C compiler)")


def random_int4(out_f: int, in_f: int, group: int | None, seed: int) -> QuantizedWeight:
    """Every byte value, so both nibbles take all of -8..7 (the official quantizer stops at -7)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-128, 128, (out_f, in_f // 2), generator=gen, dtype=torch.int8)
    scale_shape = (out_f,) if group is None else (out_f, in_f // group)
    scale = (torch.rand(scale_shape, generator=gen) * 1e-2 + 1e-4).half()
    return QuantizedWeight(values, scale, 4, in_f, group)


def exact(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    return x.double() @ dequantize(qw, torch.float32).double().t()


def within_one_rounding(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, qw: QuantizedWeight) -> None:
    # one bf16 rounding of the output, plus the fp32 sums of 136 * |x| * scale the kernel subtracts
    ulp = torch.finfo(torch.bfloat16).eps * want.abs()
    smax = qw.scale.double().reshape(qw.out_features, -1).max(1).values
    slack = 2 ** -20 * 136 * x.double().abs().sum(1, keepdim=True) * smax[None, :]
    err = (got.double() - want).abs()
    assert torch.all(err <= ulp + slack), (err - ulp - slack).max()


@needs_kernel
@pytest.mark.parametrize("group", [None, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7])
def test_the_kernel_equals_the_exact_product(group, rows):
    qw = random_int4(8 * 5 + 4 * 1 + 3, 512, group, seed=rows)        # blocks of 8, of 4, and single rows
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(100 + rows)).bfloat16()
    got = cpu_int4.matmul_t(x, qw, cpu_int4.scales(qw))
    assert got.dtype == torch.bfloat16 and got.shape == (rows, qw.out_features)
    within_one_rounding(got, exact(x, qw), x, qw)
    lead = cpu_int4.matmul_t(x.view(rows, 1, 512), qw, cpu_int4.scales(qw))
    assert lead.shape == (rows, 1, qw.out_features) and torch.equal(lead.view(rows, -1), got)
    assert cpu_int4.matmul_t(x[:0], qw, cpu_int4.scales(qw)).shape == (0, qw.out_features)


@needs_kernel
def test_one_column_at_a_time_reads_back_each_nibble_and_its_sign():
    qw = random_int4(24, 128, None, seed=3)
    basis = torch.eye(128, dtype=torch.bfloat16)
    q = int_values(qw).float()                                          # [out, in], -8..7
    for start in range(0, 128, 4):                                      # four columns per call
        got = cpu_int4.matmul_t(basis[start:start + 4], qw, cpu_int4.scales(qw))
        want = (q[:, start:start + 4].t() * qw.scale.float()[None, :]).bfloat16()
        assert torch.equal(got, want)


@needs_kernel
def test_two_threads_give_the_bits_of_one(monkeypatch):
    qw = random_int4(1030, 8192, None, seed=4)                          # 8.4 M weights: two threads
    x = torch.randn(3, 8192, generator=torch.Generator().manual_seed(5)).bfloat16()
    both = cpu_int4.matmul_t(x, qw, cpu_int4.scales(qw))
    monkeypatch.setattr(cpu_int4, "THREAD_WORK", 1 << 40)
    assert torch.equal(cpu_int4.matmul_t(x, qw, cpu_int4.scales(qw)), both)


def test_shapes_it_does_not_serve():
    assert not cpu_int4.supports(random_int4(16, 96, None, 0))          # columns not a multiple of 64
    assert not cpu_int4.supports(random_int4(16, 256, 32, 0))           # groups of 32
    assert not cpu_int4.supports(quantize(torch.randn(16, 256).half(), 8))
    assert cpu_int4.rows_faster(random_int4(16, 96, None, 0), None) == 0


@needs_kernel
@pytest.mark.parametrize("choice", ["on", "off"])
def test_the_quantized_op_takes_it_up_to_its_rows(monkeypatch, choice):
    monkeypatch.setattr(cpu_int4, "CHOICE", choice)
    calls = []
    kernel_call = cpu_int4.matmul_t
    monkeypatch.setattr(cpu_int4, "matmul_t", lambda *a: calls.append(a[0].shape[0]) or kernel_call(*a))
    qw = quantize(torch.randn(96, 512).half(), 4)
    op = cpu.prepare_cpu(qw, torch.bfloat16)
    assert op.gemv_rows == (cpu_int4.MAX_ROWS if choice == "on" else 0)
    for rows in (1, cpu_int4.MAX_ROWS, cpu_int4.MAX_ROWS + 1):
        assert op(torch.randn(rows, 512).bfloat16()).shape == (rows, 96)
    assert calls == ([1, cpu_int4.MAX_ROWS] if choice == "on" else [])
    # kernel_max_rows = 0 (the dense path) leaves every kernel out, this one too
    calls.clear()
    cpu.CpuQuantizedLinear(qw, kernel_max_rows=0)(torch.randn(1, 512).bfloat16())
    assert calls == []
    assert op.nbytes == qw.nbytes + op._int4[0].numel() + op._int4[1].numel() * 2   # no copy of its own
