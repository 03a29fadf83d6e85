"""The GLM-130B network, tensor-parallel, exactly as the official SAT implementation.

Per layer (``docs/model.md`` "DeepNorm"): ``a = LN_in(x); x' = a*alpha + Attn(a);
m = LN_post(x'); x = m*alpha + MLP(m)`` with ``alpha = sqrt(2L)``; a final
LayerNorm, then the tied, vocabulary-parallel LM head. Attention uses the fused,
per-head interleaved ``[q; k; v]`` projection, 1-D rotary embedding over the
whole head dim, and the official fp16-safe scaling (divide q by
``sqrt(hn) * (layer+1)``, multiply the fp32 scores back before the fp32 softmax).
The MLP is GeGLU over the *local* ``[value; gate]`` halves with exact-erf GELU.

Tensors are batch-first: ``[b, s, h]``. Module attribute names are the official
checkpoint names, so ``state_dict()`` keys are the checkpoint keys of this rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import threads

from model.config import GLMConfig
from model.kv_cache import KVCache
from model.paged_kv import PagedStep
from model.quantization import QuantSpec
from model.parallel import (
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    VocabParallelEmbedding,
)

# Called as observer(layer_id, seconds) after each layer when timing is on.
LayerObserver = Callable[[int, float], None]


class RotaryEmbedding(nn.Module):
    """GPT-NeoX style rotary embedding: element i pairs with i + hn/2, base 10000.

    Angles are computed in fp32 (as FasterTransformer and later SAT do) and cast to
    the activation dtype; SAT 0.2.12 computed them in fp16 (``docs/model.md`` "Positions").
    """

    def __init__(self, head_dim: int, base: float, device=None) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq   # [b, s, hn/2]
        emb = torch.cat((freqs, freqs), dim=-1)                               # [b, s, hn]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [b, s, np, hn]; cos/sin: [b, s, hn] broadcast over heads
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


@dataclass(frozen=True)
class Packing:
    """The real tokens of a left-padded ``[b, s]`` prefill, packed into ``[1, n, .]``: the
    position-wise work (linears, LayerNorms, GeGLU, residuals) runs on those ``n`` tokens
    only, and attention unpacks them to ``[b, s]`` (zeros at the padding, which every real
    token's mask hides). A batch of prompts of 20 and 200 tokens computes 220 tokens' layers,
    not 400."""

    index: torch.Tensor   # [n]: the flat ``row * s + slot`` of each real token, in order
    b: int
    s: int
    starts: tuple[int, ...] | None = None   # each row's first real slot, when every row is left-padded

    @classmethod
    def of(cls, valid: torch.Tensor) -> "Packing | None":
        """The packing of ``valid [b, s]`` (True = a real token); None when nothing is padded."""
        if bool(valid.all()):
            return None
        b, s = valid.shape
        starts = s - valid.sum(dim=1)                                            # [b]
        left_padded = torch.equal(torch.arange(s, device=valid.device)[None, :] >= starts[:, None], valid)
        return cls(valid.reshape(-1).nonzero().squeeze(1), b, s,
                   tuple(starts.tolist()) if left_padded else None)

    def attend(self, attention: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor, coeff: float) -> torch.Tensor:
        """``attention`` of each row over its own slots only, packed ``[1, n, np*hn]``: for a
        left-padded prefill into an empty cache (``q``, ``k``, ``v`` ``[b, np, s, hn]``, mask
        ``[b, 1, s, s]``) a row's real queries see no slot before its first real one, so
        dropping those keys changes nothing but the work (a batch of 20- and 200-token prompts
        attends over 20² + 200² pairs, not 2 × 200²)."""
        parts = []
        for row, start in enumerate(self.starts):
            out = attention(q[row:row + 1, :, start:], k[row:row + 1, :, start:], v[row:row + 1, :, start:],
                            mask[row:row + 1, :, start:, start:], coeff)           # [1, np, n_row, hn]
            parts.append(out[0].transpose(0, 1).reshape(self.s - start, -1))     # [n_row, np*hn]
        return torch.cat(parts).unsqueeze(0)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, s, f]`` -> ``[1, n, f]``."""
        return x.reshape(self.b * self.s, x.shape[-1]).index_select(0, self.index).unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, n, f]`` -> ``[b, s, f]``, zeros at the padding."""
        out = x.new_zeros((self.b * self.s, x.shape[-1]))
        out.index_copy_(0, self.index, x[0])
        return out.view(self.b, self.s, -1)


def official_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       coeff: float) -> torch.Tensor:
    """The official ops, in their order: q divided by ``√d·coeff``, ``q·kᵀ`` in the compute
    dtype, −10000 on masked scores, times ``coeff`` and softmax in fp32, then ``·v``."""
    q = q / (math.sqrt(q.shape[-1]) * coeff)
    scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(mask, -10000.0)   # [b, np, s, t]
    probs = F.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)                                                # [b, np, s, hn]


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    coeff: float) -> torch.Tensor:
    """``softmax(q·kᵀ/√d − 10000·coeff·mask)·v`` in one call of torch's fused attention
    (``F.scaled_dot_product_attention``: on CPU its flash kernel, fp32 scores and softmax in
    every dtype). The same function as the official ops (``docs/model.md`` "Attention and QKV
    layout"): a masked score is ``−10000·coeff`` there and ``score − 10000·coeff`` here, and
    both are exactly zero after the softmax for every row with an unmasked score. The eager ops
    cost a oneDNN bmm per shape, and the key length changes every decode step."""
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask, -10000.0 * coeff)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(q.shape[-1]))


DECODE_CHUNK_BYTES = 2 << 20   # bytes of keys (in their dtype) one chunk of decode attention reads
DECODE_MIN_QUERIES = 16        # rows x heads from which a decode step uses decode_attention


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     coeff: float) -> torch.Tensor:
    """Attention of one query per row (a decode step) on CPU: ``q·kᵀ/√d``, masked scores set to
    ``−10000·coeff`` (the official value after its ``×coeff``), fp32 softmax, ``·v``, as two
    batched fp32 matmuls over the rows × heads, in chunks of about ``DECODE_CHUNK_BYTES`` of
    keys so the fp32 copies of keys and values stay in cache. Measured against the fused
    call, which pays a fixed cost per (row, head) that a single query cannot amortise
    (docs/model.md "Attention and QKV layout"; ``bench/attention_ab.py``). The matmuls run in
    fp32 because oneDNN's bf16 bmm builds a primitive per key length, i.e. per step."""
    b, heads, t, d = k.shape
    n = b * heads
    keys, values = k.reshape(n, t, d), v.reshape(n, t, d)               # views: rows and heads merge
    query = q.reshape(n, 1, d).float() * (1.0 / math.sqrt(d))
    masked = mask.expand(b, heads, 1, t).reshape(n, 1, t)
    fill = -10000.0 * coeff
    step = max(1, DECODE_CHUNK_BYTES // (t * d * k.element_size()))
    if step >= n:
        scores = torch.bmm(query, keys.float().transpose(1, 2)).masked_fill_(masked, fill)   # [n, 1, t]
        out = torch.bmm(torch.softmax(scores, dim=-1), values.float())
    else:
        out = torch.empty((n, 1, d), dtype=torch.float32, device=q.device)
        for i in range(0, n, step):
            j = min(n, i + step)
            scores = torch.bmm(query[i:j], keys[i:j].float().transpose(1, 2)).masked_fill_(masked[i:j], fill)
            torch.bmm(torch.softmax(scores, dim=-1), values[i:j].float(), out=out[i:j])
    return out.view(b, heads, 1, d).to(q.dtype)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  coeff: float) -> torch.Tensor:
    """The CPU path: ``decode_attention`` for one query per row from ``DECODE_MIN_QUERIES``
    rows × heads (below it, the few (row, head) pairs cost the fused call less than the extra
    small ops), ``fused_attention`` otherwise."""
    b, heads, s, _ = q.shape
    if s == 1 and b * heads >= DECODE_MIN_QUERIES:
        return decode_attention(q, k, v, mask, coeff)
    return fused_attention(q, k, v, mask, coeff)


class SelfAttention(nn.Module):
    """One layer's attention on this rank's heads: fused per-head ``[q; k; v]``, rotary,
    prefix-LM mask, fp32 softmax, row-parallel ``dense`` (``docs/model.md`` "Attention and QKV layout")."""

    def __init__(self, config: GLMConfig, ctx: ParallelContext, layer_id: int, *, dtype, device,
                 quant: QuantSpec | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = config.head_dim
        self.heads_local = ctx.shard_size(config.num_attention_heads, "num_attention_heads")
        h = config.hidden_size
        self.query_key_value = ColumnParallelLinear(
            h, 3 * h, ctx, dtype=dtype, device=device, what="3 * hidden_size (qkv)", quant=quant)
        self.dense = RowParallelLinear(
            h, h, ctx, dtype=dtype, device=device, what="hidden_size", quant=quant)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, cache: KVCache | None, packing: Packing | None = None) -> torch.Tensor:
        hn, np_ = self.head_dim, self.heads_local
        if isinstance(cache, PagedStep):
            return self._paged(x, cos, sin, cache)
        qkv = self.query_key_value(x)                                          # [b, s, 3h/tp]
        if packing is not None:
            qkv = packing.unpack(qkv)                                          # [1, n, .] -> [b, s, .]
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, np_, 3 * hn)                                      # [b, s, np, 3hn]
        q, k, v = qkv.split(hn, dim=-1)                                        # [b, s, np, hn] each
        q = apply_rotary(q, cos, sin).transpose(1, 2)                          # [b, np, s, hn]
        k = apply_rotary(k, cos, sin).transpose(1, 2)                          # [b, np, s, hn]
        v = v.transpose(1, 2)                                                  # [b, np, s, hn]
        if cache is not None:
            k, v = cache.write(self.layer_id, k, v)                            # [b, np, t, hn]
        coeff = float(self.layer_id + 1)
        cpu = q.device.type == "cpu"
        attention = cpu_attention if cpu else official_attention
        if cpu and packing is not None and packing.starts is not None and k.shape[2] == s:
            return self.dense(packing.attend(attention, q, k, v, mask, coeff))  # [1, n, h/tp], row by row
        out = attention(q, k, v, mask, coeff)                                  # [b, np, s, hn]
        out = out.transpose(1, 2).reshape(b, s, np_ * hn)                      # [b, s, h/tp]
        if packing is not None:
            out = packing.pack(out)                                            # [1, n, h/tp]
        return self.dense(out)


    def _paged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: PagedStep) -> torch.Tensor:
        """The packed ``[1, n, h]`` tokens of a paged step (``model.paged_kv``): keys and values
        go to their pool slots, each row attends as ``PagedStep.attend`` says."""
        hn, np_ = self.head_dim, self.heads_local
        n = x.shape[1]
        q, k, v = self.query_key_value(x).view(1, n, np_, 3 * hn).split(hn, dim=-1)   # [1, n, np, hn] each
        q, k, v = apply_rotary(q, cos, sin)[0], apply_rotary(k, cos, sin)[0], v[0]
        step.write(self.layer_id, k, v)
        attention = cpu_attention if q.device.type == "cpu" else official_attention
        return self.dense(step.attend(self.layer_id, q, k, v, float(self.layer_id + 1), attention)[None])


class GEGLUMLP(nn.Module):
    """The GeGLU MLP on this rank's units: local ``[value; gate]`` halves, exact-erf GELU on
    the gate, row-parallel ``dense_4h_to_h`` (``docs/model.md`` "GeGLU")."""

    def __init__(self, config: GLMConfig, ctx: ParallelContext, *, dtype, device,
                 quant: QuantSpec | None = None) -> None:
        super().__init__()
        h, inner = config.hidden_size, config.inner_hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(
            h, 2 * inner, ctx, dtype=dtype, device=device, what="2 * inner_hidden_size", quant=quant)
        self.dense_4h_to_h = RowParallelLinear(
            inner, h, ctx, dtype=dtype, device=device, what="inner_hidden_size", quant=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.dense_h_to_4h(x).chunk(2, dim=-1)                   # local halves
        return self.dense_4h_to_h(value * F.gelu(gate))                        # exact erf GELU


class GLMBlock(nn.Module):
    """One DeepNorm layer: the residual carries the normalised value times ``alpha``
    (``docs/model.md`` "DeepNorm")."""

    def __init__(self, config: GLMConfig, ctx: ParallelContext, layer_id: int, *, dtype, device,
                 quant: QuantSpec | None = None) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.alpha = config.alpha
        self.input_layernorm = nn.LayerNorm(h, eps=eps, dtype=dtype, device=device)
        self.attention = SelfAttention(config, ctx, layer_id, dtype=dtype, device=device, quant=quant)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps, dtype=dtype, device=device)
        self.mlp = GEGLUMLP(config, ctx, dtype=dtype, device=device, quant=quant)

    def forward(self, x, cos, sin, mask, cache, packing: Packing | None = None):
        a = self.input_layernorm(x)
        x = a * self.alpha + self.attention(a, cos, sin, mask, cache, packing)
        m = self.post_attention_layernorm(x)
        return m * self.alpha + self.mlp(m)


class Transformer(nn.Module):
    """The official ``transformer.*`` module tree: word embedding, layers, final LayerNorm
    (its attribute names are the checkpoint's key prefixes)."""

    def __init__(self, config: GLMConfig, ctx: ParallelContext, *, dtype, device,
                 quant: QuantSpec | None = None) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, ctx, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            GLMBlock(config, ctx, i, dtype=dtype, device=device, quant=quant)
            for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(
            config.hidden_size, eps=config.layernorm_epsilon, dtype=dtype, device=device)


class GLMModel(nn.Module):
    """One tensor-parallel shard of a GLM network."""

    def __init__(self, config: GLMConfig, ctx: ParallelContext | None = None, *,
                 dtype: torch.dtype = torch.float32, device=None, quant: QuantSpec | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        config.check_tp(ctx.world_size)
        self.config, self.ctx, self.dtype, self.quant = config, ctx, dtype, quant
        self.transformer = Transformer(config, ctx, dtype=dtype, device=device, quant=quant)
        self.rotary = RotaryEmbedding(config.head_dim, config.rotary_base, device=device)
        self.layer_observer: LayerObserver | None = None
        # The widest element-wise operand per token on this rank (qkv, the GeGLU halves, the
        # hidden state): a forward of few tokens runs those ops on one thread (``_serial``).
        tp = ctx.world_size
        self._widest = max(config.hidden_size, 3 * config.hidden_size // tp, 2 * config.inner_hidden_size // tp)

    def prepare(self) -> "GLMModel":
        """Build the matmul ops once the weights are loaded: the quantized kernels, and on CPU the
        measured layout of each dense linear and of the tied LM head (``model/parallel.py``)."""
        for module in self.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
                module.prepare()
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.word_embeddings.weight.device

    def _serial(self, tokens: int):
        """A CPU forward of ``tokens`` whose element-wise operands stay below
        ``kernels.threads.SERIAL_ELEMENTS`` runs them on one thread (waking a second costs more
        than it saves); its linears, head and C kernels still take every thread where their work
        pays for it (``kernels/threads.py``)."""
        small = self.device.type == "cpu" and tokens * self._widest < threads.SERIAL_ELEMENTS
        return threads.serial(small)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        heads_local = self.config.num_attention_heads // self.ctx.world_size
        return KVCache(self.config.num_layers, batch, capacity, heads_local, self.config.head_dim,
                       dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: KVCache | None = None, *, last_only: bool = False,
                float_logits: bool = True, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[b, s, V]`` (or ``[b, 1, V]`` with ``last_only``) in fp32, full vocabulary;
        with ``float_logits=False`` in the compute dtype (bf16/fp16 widen to fp32 exactly, so a
        caller that converts only the rows it needs gets the same values without a
        full-vocabulary copy).

        ``input_ids``/``position_ids``: ``[b, s]``; ``attention_mask``: bool
        ``[b, 1, s, t]``, True = masked, where ``t`` is ``s`` without a cache and the
        cache's used length with one (``KVCache.extend`` returns that mask). ``valid`` ``[b, s]``
        (True = a real token), given for a left-padded prefill, makes the layers skip the
        padding (``Packing``); the logits at padded positions are then those of zeros.
        """
        with self._serial(input_ids.numel()):
            x = self.transformer.word_embeddings(input_ids)                    # [b, s, h]
            cos, sin = self.rotary(position_ids, x.dtype)                       # [b, s, hn]
            packing = Packing.of(valid) if valid is not None else None
            if packing is not None:
                x = packing.pack(x)                                             # [1, n, h]
            x = self._layers(x, cos, sin, attention_mask, cache, packing)
            if packing is not None:
                x = packing.unpack(x)                                           # [b, s, h]
            if last_only:
                x = x[:, -1:]
            x = self.transformer.final_layernorm(x)
            logits = self.transformer.word_embeddings.logits(x)                # [b, s, V]
        return logits.float() if float_logits else logits


    def _layers(self, x, cos, sin, mask, cache, packing) -> torch.Tensor:
        observer = self.layer_observer
        for layer in self.transformer.layers:
            if observer is None:
                x = layer(x, cos, sin, mask, cache, packing)
            else:
                x = _timed(layer, observer, x, cos, sin, mask, cache, packing)
        return x

    @torch.inference_mode()
    def step_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: PagedStep) -> torch.Tensor:
        """One packed forward over a paged batch (``model.paged_kv``): ``input_ids`` and
        ``position_ids`` ``[n]``, the tokens of every row back to back; the logits ``[rows, V]``
        of each row's last token, in the compute dtype."""
        with self._serial(input_ids.numel()):
            x = self.transformer.word_embeddings(input_ids[None])              # [1, n, h]
            cos, sin = self.rotary(position_ids[None], x.dtype)                 # [1, n, hn]
            x = self._layers(x, cos, sin, None, step, None)
            x = self.transformer.final_layernorm(x[0].index_select(0, step.last))   # [rows, h]
            return self.transformer.word_embeddings.logits(x[None])[0]          # [rows, V]


def _timed(layer: GLMBlock, observer: LayerObserver, *args) -> torch.Tensor:
    import time

    if args[0].is_cuda:
        torch.cuda.synchronize(args[0].device)
    start = time.perf_counter()
    out = layer(*args)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    observer(layer.attention.layer_id, time.perf_counter() - start)
    return out
