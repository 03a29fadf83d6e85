"""Functions run on every rank of a real multi-process group by the TP tests
(module level, so spawned processes can import them)."""

from __future__ import annotations

import torch

from kernels import dequantize
from model.prompt import Blank
from model.runner import load_model


def sequence_inputs(blank: Blank, generated: list[int]):
    """ids, positions, valid and prefix flags of ``context + sop + generated``."""
    ids = blank.input_ids + list(generated)
    pos = blank.context_positions() + [blank.position(k) for k in range(len(generated) + 1)]
    prefix = [True] * blank.context_length + [False] * (len(generated) + 1)
    return ids, pos, prefix


def batch_logits(ctx, checkpoint: str, rows: list[tuple[list[int], list[int]]],
                 dtype: str = "float32", split_at: int | None = None, quant=None):
    """Logits of every real position of each row (left-padded batch). With ``split_at``,
    the first ``split_at`` tokens of every row go in one prefill and the rest one token
    per step through the KV cache; otherwise everything is one pass."""
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = load_model(checkpoint, ctx, dtype=dt, quant=quant)
    seqs = [sequence_inputs(Blank.first(ctx_ids), gen) for ctx_ids, gen in rows]
    width = max(len(s[0]) for s in seqs)
    b = len(seqs)
    ids = torch.zeros((b, width), dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    valid = torch.zeros((b, width), dtype=torch.bool)
    prefix = torch.zeros((b, width), dtype=torch.bool)
    for r, (i, p, f) in enumerate(seqs):
        pad = width - len(i)
        ids[r, pad:], pos[r, pad:] = torch.tensor(i), torch.tensor(p)
        valid[r, pad:], prefix[r, pad:] = True, torch.tensor(f)
    cache = model.new_cache(b, width)
    cut = width if split_at is None else split_at
    chunks = [(0, cut)] + [(t, t + 1) for t in range(cut, width)]
    out = []
    for start, end in chunks:
        mask = cache.extend(valid[:, start:end], prefix[:, start:end])
        # valid: the prefill skips the padding's layers, as the engine's does (glm.Packing)
        out.append(model(ids[:, start:end], pos[:, start:end], mask, cache, valid=valid[:, start:end]))
    logits = torch.cat(out, dim=1)                                   # [b, width, V]
    if ctx.rank != 0:
        return None
    return [logits[r, width - len(s[0]):].clone() for r, s in enumerate(seqs)]


def dequantized_state(ctx, checkpoint: str, quant: str | None):
    """This rank's linears as the dense values its quantized model computes with."""
    model = load_model(checkpoint, ctx, quant=quant)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "quantized_weight") and module.quant is not None:
            out[name + ".weight"] = dequantize(module.quantized_weight(), torch.float32)
    return out


def paged_logits(ctx, checkpoint: str, rows: list[tuple[list[int], list[int]]], dtype: str = "float32"):
    """Logits through the paged pool's packed steps (``model.paged_kv``): rows 0 and 1 are
    admitted with one generated token, then decode while row 2 is admitted as a resumed row
    (two generated ids) in the same forward, then all three decode. ``{(row, position):
    logits}`` of every last token, on rank 0."""
    from model.paged_kv import BlockPool, PagedCache, PagedStep

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = load_model(checkpoint, ctx, dtype=dt)
    c = model.config
    pool = BlockPool(c.num_layers, 64, 4, c.num_attention_heads // ctx.world_size, c.head_dim, dtype=dt)
    blanks = [Blank.first(ctx_ids) for ctx_ids, _ in rows]
    seqs = [sequence_inputs(b, gen) for b, (_, gen) in zip(blanks, rows)]
    cache, fed, got = PagedCache(pool), {}, {}
    plan = [([], [(0, 1), (1, 1)]), ([0, 1], [(2, 2)]), ([0, 1, 2], [])]     # (decoding, [(row, generated)])
    for decoding, admitted in plan:
        ids, pos, order = [], [], []
        for r in decoding:
            ids.append(seqs[r][0][fed[r]])
            pos.append(seqs[r][1][fed[r]])
            fed[r] += 1
            order.append(r)
        spans = []
        for r, generated in admitted:
            n = blanks[r].context_length + 1 + generated
            ids += seqs[r][0][:n]
            pos += seqs[r][1][:n]
            fed[r] = n
            spans.append((n, blanks[r].context_length))
            order.append(r)
        cache.add_rows(len(admitted))
        step = PagedStep.build(cache, len(decoding), spans)
        logits = model.step_logits(torch.tensor(ids), torch.tensor(pos), step)
        for i, r in enumerate(order):
            got[(r, fed[r] - 1)] = logits[i].float().clone()
    cache.release()
    return got if ctx.rank == 0 else None
