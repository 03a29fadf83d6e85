"""Paged decode at fixed shapes, captured once per batch bucket as a CUDA graph and replayed.

A decode step over the paged pool (``model.paged_kv``) feeds one token per row; what
changes from step to step is only data: the tokens, their positions, the pool slot each
new key and value goes to, each row's block table and cached length. ``PagedDecodeGraphs``
keeps those in static device tensors and runs the same ``GLMModel.step_logits`` forward
over them at fixed shapes, so one CUDA graph per batch bucket serves every step:

* **Buckets.** Batch sizes are rounded up to a bucket (``batch_buckets``:
  ``1, 2, 4, 8, 16, 24, 32, 48, 64``, up to the largest batch Warmup announces). The rows
  above the batch are padding rows: length 0, their keys and values written to the pool's
  scratch block (``BlockPool(scratch=True)``), their logits discarded.
* **Fixed table width.** Every row's table is ``W`` blocks wide, enough for
  ``max_sequence_length`` tokens, padded with the row's last block. The decode attention reads
  each row's length on the device: ``kernels.cuda_paged`` (reads only the row's own tokens)
  or, without it, a torch path that gathers all ``W`` blocks and masks past the length.
* **Nothing moves.** The pool is the graphs' KV memory: a batch joins, leaves, or is
  preempted by its block tables alone, exactly as in the eager paged step, and there is no
  arena to copy into.

A step runs eagerly (``decode`` returns None and the engine's packed forward runs) when it
admits prompts, its batch is above the largest bucket, a row would pass ``W`` blocks, or
per-layer timing is on (``GLMModel.layer_observer``). On a CPU the same static forward runs
without capture (``capture=False``): that is how the tests pin it to the eager step.
Capture happens only on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import cuda_paged
from model.glm import GLMModel
from model.kv_footprint import blocks_for
from model.paged_kv import BlockPool, PagedCache, PagedStep, gathered_attention


BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
MAX_BUCKET = 512   # a pool announcing a larger batch is graphed up to this, eager above


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The buckets of a pool whose batches hold up to ``max_batch`` rows: the standard
    sizes below it, and ``max_batch`` itself (capped at ``MAX_BUCKET``)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    top = min(max_batch, MAX_BUCKET)
    return tuple(sorted({b for b in BUCKETS if b < top} | {top}))


@dataclass
class GraphStats:
    """How decode steps ran: replayed graphs, static shapes without capture, eager fallbacks."""

    replayed: int = 0
    static: int = 0
    eager: int = 0


@dataclass
class StaticDecodeStep(PagedStep):
    """The ``PagedStep`` of a static decode forward: every packed token is a decode row's,
    with its table and length in device tensors (``tables [rows, W]``, ``lens [rows]``)."""

    tables: torch.Tensor | None = None
    lens: torch.Tensor | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coeff: float,
               attention) -> torch.Tensor:
        n, heads, d = q.shape
        pool = self.pool
        query = q.float() * (1.0 / math.sqrt(d))
        if self.kernel:
            res = cuda_paged.paged_decode(query, pool.keys[layer], pool.values[layer], self.tables,
                                          self.lens, pool.block_size)
            return res.view(n, heads * d)
        w = self.tables.shape[1] * pool.block_size
        masked = torch.arange(w, device=q.device)[None, :] >= self.lens[:, None]      # [n, w]
        return gathered_attention(pool, layer, query, self.tables, masked, -10000.0 * coeff).to(q.dtype)


class PagedDecodeGraphs:
    """Bucketed static-shape decode over one rank's block pool; ``capture()`` records a CUDA
    graph per bucket (CUDA only), ``decode`` runs a step or returns None for the eager path."""

    def __init__(self, model: GLMModel, pool: BlockPool, *, max_batch: int, capture: bool | None = None,
                 buckets: tuple[int, ...] | None = None, width: int | None = None) -> None:
        device = pool.device
        if capture is None:
            capture = device.type == "cuda"
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the pool is on {device}")
        if pool.scratch_block is None:
            raise ValueError("static-shape decode needs a pool with a scratch block (BlockPool(scratch=True))")
        self.model, self.pool, self.device, self.use_graphs = model, pool, device, capture
        self.buckets = tuple(sorted(buckets)) if buckets else batch_buckets(max_batch)
        # blocks per row's table: enough for max_sequence_length unless told
        self.width = width or blocks_for(model.config.max_sequence_length, pool.block_size)
        rows = self.buckets[-1]
        scratch = pool.scratch_block
        self.tokens = torch.zeros((rows,), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows,), dtype=torch.long, device=device)
        self.slots = torch.full((rows,), scratch * pool.block_size, dtype=torch.long, device=device)
        self.tables = torch.full((rows, self.width), scratch, dtype=torch.long, device=device)
        self.lens = torch.zeros((rows,), dtype=torch.long, device=device)
        self.last = torch.arange(rows, device=device)
        self.kernel = device.type == "cuda" and cuda_paged.supports(device, pool.keys.dtype, pool.head_dim)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}                     # bucket -> logits [B, V]
        self.stats = GraphStats()

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self.graphs))

    def nbytes(self) -> int:
        """Device bytes of the static inputs and outputs (graph memory pools not counted)."""
        static = (self.tokens, self.positions, self.slots, self.tables, self.lens, self.last)
        return sum(t.nbytes for t in static) + sum(t.nbytes for t in self.outputs.values())

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket holding ``rows``, None above the largest."""
        return next((b for b in self.buckets if b >= rows), None)

    def _pad(self, b: int, rows: int) -> None:
        """Rows ``b..rows-1`` are padding: length 0, writes to the scratch block."""
        scratch = self.pool.scratch_block
        self.tokens[b:rows] = 0
        self.positions[b:rows] = 0
        self.slots[b:rows] = scratch * self.pool.block_size
        self.tables[b:rows] = scratch
        self.lens[b:rows] = 0

    # -- the static forward (eager on CPU, captured on CUDA) ----------------------------------
    def _forward(self, rows: int) -> torch.Tensor:
        step = StaticDecodeStep(self.pool, self.slots[:rows], None, [], [], self.last[:rows], self.kernel,
                                tables=self.tables[:rows], lens=self.lens[:rows])
        return self.model.step_logits(self.tokens[:rows], self.positions[:rows], step)   # [B, V]

    def capture(self) -> tuple[int, ...]:
        """Record one graph per bucket, largest first, in one shared memory pool; a no-op
        when capture is off (CPU). Capture runs padding rows only: it writes nothing but
        the scratch block."""
        if not self.use_graphs:
            return ()
        self._pad(0, self.buckets[-1])
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for rows in sorted(self.buckets, reverse=True):
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):                               # load modules, size workspaces
                for _ in range(2):
                    self._forward(rows)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs[rows] = self._forward(rows)
            self.graphs[rows] = graph
        torch.cuda.synchronize(self.device)
        return self.captured

    # -- one step ------------------------------------------------------------------------------
    def decode(self, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Feed ``tokens [b]`` at ``positions [b]``, one per row of ``cache`` (a ``PagedCache``
        of this pool whose free blocks the caller has checked); logits ``[b, V]``, or None
        when this step must run eagerly (nothing was changed then)."""
        b = len(tokens)
        rows = self.bucket(b)
        if (rows is None or not isinstance(cache, PagedCache) or cache.pool is not self.pool
                or cache.batch_size != b or self.model.layer_observer is not None
                or max(cache.lengths) + 1 > self.width * self.pool.block_size):
            self.stats.eager += 1
            return None
        slots = cache.append([1] * b)                                   # claims blocks as needed
        self.slots[:b].copy_(slots)
        self.tables[:b].copy_(cache.block_index(range(b), self.width))
        self.lens[:b].copy_(torch.tensor(cache.lengths, dtype=torch.long))
        self.tokens[:b].copy_(tokens)
        self.positions[:b].copy_(positions)
        self._pad(b, rows)
        graph = self.graphs.get(rows)
        if graph is None:
            logits = self._forward(rows)
            self.stats.static += 1
        else:
            graph.replay()
            logits = self.outputs[rows]
            self.stats.replayed += 1
        return logits[:b].clone()
