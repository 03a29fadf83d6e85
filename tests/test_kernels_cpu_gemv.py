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


@needs_bf16_gemv
def test_small_packed_layer_linears_take_it_at_their_measured_rows(monkeypatch):
    """A packed bf16 linear of at most GEMV_MAX_BYTES keeps its plain rows and takes the kernel
    at one or two rows (the column-parallel bias added after it), oneDNN's packed op above; a
    larger one keeps the packed copy only; the state dict holds the plain weight either way."""
    from kernels import cpu_dense
    from model import parallel
    from model.parallel import ColumnParallelLinear, ParallelContext, RowParallelLinear

    if not cpu_dense.native_bf16():
        pytest.skip("no native bf16 in oneDNN: the layers are not packed here")
    monkeypatch.setattr(cpu_gemv, "CHOICE", "on")
    gen = torch.Generator().manual_seed(4)
    calls = []
    real = cpu_gemv.matmul_t
    monkeypatch.setattr(cpu_gemv, "matmul_t", lambda x, w: calls.append(x.reshape(-1, x.shape[-1]).shape[0])
                        or real(x, w))
    for cls in (ColumnParallelLinear, RowParallelLinear):
        layer = cls(256, 384, ParallelContext(), dtype=torch.bfloat16, what="test")
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        layer.prepare()
        assert layer.gemv_rows == 2 and layer.gemv_weight is not None
        assert torch.equal(layer.state_dict()["weight"], w)
        calls.clear()
        with torch.inference_mode():
            for rows in (1, 2, 3):
                x = torch.randn(1, rows, 256, generator=gen).bfloat16()
                got = layer(x)
                want = F.linear(x.float(), w.float(), b.float())
                err = (got.float() - want).abs()
                assert torch.all(err <= 3 * torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-2) + 1e-3), err.max()
        assert calls == [1, 2]
    monkeypatch.setattr(parallel, "GEMV_MAX_BYTES", 1000)
    big = ColumnParallelLinear(256, 384, ParallelContext(), dtype=torch.bfloat16, what="test")
    with torch.no_grad():
        for p in big.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    big.prepare()
    assert big.gemv_rows == 0 and big.gemv_weight is None
