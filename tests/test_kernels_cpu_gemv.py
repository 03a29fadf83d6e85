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


@needs_bf16_gemv
def test_the_head_takes_it_at_one_or_two_rows(monkeypatch):
    from model.config import GLMConfig
    from model.glm import GLMModel

    model = GLMModel(GLMConfig.from_name("glm-tiny"), dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():                        # the constructor leaves the weights uninitialised
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model = model.eval().prepare()
    embedding = model.transformer.word_embeddings
    assert cpu_gemv.supports(embedding.weight)
    calls = []
    real = cpu_gemv.matmul_t
    monkeypatch.setattr(cpu_gemv, "matmul_t", lambda x, w: calls.append(x.shape) or real(x, w))
    h = torch.randn(3, 1, model.config.hidden_size).bfloat16()
    with torch.inference_mode():
        one, three = embedding.logits(h[:1]), embedding.logits(h)
        embedding.logits(h[:2])
    assert calls == [(1, 1, model.config.hidden_size), (2, 1, model.config.hidden_size)]
    within_one_rounding(one, three[:1])


def test_unsupported_weights_are_refused():
    assert not cpu_gemv.supports(torch.randn(64, 256))                      # fp32
    assert not cpu_gemv.supports(torch.randn(64, 48).bfloat16())            # k not a multiple of 32
    assert not cpu_gemv.supports(torch.randn(256, 64).bfloat16().t())       # not contiguous
