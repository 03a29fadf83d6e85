"""The kernel checks of ``bench/gpu_check.py`` (its part 1): the quantized linears against
``kernels.reference`` and the paged decode attention against ``kernels.reference.paged_decode``,
at a preset's shard shapes, on the device (CUDA kernels) or on a CPU (the CPU backends)."""

from __future__ import annotations

import gc
import math
import time

import torch

import kernels
from kernels import cpu_paged, cuda_paged, reference
from kernels.reference import QuantizedWeight, quantized_matmul
from model.config import GLMConfig
from model.kv_footprint import blocks_for


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def shard_shapes(config: GLMConfig, tp: int) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of one layer's four quantized linears on one rank of ``tp``."""
    h, f = config.hidden_size, config.inner_hidden_size
    return {"query_key_value": (3 * h // tp, h), "dense": (h, h // tp),
            "dense_h_to_4h": (2 * f // tp, h), "dense_4h_to_h": (h, f // tp)}


def random_qweight(n: int, k: int, bits: int, device: torch.device, gen: torch.Generator) -> QuantizedWeight:
    """Random values in the official ranges (INT4: any nibble) and fp16 per-row scales."""
    if bits == 8:
        values = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device, generator=gen)
    else:   # a random byte is two random nibbles in [-8, 7]
        values = torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, device=device, generator=gen)
    limit = 127 if bits == 8 else 7
    scale = ((torch.rand(n, device=device, generator=gen) + 0.5) / (limit * math.sqrt(k))).half()
    return QuantizedWeight(values, scale, bits, k, None)


def within_tolerance(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """Two output ulps of the element plus the output's rms (both sides accumulate in fp32)."""
    eps = torch.finfo(ref.dtype).eps
    got, ref = got.float(), ref.float()
    tol = 2 * eps * (ref.abs() + ref.pow(2).mean().sqrt())
    err = (got - ref).abs()
    return bool(torch.all(err <= tol)), float((err / tol).max())


def kernel_checks(config: GLMConfig, device: torch.device, dtype: torch.dtype, tps, batches) -> list[dict]:
    if device.type != "cuda":
        print("   (cpu: the CUDA kernels are skipped; the same checks run on the CPU backend)")
    gen = torch.Generator(device=device).manual_seed(int(time.time()))
    rows = []
    for tp in tps:
        for name, (n, k) in shard_shapes(config, tp).items():
            for bits in (8, 4):
                qw = random_qweight(n, k, bits, device, gen)
                op = kernels.prepare(qw, device=device, dtype=dtype)
                for m in batches:
                    x = torch.randn(m, k, device=device, dtype=torch.float32, generator=gen).to(dtype)
                    got = op(x)
                    ok, worst = within_tolerance(got, quantized_matmul(x, qw))   # the reference, on the device
                    row = dict(tp=tp, layer=name, n=n, k=k, bits=bits, m=m, ok=ok, err_over_tol=worst)
                    if tp == tps[-1] and m == batches[0]:                       # and once on the host, in fp32
                        host = QuantizedWeight(qw.values.cpu(), qw.scale.cpu(), bits, k, None)
                        ref = quantized_matmul(x.cpu().float(), host)
                        err = float((got.cpu().float() - ref).abs().max() / ref.abs().max())
                        row.update(host_rel_err=err, ok=ok and err < 4 * torch.finfo(dtype).eps)
                    rows.append(row)
                del op, qw
                free_memory(device)
    return rows


def paged_checks(config: GLMConfig, device: torch.device, dtype: torch.dtype, tps) -> list[dict]:
    """The paged decode attention kernel (``kernels.cuda_paged``; on a CPU ``kernels.cpu_paged``)
    against ``kernels.reference.paged_decode`` at the preset's shard heads, for rows of 1 to
    ``max_sequence_length`` tokens (and a padding row) whose blocks lie scattered in the pool."""
    cuda = device.type == "cuda"
    if not cuda:
        dtype = torch.float32
        if not cpu_paged.supports(dtype):
            print("   (cpu: no C compiler, the paged kernel check is skipped)")
            return []
    gen = torch.Generator().manual_seed(int(time.time()))
    bs, dim = 16, config.head_dim
    lens = [1, 17, 300, 1000, 0, config.max_sequence_length]
    rows = []
    for tp in [tp for tp in tps if config.num_attention_heads % tp == 0] or [1]:
        heads = config.num_attention_heads // tp
        need = [blocks_for(n, bs) for n in lens]
        total = sum(need) + 1
        order = torch.randperm(total, generator=gen).tolist()
        tables, at = [], 0
        for n in need:
            table = order[at:at + n] or [order[-1]]
            at += n
            tables.append(table + [table[-1]] * (max(need) - len(table)))
        keys = torch.randn(heads, total * bs, dim, generator=gen).to(device, dtype)
        values = torch.randn(heads, total * bs, dim, generator=gen).to(device, dtype)
        q = (torch.randn(len(lens), heads, dim, generator=gen) / math.sqrt(dim)).to(device)
        tables_t = torch.tensor(tables, dtype=torch.long, device=device)
        lens_t = torch.tensor(lens, dtype=torch.long, device=device)
        kernel = cuda_paged if cuda else cpu_paged
        got = kernel.paged_decode(q, keys, values, tables_t, lens_t, bs).float()
        ref = reference.paged_decode(q, keys, values, tables_t, lens_t, bs)
        err = float((got - ref).abs().max())
        tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        rows.append(dict(tp=tp, heads=heads, dim=dim, lens=lens, dtype=str(dtype), max_abs_err=err,
                         ok=bool(math.isfinite(err) and err <= tol)))
        del keys, values
        free_memory(device)
    return rows
