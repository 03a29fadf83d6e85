"""Tensor-parallel building blocks over ``torch.distributed``.

Each layer owns only its shard of the weights and does its collective inside
``forward`` (no hooks): column-parallel linears need none, row-parallel linears
all-reduce before adding their replicated bias, the vocabulary-parallel
embedding all-reduces its masked lookup and all-gathers the tied LM-head logits.
Parameter names are the official checkpoint names (``weight``, ``bias``); a
weight-only quantized linear holds the official pre-quantized layout instead
(``weight`` int8 values + ``weight_scale`` fp16) and, once loaded, a kernel op
built from it by ``kernels.prepare`` (repacked once, never on the hot path).

On CPU, ``prepare()`` also gives each dense linear and the tied LM head the weight layout that
``kernels.cpu_dense.choose_layout`` picks for its dtype (measured: ``glm bench gemv``): fp32
weights are stored column-major (the ``[in, out]`` copy *is* the parameter, so nothing is added),
but the tied head keeps a micro-panel copy for ``kernels.cpu_gemm_f32`` where that measures faster;
bf16 weights on CPUs with native bf16 go to oneDNN's packed layout, which replaces a linear's
weight (``state_dict()`` rebuilds the plain one) and sits beside the embedding as one extra copy
of the vocab slice, since lookups need the rows (``model/plan.py`` counts it). A packed bf16 linear
of at most ``GEMV_MAX_BYTES`` also keeps its plain rows for ``kernels.cpu_gemv`` at the row counts
where that measures faster (one or two rows: oneDNN's per-call cost is most of such a product;
docs/benchmarks.md, "GEMV at batch 1").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import cpu_gemm_f32, cpu_gemv, threads
from kernels.cpu_dense import CpuDenseLinear, prepare_dense
from model.quantization import QuantSpec


@dataclass(frozen=True)
class ParallelContext:
    """Which shard this process holds. ``group`` is None for a single process."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.world_size > 1 and self.group is None and not dist.is_initialized():
            raise ValueError("world_size > 1 needs an initialised torch.distributed group")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension, in rank order."""
        if not self.distributed:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Make every rank hold rank ``src``'s ``x`` (in place)."""
        if self.distributed:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def shard_size(self, n: int, what: str) -> int:
        if n % self.world_size:
            raise ValueError(f"tensor-parallel size {self.world_size} does not divide {what} ({n})")
        return n // self.world_size


# A packed bf16 linear up to this size keeps its plain rows for ``kernels.cpu_gemv`` too (the
# demo's 131-704 KB; GLM-130B's shards are hundreds of MB and keep the packed copy only).
GEMV_MAX_BYTES = 8 * 1024 * 1024


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device) -> nn.Parameter:
    # Weights are always loaded from a checkpoint, so no initialisation is spent here.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class _ShardLinear(nn.Module):
    """The local ``[out, in]`` weight of a linear shard: dense, or weight-only quantized."""

    def _init_weight(self, out_local: int, in_local: int, *, dtype, device,
                     quant: QuantSpec | None, what: str) -> None:
        self.quant, self.dtype, self.in_local = quant, dtype, in_local
        self.op = None
        self.gemv_weight: torch.Tensor | None = None   # plain rows for kernels.cpu_gemv (prepare)
        self.gemv_rows = 0                             # rows up to which it serves (measured)
        if quant is None:
            self.weight = _empty((out_local, in_local), dtype, device)
            return
        quant.check_shard(what, in_local)
        self.register_buffer("weight", torch.zeros(
            (out_local, quant.packed_columns(in_local)), dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(
            quant.scale_shape(out_local, in_local), dtype=torch.float16, device=device))

    def quantized_weight(self) -> kernels.QuantizedWeight:
        return kernels.QuantizedWeight(self.weight, self.weight_scale, self.quant.bits,
                                       self.in_local, self.quant.group_size)

    fuse_bias = False  # column-parallel: the bias goes into the dense op

    def prepare(self) -> None:
        """Build the matmul op from the loaded weight (once, after loading): the quantized
        kernel op, or on CPU the dense op in the measured layout (see the module docstring).
        A second call keeps the op it has."""
        if self.op is not None:
            return
        if self.quant is not None:
            self.op = kernels.prepare(self.quantized_weight(), device=self.weight.device, dtype=self.dtype)
            return
        if self.weight.device.type != "cpu":
            return
        op = prepare_dense(self.weight.detach(), self.bias.detach() if self.fuse_bias else None)
        if op.layout == "transposed":
            self.weight.data = op.weight.t()  # the op's [in, out] copy is now the parameter's storage
        elif op.layout == "packed":
            plain = self.weight.detach()
            if plain.nbytes <= GEMV_MAX_BYTES and cpu_gemv.supports(plain):
                bare = CpuDenseLinear(plain, layout="packed") if self.fuse_bias else op
                self.gemv_rows = cpu_gemv.rows_faster(plain, bare)      # measured without the bias
                self.gemv_weight = plain.contiguous() if self.gemv_rows else None
            del self.weight  # the packed copy replaces it; state_dict() rebuilds the plain matrix
            self.register_parameter("weight", None)
        self.op = op

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if isinstance(self.op, CpuDenseLinear) and self.op.layout == "packed":
            destination[prefix + "weight"] = self.op.dense_weight()

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T``, plus the bias where it is fused (column-parallel)."""
        if self.gemv_rows and x.numel() <= self.gemv_rows * self.in_local and x.dtype == torch.bfloat16:
            y = cpu_gemv.matmul_t(x, self.gemv_weight)
            return y.add_(self.bias) if self.fuse_bias else y
        if self.op is not None:
            return self.op(x)
        return F.linear(x, self.weight, self.bias if self.fuse_bias else None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return self.dense(x)
        if self.op is None:
            raise RuntimeError("quantized linear used before prepare() (load the model first)")
        with threads.parallel():          # every thread, inside a serial forward too (kernels/threads.py)
            return self.op(x)


class ColumnParallelLinear(_ShardLinear):
    """``y_local = x @ W_local^T + b_local``: the output dim is split across ranks."""

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, *,
                 dtype: torch.dtype, device=None, what: str = "output features",
                 quant: QuantSpec | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features_local = ctx.shard_size(out_features, what)
        self._init_weight(self.out_features_local, in_features, dtype=dtype, device=device,
                          quant=quant, what=what)
        self.bias = _empty((self.out_features_local,), dtype, device)

    fuse_bias = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return self.dense(x)
        return self.matmul(x) + self.bias


class RowParallelLinear(_ShardLinear):
    """``y = all_reduce(x_local @ W_local^T) + b``: the input dim is split; bias replicated."""

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, *,
                 dtype: torch.dtype, device=None, what: str = "input features",
                 quant: QuantSpec | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.in_features_local = ctx.shard_size(in_features, what)
        self.out_features = out_features
        self._init_weight(out_features, self.in_features_local, dtype=dtype, device=device,
                          quant=quant, what=what)
        self.bias = _empty((out_features,), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        self.ctx.all_reduce(y)
        return y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rank r holds vocabulary rows ``[r*V/tp, (r+1)*V/tp)``; also the tied LM head."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext, *,
                 dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.vocab_local = ctx.shard_size(vocab_size, "vocab_size")
        self.vocab_start = ctx.rank * self.vocab_local
        self.weight = _empty((self.vocab_local, hidden_size), dtype, device)
        self.head: CpuDenseLinear | None = None
        # Rows up to which the head takes ``kernels.cpu_gemv`` (measured by ``prepare``; None:
        # not prepared, the kernel wherever it serves the weight).
        self.gemv_rows: int | None = None

    def prepare(self) -> None:
        """Give the tied LM head its measured CPU layout (once, after loading): fp32 adds the
        micro-panel copy of ``kernels.cpu_gemm_f32`` where that measures faster than MKL, else
        stores the embedding column-major for MKL (no copy; lookups then read it strided); bf16
        with native bf16 adds a packed copy for the head. ``head_nbytes`` counts the copy."""
        if self.head is not None or self.weight.device.type != "cpu":
            return
        head = prepare_dense(self.weight.detach())
        if head.layout == "transposed" and cpu_gemm_f32.supports(self.weight):
            panels = cpu_gemm_f32.Panels(self.weight.detach())
            if cpu_gemm_f32.faster(panels, head):
                head = panels
        if head.layout == "transposed":
            self.weight.data = head.weight.t()
        self.head = head
        self.gemv_rows = cpu_gemv.rows_faster(self.weight.detach(), head)

    @property
    def head_nbytes(self) -> int:
        """Bytes the head holds beside the embedding (0 unless it keeps a packed copy)."""
        return self.head.nbytes if self.head is not None and self.head.layout in ("packed", "panels") else 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.ctx.distributed:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ctx.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head: ``hidden @ E^T`` gathered to the full vocabulary on every rank. At the
        few rows of bf16 where ``prepare`` measured it faster (``gemv_rows``; twice oneDNN's
        speed on AVX-512-BF16 without AMX) it is ``kernels.cpu_gemv`` over the embedding
        itself, else the head's dense op (in fp32 where it measured faster, ``kernels.cpu_gemm_f32``
        at every row count)."""
        rows = cpu_gemv.MAX_ROWS if self.gemv_rows is None else self.gemv_rows
        if (hidden.dtype == torch.bfloat16 and hidden.numel() <= rows * hidden.shape[-1]
                and cpu_gemv.supports(self.weight)):
            local = cpu_gemv.matmul_t(hidden, self.weight)
        else:
            local = self.head(hidden) if self.head is not None else F.linear(hidden, self.weight)
        return self.ctx.all_gather_last_dim(local)
