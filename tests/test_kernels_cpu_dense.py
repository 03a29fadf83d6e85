"""The CPU dense layouts compute `F.linear`, the model's prepared layouts change no logits beyond
a rounding, and a prepared model's state dict still holds the plain checkpoint weights."""

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu_dense import LAYOUTS, CpuDenseLinear, choose_layout, native_bf16, prepare_dense
from model.checkpoint import inspect_checkpoint, read_rank_state
from model.glm import GLMModel
from model.runner import load_model

OUT, IN = 96, 160


def weight(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(OUT, IN, generator=g) * 0.05).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, IN), (3, 7, IN), (600, IN)])  # decode, 3-D, prefill rows
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_layout_computes_f_linear(dtype, layout, shape, with_bias):
    w = weight(dtype)
    b = torch.randn(OUT).to(dtype) if with_bias else None
    x = torch.randn(*shape).to(dtype)
    if layout == "packed" and dtype == torch.bfloat16 and not native_bf16():
        # oneDNN has no bf16 reorder below AVX-512 (an AVX2-only CPU): the op cannot be built,
        # and prepare_dense falls back to the checkpoint's layout.
        with pytest.raises(RuntimeError, match="bf16"):
            CpuDenseLinear(w, b, layout=layout)
        assert prepare_dense(w, b, layout=layout).layout == "linear"
        return
    op = CpuDenseLinear(w, b, layout=layout)
    got, want = op(x), F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (*shape[:-1], OUT) and got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (got.float() - want).abs().max().item() <= tol * want.abs().max().item()
    assert torch.equal(op.dense_weight(), w)


def test_the_rule_and_its_fallback():
    assert choose_layout(torch.float32) == "transposed"
    assert choose_layout(torch.bfloat16) == ("packed" if native_bf16() else "linear")
    assert choose_layout(torch.float16) == "linear"
    assert prepare_dense(weight(torch.float32)).layout == "transposed"
    with pytest.raises(ValueError, match="unknown dense layout"):
        CpuDenseLinear(weight(torch.float32), layout="columns")


def test_transposed_copy_is_the_same_matrix_column_major():
    w = weight(torch.float32)
    op = CpuDenseLinear(w, layout="transposed")
    assert op.weight.is_contiguous() and op.weight.shape == (IN, OUT)
    assert op.dense_weight().data_ptr() == op.weight.data_ptr() and torch.equal(op.dense_weight(), w)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepared_model_keeps_logits_and_state(checkpoint, dtype):
    ckpt = checkpoint("glm-tiny", tp=1, seed=5)
    prepared = load_model(ckpt, dtype=getattr(torch, dtype))  # load_model prepares
    info = inspect_checkpoint(ckpt)
    plain = GLMModel(info.config, dtype=getattr(torch, dtype)).eval()  # never prepared: F.linear
    plain.load_state_dict(read_rank_state(info, 1, 0, dtype=getattr(torch, dtype)))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    for k, v in prepared.state_dict().items():  # the packed linears' plain weights come back
        assert torch.equal(v, state[k]), k
    assert prepared.state_dict().keys() == state.keys()
    embedding = prepared.transformer.word_embeddings
    expected = "packed" if dtype == "bfloat16" and native_bf16() else choose_layout(getattr(torch, dtype))
    if embedding.head.layout == "panels":     # the fp32 head's C kernel (kernels.cpu_gemm_f32)
        expected = "panels"
        assert dtype == "float32" and embedding.weight.is_contiguous()
    assert embedding.head.layout == expected
    assert embedding.head_nbytes == {"packed": embedding.weight.numel() * 2,
                                     "panels": embedding.head.nbytes}.get(expected, 0)
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    pos = torch.arange(5)[None]
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    a, b = prepared(ids, pos, mask), plain(ids, pos, mask)
    tol = 2e-2 if dtype == "bfloat16" else 1e-5
    assert (a - b).abs().max().item() <= tol * b.abs().max().item()


def test_a_small_linear_runs_on_one_thread_and_restores_the_count(monkeypatch):
    """Below SERIAL_MACS the op sets one thread for its call and gives the count back, also
    when the call raises; above it the count is left alone."""
    import kernels.cpu_dense as cd

    seen = []
    op = cd.CpuDenseLinear(torch.randn(8, 16), layout="transposed")
    monkeypatch.setattr(op, "_apply", lambda x: seen.append(torch.get_num_threads()) or x @ op.weight)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        op(torch.randn(1, 16))
        monkeypatch.setattr(cd, "SERIAL_MACS", 0)
        op(torch.randn(1, 16))
        assert seen == [1, 2] and torch.get_num_threads() == 2
        monkeypatch.setattr(cd, "SERIAL_MACS", 10**9)
        monkeypatch.setattr(op, "_apply", lambda x: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            op(torch.randn(1, 16))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
