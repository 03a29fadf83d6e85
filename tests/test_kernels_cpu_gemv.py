"""The bf16 GEMV of the tied LM head (``kernels.cpu_gemv``): on a CPU with AVX-512-BF16 it equals
``F.linear`` to one bf16 rounding (fp32 accumulation in another order), for any row count and
leading dims, and the head takes it at one or two rows only; elsewhere it says it is not there
and the head keeps its dense op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_gemv

needs_bf16_gemv = pytest.mark.skipif(cpu_gemv.kernel() is None, reason="this CPU has no AVX-512-BF16 (or no C compiler)")


def within_one_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.float(), want.float()
    ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-3)
    assert torch.all((got - want).abs() <= 2 * ulp + 1e-6), (got - want).abs().max()


@needs_bf16_gemv
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_the_gemv_equals_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(1000, 256, generator=gen).bfloat16()
    x = torch.randn(rows, 256, generator=gen).bfloat16()
    got = cpu_gemv.matmul_t(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1000)
    within_one_rounding(got, F.linear(x.float(), w.float()))
    lead = cpu_gemv.matmul_t(x.view(rows, 1, 256), w)
    assert lead.shape == (rows, 1, 1000) and torch.equal(lead.view(rows, 1000), got)
    assert cpu_gemv.matmul_t(x[:0], w).shape == (0, 1000)


def _tiny_bf16_head(monkeypatch, choice: str):
    from model.config import GLMConfig
    from model.glm import GLMModel

    monkeypatch.setattr(cpu_gemv, "CHOICE", choice)
    model = GLMModel(GLMConfig.from_name("glm-tiny"), dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():                        # the constructor leaves the weights uninitialised
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, model.eval().prepare().transformer.word_embeddings


def _kernel_rows(monkeypatch, embedding, hidden: int) -> list[int]:
    """The row counts (of 1, 2, 3) at which the head called the kernel."""
    calls = []
    real = cpu_gemv.matmul_t
    monkeypatch.setattr(cpu_gemv, "matmul_t", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    h = torch.randn(3, 1, hidden).bfloat16()
    with torch.inference_mode():
        one, three = embedding.logits(h[:1]), embedding.logits(h)
        embedding.logits(h[:2])
    within_one_rounding(one, three[:1])
    return sorted(calls)


@needs_bf16_gemv
def test_the_head_takes_it_where_it_was_measured_faster(monkeypatch):
    model, embedding = _tiny_bf16_head(monkeypatch, "on")
    assert cpu_gemv.supports(embedding.weight) and embedding.gemv_rows == cpu_gemv.MAX_ROWS == 2
    assert _kernel_rows(monkeypatch, embedding, model.config.hidden_size) == [1, 2]
    embedding.gemv_rows = 1                                   # measured faster at one row only
    assert _kernel_rows(monkeypatch, embedding, model.config.hidden_size) == [1]
    model, embedding = _tiny_bf16_head(monkeypatch, "off")
    assert embedding.gemv_rows == 0 and _kernel_rows(monkeypatch, embedding, model.config.hidden_size) == []
    model, embedding = _tiny_bf16_head(monkeypatch, "auto")   # timed here: any answer in range
    assert 0 <= embedding.gemv_rows <= cpu_gemv.MAX_ROWS


def test_unsupported_weights_are_refused():
    assert not cpu_gemv.supports(torch.randn(64, 256))                      # fp32
    assert not cpu_gemv.supports(torch.randn(64, 48).bfloat16())            # k not a multiple of 32
    assert not cpu_gemv.supports(torch.randn(256, 64).bfloat16().t())       # not contiguous
