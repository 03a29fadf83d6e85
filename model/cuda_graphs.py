"""Decode at fixed shapes, captured once per batch bucket as a CUDA graph and replayed.

A decode step of the dense cache (``model.kv_cache.KVCache``) changes shape every step
(the key length grows by one) and per batch (the rows), so a CUDA graph cannot follow it.
``DecodeGraphs`` runs the same ``GLMModel`` forward at fixed shapes instead:

* **Buckets.** Batch sizes are rounded up to a bucket (``1, 2, 4, 8, 16, 24, 32, 48, 64``,
  up to the largest batch Warmup announces). The rows above the batch are dummy rows whose
  results are discarded.
* **The arena.** One static key/value store ``[L, R, np, S, hn]`` (``R`` the largest bucket,
  ``S`` slots per row) and its slot flags ``[R, S]``. The batch being decoded lives there:
  a new batch is prefilled straight into it when it is free (``new_cache``, the engine's
  cache factory); otherwise its cache is copied in at its first step and its ``KVCache`` is
  rebound to views of the arena, so every later step of that batch reads and writes the arena in
  place. A batch whose rows change (rows leave, batches join) gets a new cache from the
  dense cache's own rules, and that one is copied in at its first step. A cache that was
  resident when another one moves in is first given its own copy (it stays correct, eager
  or graphed later).
* **Fixed attention width.** Every query attends over all ``S`` slots; the mask
  ``[B, 1, 1, S]`` carries the real length (slots not yet written, and padding, are
  invalid). The new key/value are written with ``index_copy_`` at a slot index read from
  a device tensor, so the same graph serves every step.

Static inputs (tokens, positions, mask, slot) and the per-bucket logits are the graph's
buffers; a step copies its inputs in, replays, and copies the logits out.

A step runs eagerly (``decode`` returns None and the engine's normal path runs) when the
batch is above the largest bucket, its length would pass ``S``, the cache is not the dense
``KVCache``, or per-layer timing is on (``GLMModel.layer_observer``). On a CPU the same
static function runs without capture (``capture=False``): that is how the tests pin the
static-shape decode to the normal one. Capture happens only on CUDA.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from model.glm import GLMModel
from model.kv_cache import KVCache

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
MAX_BUCKET = 512   # a pool announcing a larger batch is graphed up to this, eager above


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The buckets of a pool whose batches hold up to ``max_batch`` rows: the standard
    sizes below it, and ``max_batch`` itself (capped at ``MAX_BUCKET``)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    top = min(max_batch, MAX_BUCKET)
    return tuple(sorted({b for b in BUCKETS if b < top} | {top}))


def arena_bytes(model: GLMModel, rows: int, slots: int) -> int:
    """Bytes of an arena of ``rows x slots`` key/value slots for ``model`` (flags excluded)."""
    c = model.config
    heads_local = c.num_attention_heads // model.ctx.world_size
    element = torch.empty((), dtype=model.dtype).element_size()
    return 2 * c.num_layers * rows * heads_local * slots * c.head_dim * element


class DecodeArena:
    """The static keys/values ``[L, R, np, S, hn]`` and flags ``[R, S]`` that the resident
    batch's ``KVCache`` is a view of (rows ``0..b-1``)."""

    def __init__(self, model: GLMModel, rows: int, slots: int) -> None:
        c = model.config
        heads_local = c.num_attention_heads // model.ctx.world_size
        shape = (c.num_layers, rows, heads_local, slots, c.head_dim)
        self.keys = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.values = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.valid = torch.zeros((rows, slots), dtype=torch.bool, device=model.device)
        self.prefix = torch.zeros((rows, slots), dtype=torch.bool, device=model.device)
        self._resident: weakref.ref | None = None

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.valid.nbytes + self.prefix.nbytes

    def holds(self, cache: KVCache) -> bool:
        """``cache`` is the resident one and still a view of the arena."""
        return (self._resident is not None and self._resident() is cache
                and cache.keys.data_ptr() == self.keys.data_ptr() and cache.capacity == self.slots)

    def busy(self) -> bool:
        """A live cache is a view of the arena."""
        old = self._resident() if self._resident is not None else None
        return old is not None and old.keys.data_ptr() == self.keys.data_ptr()

    def lend(self, rows: int) -> KVCache:
        """An empty ``KVCache`` of ``rows`` rows that is a view of the arena (now resident)."""
        cache = KVCache.__new__(KVCache)
        cache.num_layers, cache.heads_local, cache.head_dim = self.keys.shape[0], self.keys.shape[2], self.keys.shape[4]
        self.values[:, :rows] = 0
        self.valid[:rows], self.prefix[:rows] = False, False
        cache.keys, cache.values = self.keys[:, :rows], self.values[:, :rows]
        cache.valid, cache.prefix = self.valid[:rows], self.prefix[:rows]
        cache.length = 0
        self._resident = weakref.ref(cache)
        return cache

    def adopt(self, cache: KVCache) -> None:
        """Copy ``cache`` (``b <= R`` rows, ``length < S``) into rows ``0..b-1`` and rebind it
        to views of the arena; the previous resident, if alive, gets its own copy first."""
        old = self._resident() if self._resident is not None else None
        if old is not None and old is not cache and old.keys.data_ptr() == self.keys.data_ptr():
            old.keys, old.values = old.keys.clone(), old.values.clone()
            old.valid, old.prefix = old.valid.clone(), old.prefix.clone()
        b, n = cache.batch_size, cache.length
        self.keys[:, :b, :, :n] = cache.keys[:, :, :, :n]                   # [L, b, np, n, hn]
        self.values[:, :b, :, :n] = cache.values[:, :, :, :n]
        self.values[:, :b, :, n:] = 0       # masked slots weigh 0: keep stale values finite
        self.valid[:b, :n], self.prefix[:b, :n] = cache.valid[:, :n], cache.prefix[:, :n]
        self.valid[:b, n:], self.prefix[:b, n:] = False, False
        cache.keys, cache.values = self.keys[:, :b], self.values[:, :b]     # [L, b, np, S, hn] views
        cache.valid, cache.prefix = self.valid[:b], self.prefix[:b]         # [b, S] views
        self._resident = weakref.ref(cache)


class _SlotWriter:
    """The cache the attention layers see in a static forward: writes the step's
    keys/values at the device slot index, returns all ``S`` slots of the bucket's rows."""

    def __init__(self, arena: DecodeArena, rows: int, slot: torch.Tensor) -> None:
        self.arena, self.rows, self.slot = arena, rows, slot

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.arena.keys[layer, : self.rows]                          # [B, np, S, hn]
        values = self.arena.values[layer, : self.rows]
        keys.index_copy_(2, self.slot, key)                                 # key [B, np, 1, hn]
        values.index_copy_(2, self.slot, value)
        return keys, values


@dataclass
class GraphStats:
    """How decode steps ran: replayed graphs, static shapes without capture, eager fallbacks,
    and cache copies into the arena."""

    replayed: int = 0
    static: int = 0
    eager: int = 0
    adopted: int = 0


class DecodeGraphs:
    """Bucketed static-shape decode for one model shard; ``capture()`` records a CUDA graph
    per bucket (CUDA only), ``decode`` runs a step or returns None for the eager path."""

    def __init__(self, model: GLMModel, *, max_batch: int, slots: int, capture: bool | None = None,
                 buckets: tuple[int, ...] | None = None) -> None:
        device = model.device
        if capture is None:
            capture = device.type == "cuda"
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
        if slots < 2:
            raise ValueError(f"slots per row must be >= 2, got {slots}")
        self.model, self.device, self.use_graphs = model, device, capture
        self.buckets = tuple(sorted(buckets)) if buckets else batch_buckets(max_batch)
        rows = self.buckets[-1]
        self.arena = DecodeArena(model, rows, slots)
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.mask = torch.ones((rows, 1, 1, slots), dtype=torch.bool, device=device)
        self.slot = torch.zeros((1,), dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}                          # bucket -> logits [B, V]
        self.stats = GraphStats()

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self.graphs))

    def nbytes(self) -> int:
        """Device bytes of the arena and the static inputs/outputs (graph pools not counted)."""
        static = sum(t.nbytes for t in (self.tokens, self.positions, self.mask, self.slot))
        return self.arena.nbytes() + static + sum(t.nbytes for t in self.outputs.values())

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket holding ``rows``, None above the largest."""
        return next((b for b in self.buckets if b >= rows), None)

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        """The engine's cache factory: a new batch that fits the arena while no live batch
        holds it is prefilled straight into it (no copy at its first step); any other gets
        a dense cache of its own (``GLMModel.new_cache``)."""
        if rows <= self.arena.rows and capacity <= self.arena.slots and not self.arena.busy():
            return self.arena.lend(rows)
        return self.model.new_cache(rows, capacity)

    # -- the static forward (eager on CPU, captured on CUDA) ----------------------------------
    def _forward(self, rows: int) -> torch.Tensor:
        cache = _SlotWriter(self.arena, rows, self.slot)
        logits = self.model(self.tokens[:rows], self.positions[:rows], self.mask[:rows], cache,
                            float_logits=False)  # [B, 1, V]
        return logits[:, -1]                                                # [B, V]

    def capture(self) -> tuple[int, ...]:
        """Record one graph per bucket, largest first, in one shared memory pool; a no-op
        when capture is off (CPU). The arena's contents are scratch until a batch moves in."""
        if not self.use_graphs:
            return ()
        self.mask.fill_(True)
        self.slot.zero_()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for rows in sorted(self.buckets, reverse=True):
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):                                   # load modules, size workspaces
                for _ in range(2):
                    self._forward(rows)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs[rows] = self._forward(rows)
            self.graphs[rows] = graph
        torch.cuda.synchronize(self.device)
        self.arena.valid.zero_()
        return self.captured

    # -- one step --------------------------------------------------------------------------
    def decode(self, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Feed ``tokens [b]`` at ``positions [b, 1]`` through the static path; logits
        ``[b, V]``, or None when this step must run eagerly (nothing was changed then)."""
        b = tokens.shape[0]
        rows = self.bucket(b)
        if (rows is None or type(cache) is not KVCache or cache.length + 1 > self.arena.slots
                or self.model.layer_observer is not None):
            self.stats.eager += 1
            return None
        if not self.arena.holds(cache):
            self.arena.adopt(cache)
            self.stats.adopted += 1
        slot = cache.length                                                 # claim one slot per row
        cache.valid[:, slot], cache.prefix[:, slot] = True, False
        cache.length = slot + 1
        self.slot.fill_(slot)
        self.tokens[:b, 0] = tokens.to(self.device)
        self.positions[:b] = positions.to(self.device)
        torch.logical_not(self.arena.valid[:b, None, None, :], out=self.mask[:b])   # [b, 1, 1, S]
        self.mask[b:rows] = True
        graph = self.graphs.get(rows)
        if graph is None:
            logits = self._forward(rows)
            self.stats.static += 1
        else:
            graph.replay()
            logits = self.outputs[rows]
            self.stats.replayed += 1
        return logits[:b].clone()
