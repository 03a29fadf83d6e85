"""An independent, unsharded transcription of the official GLM-130B forward pass
(SAT ``glm130B_model.py`` + ``generate.py``'s masks and positions), written
straight from docs/model.md in the official ``[seq, batch, hidden]`` layout.

It shares no code with ``model/``. Each ``wrong_*`` switch swaps one easy-to-get-
wrong detail for the common mistake, so tests can show the comparison notices it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Variant:
    """Which one detail of the official math to get wrong (all False: the official one)."""

    wrong_residual: bool = False      # residual from the raw input instead of the normalised one
    wrong_alpha: bool = False         # alpha = 1 instead of sqrt(2L)
    wrong_qkv_layout: bool = False    # [Q; K; V] blocks instead of per-head interleaving
    wrong_glu_order: bool = False     # GELU on the first half instead of the second
    wrong_gelu: bool = False          # tanh approximation instead of exact erf
    wrong_rotary_pairing: bool = False  # interleaved (2i, 2i+1) pairs instead of (i, i+hn/2)
    wrong_mask: bool = False          # causal everywhere instead of a bidirectional prefix
    wrong_positions: bool = False     # [MASK] positions keep counting like [gMASK]
    untied_head: bool = False         # LM head without the final LayerNorm


def masks_and_positions(context_length: int, total: int, mask_position: int, gmask: bool,
                        v: Variant = Variant()):
    """``generate.py``'s ``get_masks_and_position_ids``; context_length includes sop."""
    mask = torch.ones((total, total)).tril_()
    if not v.wrong_mask:
        mask[:, : context_length - 1] = 1
    masked = mask < 0.5                                     # True = masked
    pos = torch.arange(total)
    if not gmask and not v.wrong_positions:
        pos[context_length - 1:] = mask_position
    return masked, pos


def _rotary(x, pos, base, v: Variant):
    hn = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn))
    freqs = pos.float()[:, None] * inv_freq[None]           # [s, hn/2]
    if v.wrong_rotary_pairing:
        cos, sin = freqs.cos().repeat_interleave(2, -1), freqs.sin().repeat_interleave(2, -1)
        rot = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        rot = torch.cat((-x[..., hn // 2:], x[..., : hn // 2]), dim=-1)
    return x * cos[:, None, None, :] + rot * sin[:, None, None, :]   # x: [s, b, np, hn]


def forward(sd: dict, config, ids: list[int], mask_position: int, gmask: bool,
            context_length: int, v: Variant = Variant()) -> torch.Tensor:
    """Logits ``[s, V]`` (fp32) for one sequence ``ids`` (context + sop + generated)."""
    sd = {k: t.float() for k, t in sd.items()}
    L, h, nh = config.num_layers, config.hidden_size, config.num_attention_heads
    hn = h // nh
    alpha = 1.0 if v.wrong_alpha else math.sqrt(2 * L)
    s = len(ids)
    masked, pos = masks_and_positions(context_length, s, mask_position, gmask, v)
    x = sd["transformer.word_embeddings.weight"][torch.tensor(ids)][:, None, :]   # [s, 1, h]

    def ln(t, name):
        return F.layer_norm(t, (h,), sd[name + ".weight"], sd[name + ".bias"], config.layernorm_epsilon)

    for i in range(L):
        p = f"transformer.layers.{i}."
        a = ln(x, p + "input_layernorm")
        qkv = a @ sd[p + "attention.query_key_value.weight"].T + sd[p + "attention.query_key_value.bias"]
        if v.wrong_qkv_layout:
            q, k, val = (t.reshape(s, 1, nh, hn) for t in qkv.chunk(3, dim=-1))
        else:
            q, k, val = qkv.view(s, 1, nh, 3 * hn).split(hn, dim=-1)        # [s, b, np, hn]
        q, k = _rotary(q, pos, config.rotary_base, v), _rotary(k, pos, config.rotary_base, v)
        coeff = float(i + 1)
        q = q / (math.sqrt(hn) * coeff)
        scores = torch.einsum("sbnd,tbnd->bnst", q, k)                        # [b, np, s, t]
        scores = scores.masked_fill(masked, -10000.0)
        probs = F.softmax(scores.float() * coeff, dim=-1)
        ctx = torch.einsum("bnst,tbnd->sbnd", probs, val).reshape(s, 1, h)
        attn = ctx @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
        x = (x if v.wrong_residual else a) * alpha + attn
        m = ln(x, p + "post_attention_layernorm")
        u = m @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"]
        x1, x2 = u.chunk(2, dim=-1)
        if v.wrong_glu_order:
            x1, x2 = x2, x1
        g = x1 * F.gelu(x2, approximate="tanh" if v.wrong_gelu else "none")
        mlp = g @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
        x = (x if v.wrong_residual else m) * alpha + mlp
    if not v.untied_head:
        x = ln(x, "transformer.final_layernorm")
    return (x[:, 0] @ sd["transformer.word_embeddings.weight"].T).float()
