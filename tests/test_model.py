"""The network against an independent transcription of the official math
(tests/glm_reference.py), one test per detail of docs/model.md that is easy to
get wrong, plus KV-cache decoding against a full recompute."""

from __future__ import annotations

import pytest
import torch

from glm_reference import Variant, forward as reference_forward
from model.checkpoint import inspect_checkpoint, read_rank_state
from model.config import GMASK_ID, MASK_ID, GLMConfig
from model.parallel import ParallelContext
from model.prompt import Blank
from tp_jobs import batch_logits

TOL = 1e-4
MASK_CONTEXT = [20100, 20200, MASK_ID, 20300, 20400, 20002]      # [MASK] in the middle
GMASK_CONTEXT = [20500, 20600, 20700, GMASK_ID]                   # [gMASK] at the end
GENERATED = [20800, 20900, 21000]


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=3)


@pytest.fixture(scope="module")
def state(ckpt):
    return read_rank_state(inspect_checkpoint(ckpt), 1, 0, dtype=torch.float32)


def ours(ckpt, context, generated=GENERATED, **kw):
    return batch_logits(ParallelContext(), ckpt, [(context, generated)], **kw)[0]


def reference(state, context, generated=GENERATED, variant=Variant()):
    blank = Blank.first(context)
    config = GLMConfig.from_name("glm-tiny")
    ids = blank.input_ids + generated
    return reference_forward(state, config, ids, blank.mask_pos, blank.use_gmask,
                             blank.context_length + 1, variant)


@pytest.mark.parametrize("context", [MASK_CONTEXT, GMASK_CONTEXT], ids=["mask", "gmask"])
def test_matches_official_math(ckpt, state, context):
    diff = (ours(ckpt, context) - reference(state, context)).abs().max().item()
    assert diff <= TOL


# Each wrong variant must be detectable: our logits agree with the official math
# and differ clearly from the variant (so the comparison above can fail for it).
VARIANTS = {
    "deepnorm_normalised_residual": (Variant(wrong_residual=True), MASK_CONTEXT),
    "deepnorm_alpha_sqrt_2L": (Variant(wrong_alpha=True), MASK_CONTEXT),
    "qkv_interleaved_per_head": (Variant(wrong_qkv_layout=True), MASK_CONTEXT),
    "geglu_gelu_on_second_half": (Variant(wrong_glu_order=True), MASK_CONTEXT),
    "gelu_exact_erf": (Variant(wrong_gelu=True), MASK_CONTEXT),
    "rotary_rotate_half_pairing": (Variant(wrong_rotary_pairing=True), GMASK_CONTEXT),
    "prefix_lm_bidirectional_context": (Variant(wrong_mask=True), MASK_CONTEXT),
    "mask_positions_stay_at_mask": (Variant(wrong_positions=True), MASK_CONTEXT),
    "final_layernorm_before_tied_head": (Variant(untied_head=True), GMASK_CONTEXT),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_official_detail_is_checked(ckpt, state, name):
    variant, context = VARIANTS[name]
    mine = ours(ckpt, context)
    assert (mine - reference(state, context)).abs().max().item() <= TOL
    # 10x the tolerance: the comparison above would catch this mistake
    assert (mine - reference(state, context, variant=variant)).abs().max().item() > 10 * TOL


@pytest.mark.parametrize("context", [MASK_CONTEXT, GMASK_CONTEXT], ids=["mask", "gmask"])
def test_kv_cache_decoding_equals_full_recompute(ckpt, context):
    full = ours(ckpt, context)
    cut = len(context) + 1            # prefill context + sop, then one token per step
    stepped = ours(ckpt, context, split_at=cut)
    assert (full - stepped).abs().max().item() <= TOL


@pytest.mark.parametrize("stepped", [False, True], ids=["one-pass", "prefill+decode"])
def test_batched_left_padding_equals_single_rows(ckpt, stepped):
    # Prompts of different lengths and both mask kinds; with ``stepped`` the prompts are
    # prefilled together (they end in the same slot) and 3 tokens decoded through the cache.
    rows = [(MASK_CONTEXT, GENERATED), (GMASK_CONTEXT, GENERATED[::-1]), ([20123, MASK_ID], GENERATED)]
    width = max(len(c) + 1 + len(g) for c, g in rows)
    batched = batch_logits(ParallelContext(), ckpt, rows, split_at=width - 3 if stepped else None)
    for (context, generated), got in zip(rows, batched):
        alone = ours(ckpt, context, generated)
        assert (got - alone).abs().max().item() <= TOL


def test_packing_knows_left_padded_rows():
    """A left-padded prefill's packing names each row's first real slot (its attention then
    runs row by row on the real slots: the one-pass case above); any other pattern of
    padding keeps the padded attention."""
    from model.glm import Packing

    left = torch.tensor([[False, False, True, True], [True, True, True, True], [False, True, True, True]])
    packing = Packing.of(left)
    assert packing.starts == (2, 0, 1) and packing.index.tolist() == [2, 3, 4, 5, 6, 7, 9, 10, 11]
    assert Packing.of(torch.tensor([[True, False, True], [True, True, True]])).starts is None
    assert Packing.of(torch.ones(2, 3, dtype=torch.bool)) is None


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.5), ("float16", 0.1)])
def test_half_precisions_track_float32(ckpt, dtype, tol):
    full = ours(ckpt, MASK_CONTEXT)
    half = ours(ckpt, MASK_CONTEXT, dtype=dtype)
    assert half.dtype == torch.float32
    assert torch.isfinite(half).all()
    assert (full - half).abs().max().item() <= tol * full.abs().max().item()
    assert (full.argmax(-1) == half.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_equals_the_official_ops(dtype):
    """The CPU path's one fused call computes what the official scaled, masked, fp32-softmax
    ops compute, for the prefix-LM prefill mask and a left-padded decode mask; a fully masked
    (padding) row stays finite, so padding never poisons the cache with NaN."""
    from model.glm import fused_attention, official_attention

    gen = torch.Generator().manual_seed(0)
    b, heads, hn, s, coeff = 3, 4, 16, 7, 5.0
    q, k, v = (torch.randn(b, heads, s, hn, generator=gen).to(dtype) for _ in range(3))
    context = 4                                            # bidirectional context, then causal
    mask = torch.ones(s, s).tril().bool()
    mask[:, :context] = True
    mask = ~mask.expand(b, 1, s, s).clone()
    mask[1, :, :, :2] = True                               # row 1: two left-padding slots
    mask[1, :, :2, :] = True                               # ... whose own queries see nothing
    want = official_attention(q, k, v, mask, coeff)
    got = fused_attention(q, k, v, mask, coeff)
    assert torch.isfinite(got).all()
    real = ~mask.all(dim=-1, keepdim=True).expand_as(got[..., :1]).squeeze(-1)   # rows with a key
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want.float())[real].abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_the_official_ops(dtype, monkeypatch):
    """One query per row (a decode step: the CPU path sends it to ``decode_attention`` from
    ``DECODE_MIN_QUERIES`` rows x heads):
    the chunked fp32 matmuls compute what the official ops compute, for a row with left
    padding and rows of full length, in one chunk or in several."""
    import model.glm as glm

    gen = torch.Generator().manual_seed(1)
    b, heads, hn, t, coeff = 3, 4, 16, 9, 3.0
    q = torch.randn(b, heads, 1, hn, generator=gen).to(dtype)
    k, v = (torch.randn(b, heads, t, hn, generator=gen).to(dtype) for _ in range(2))
    mask = torch.zeros(b, 1, 1, t, dtype=torch.bool)
    mask[1, :, :, :3] = True                               # row 1: three padding slots
    want = glm.official_attention(q, k, v, mask, coeff)
    whole = glm.decode_attention(q, k, v, mask, coeff)
    monkeypatch.setattr(glm, "DECODE_MIN_QUERIES", b * heads)            # from 12 queries: the decode path
    routed = glm.cpu_attention(q, k, v, mask, coeff)
    monkeypatch.setattr(glm, "DECODE_CHUNK_BYTES", 5 * t * hn * k.element_size())   # chunks of 5 of 12
    chunked = glm.decode_attention(q, k, v, mask, coeff)
    assert whole.dtype == dtype and whole.shape == q.shape
    assert torch.equal(routed, whole)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got in (whole, chunked):
        assert (got.float() - want.float()).abs().max().item() <= tol
