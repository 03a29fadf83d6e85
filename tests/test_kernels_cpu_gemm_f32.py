"""The fp32 GEMM of the tied LM head (``kernels.cpu_gemm_f32``): on a CPU with AVX2 and FMA it
equals ``F.linear`` to fp32 rounding for any row count, weight shape and leading dims; a row's
logits are the same bits whatever batch it is in; the head takes it (its micro-panel copy beside
the row-major embedding) when it is chosen, and keeps MKL over a column-major embedding when not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_gemm_f32

needs_kernel = pytest.mark.skipif(cpu_gemm_f32.kernel() is None, reason="this CPU has no AVX2/FMA (or no C compiler)")


@needs_kernel
@pytest.mark.parametrize("rows,n,k", [(1, 1000, 256), (5, 1003, 256), (13, 77, 64), (32, 517, 96), (2, 9, 8),
                                      (7, 400, 700), (2, 5, 3), (33, 192, 512)])
def test_the_gemm_equals_f_linear(rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    w, x = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)
    op = cpu_gemm_f32.Panels(w)
    got = op(x)
    want = F.linear(x.double(), w.double())
    assert got.dtype == torch.float32 and got.shape == (rows, n) and got.is_contiguous()
    assert (got.double() - want).abs().max().item() <= 1e-6 * k * want.abs().max().item()
    lead = op(x.view(rows, 1, k))
    assert lead.shape == (rows, 1, n) and torch.equal(lead.view(rows, n), got)
    assert op(x[:0]).shape == (0, n)
    assert op.nbytes == -(-n // cpu_gemm_f32.NR) * cpu_gemm_f32.NR * k * 4


@needs_kernel
def test_a_rows_logits_do_not_depend_on_its_batch():
    gen = torch.Generator().manual_seed(3)
    op = cpu_gemm_f32.Panels(torch.randn(2000, 256, generator=gen))
    x = torch.randn(11, 256, generator=gen)
    batch = op(x)
    for row in range(11):
        assert torch.equal(op(x[row:row + 1])[0], batch[row])
        assert torch.equal(op(x[row:])[0], batch[row])


def test_it_serves_only_fp32_cpu_weights():
    assert not cpu_gemm_f32.supports(torch.zeros(16, 16, dtype=torch.bfloat16))
    assert not cpu_gemm_f32.supports(torch.zeros(16))
    assert cpu_gemm_f32.supports(torch.zeros(16, 12)) == (cpu_gemm_f32.kernel() is not None)


def _tiny_fp32_embedding(monkeypatch, choice: str):
    from model.config import GLMConfig
    from model.glm import GLMModel

    monkeypatch.setattr(cpu_gemm_f32, "CHOICE", choice)
    model = GLMModel(GLMConfig.from_name("glm-tiny"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():                        # the constructor leaves the weights uninitialised
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    plain = model.transformer.word_embeddings.weight.detach().clone()
    return plain, model.eval().prepare().transformer.word_embeddings


@pytest.mark.parametrize("choice", ["on", "off"])
def test_the_head_takes_the_kernel_only_when_chosen(monkeypatch, choice):
    plain, embedding = _tiny_fp32_embedding(monkeypatch, choice)
    chosen = choice == "on" and cpu_gemm_f32.kernel() is not None
    assert (embedding.head.layout == "panels") == chosen
    assert embedding.weight.is_contiguous() == chosen         # else column-major for MKL
    assert embedding.head_nbytes == (embedding.head.nbytes if chosen else 0)
    assert torch.equal(embedding.weight, plain)               # the same values either way
    hidden = torch.randn(3, 1, plain.shape[1])
    ids = torch.tensor([[1, 7, 300]])
    with torch.inference_mode():
        logits = embedding.logits(hidden)
        assert torch.equal(embedding(ids), F.embedding(ids, plain))
    want = F.linear(hidden.double(), plain.double())
    assert (logits.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
