"""Block-paged KV cache: one preallocated pool per rank, block tables per row.

The pool (``BlockPool``) holds every layer's keys and values as
``[layers, np_local, blocks * block_size, head_dim]``: a *slot* is one token's key
(or value) of every head of one layer, and block ``b`` owns slots
``b*block_size .. (b+1)*block_size - 1``. A row's token ``k`` lives in slot
``table[k // block_size] * block_size + k % block_size``. Blocks are taken as a row's
tokens are written and given back the moment the row leaves; rows that share a context
(beams, ``n`` samples) share its blocks by reference count, and a shared block is copied
before a row writes into it (copy on write). Nothing is ever copied when a row joins or
leaves a batch: a batch's ``PagedCache`` is only its rows' tables.

A forward over such rows is *packed*: the tokens of every row in one ``[1, n]`` sequence,
with no padding (``PagedStep``): rows that decode feed one token each, rows being admitted
feed their whole prompt (``context + sop + generated``) in the same forward. Attention,
exactly GLM's (docs/model.md, "Masks"):

* an admitted row attends over its own new tokens only (its cache was empty): context
  tokens see the whole context, ``sop`` and generated tokens the context and themselves
  causally;
* a decoding row's one query sees every cached token of its row (its context and what it
  generated, all before it), gathered from the pool through its table.

Keys are cached after rotary, as the official code does. The allocation is deterministic
(lowest free block first), so every rank of a pool, running the same calls in the same
order, holds the same tables.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from kernels import cpu_paged, cuda_paged
from model.kv_footprint import blocks_for

DEFAULT_BLOCK_SIZE = 16


class PoolExhausted(RuntimeError):
    """The pool has fewer free blocks than a write needs (nothing was taken)."""


class BlockPool:
    """One rank's KV memory in fixed-size blocks, with reference counts."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, heads_local: int, head_dim: int,
                 *, dtype: torch.dtype, device=None, scratch: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs >= 1 block of >= 1 slot, got {num_blocks} x {block_size}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.heads_local, self.head_dim = heads_local, head_dim
        # ``scratch``: one more block, never allocated, where the padding rows of a static-shape
        # step (model.cuda_graphs) write; it is zeroed, and only ever holds finite values.
        self.scratch_block = num_blocks if scratch else None
        self.total_blocks = num_blocks + int(scratch)
        shape = (num_layers, heads_local, self.total_blocks * block_size, head_dim)
        # Untouched pages of a CPU pool are not resident: memory grows with the blocks in use.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks))       # a heap: the lowest free block goes first
        if scratch:
            self._zero([num_blocks])

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def block_bytes(self) -> int:
        """Bytes of keys and values of one block (every layer)."""
        return self.nbytes() // self.total_blocks

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (reference count 1), lowest first; ``PoolExhausted`` when fewer are free."""
        if n > len(self._free):
            raise PoolExhausted(f"KV pool: {n} blocks needed, {len(self._free)} of {self.num_blocks} free")
        out = [heapq.heappop(self._free) for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        if out:            # attention reads whole blocks (masked past a row's length): finite values only
            self._zero(out)
        return out

    def _zero(self, blocks: list[int]) -> None:
        """Zero ``blocks`` of every layer, one block at a time: a block of the demo's pool is
        below ATen's parallel grain, so it runs on this thread, where a single ``index_fill_``
        (or one slice of several blocks) wakes the sleeping OpenMP thread: 8-44 us for 1-8
        blocks against 21-154 (``index_fill_``) and 126-133 (a slice of 3 or 8)."""
        for t in (self.keys, self.values):
            view = self.blocks_view(t)
            for b in blocks:
                view[:, :, b].zero_()

    def blocks_view(self, t: torch.Tensor) -> torch.Tensor:
        """``keys``/``values`` (or one layer of them) seen as ``[..., np, blocks, block_size, hn]``."""
        return t.view(*t.shape[:-2], self.total_blocks, self.block_size, self.head_dim)

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference to each of ``blocks``."""
        for b in blocks:
            if self.refs[b] < 1:
                raise ValueError(f"KV pool: block {b} is free, it cannot be shared")
            self.refs[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """One reference fewer to each of ``blocks``; a block nobody references is free again."""
        for b in blocks:
            if self.refs[b] < 1:
                raise ValueError(f"KV pool: block {b} released twice")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                heapq.heappush(self._free, b)

    def copy_block(self, src: int, dst: int) -> None:
        """Every layer's keys and values of block ``src`` into block ``dst``."""
        bs = self.block_size
        for t in (self.keys, self.values):
            t[:, :, dst * bs:(dst + 1) * bs].copy_(t[:, :, src * bs:(src + 1) * bs])


class PagedCache:
    """A batch's rows in a ``BlockPool``: per row its block table and cached token count.

    It owns one reference to every block in its tables. ``select`` and ``concatenate``
    move rows into a new cache (the old one is left empty); ``release`` gives every
    reference back. The engine's ``Batch`` uses it through ``model.kv_cache.DecodeCache``'s
    ``select``/``concatenate``/``reserve``/``length``/``batch_size``/``nbytes``.
    """

    def __init__(self, pool: BlockPool, tables: list[list[int]] | None = None,
                 lengths: list[int] | None = None) -> None:
        self.pool = pool
        self.tables: list[list[int]] = tables or []
        self.lengths: list[int] = lengths or []

    # -- what the engine reads ---------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.tables)

    @property
    def length(self) -> int:
        """The longest row's cached tokens."""
        return max(self.lengths, default=0)

    @property
    def blocks(self) -> int:
        """Block references held (a shared block counts once per row)."""
        return sum(len(t) for t in self.tables)

    def nbytes(self) -> int:
        """Bytes of keys and values of the blocks held (a shared block once per row)."""
        return self.blocks * self.pool.block_bytes

    def reserve(self, extra: int) -> None:
        """Nothing: blocks are taken as tokens are written."""

    # -- rows in and out -----------------------------------------------------------------------
    def blocks_to_append(self, counts: Sequence[int]) -> int:
        """Fresh blocks that writing ``counts[i]`` more tokens to row ``i`` takes (a shared
        last block that would be written counts too: it is copied first)."""
        bs, need, refs = self.pool.block_size, 0, {}
        for table, length, n in zip(self.tables, self.lengths, counts):
            need += blocks_for(length + n, bs) - len(table)
            if n and length % bs:                  # as ``append`` does, in its order
                last = table[-1]
                held = refs.get(last, self.pool.refs[last])
                if held > 1:
                    need += 1
                    refs[last] = held - 1
        return need

    def append(self, counts: Sequence[int]) -> torch.Tensor:
        """Claim ``counts[i]`` new slots at the end of row ``i``; the pool slots, row after row,
        as a long tensor. Takes every block first (``PoolExhausted``: nothing changed)."""
        need = self.blocks_to_append(counts)
        fresh = self.pool.allocate(need)[::-1]        # popped lowest first
        bs, slots = self.pool.block_size, []
        for row, n in enumerate(counts):
            if not n:
                continue
            table, length = self.tables[row], self.lengths[row]
            if length % bs and self.pool.refs[table[-1]] > 1:        # copy on write
                dst = fresh.pop()
                self.pool.copy_block(table[-1], dst)
                self.pool.release([table[-1]])
                table[-1] = dst
            while len(table) < blocks_for(length + n, bs):
                table.append(fresh.pop())
            slots.extend(table[k // bs] * bs + k % bs for k in range(length, length + n))
            self.lengths[row] = length + n
        assert not fresh, "blocks_to_append counted more blocks than append used"
        return torch.tensor(slots, dtype=torch.long)

    def add_rows(self, n: int) -> None:
        """``n`` empty rows at the end."""
        self.tables += [[] for _ in range(n)]
        self.lengths += [0] * n

    def select(self, rows: torch.Tensor | Sequence[int]) -> "PagedCache":
        """A cache of ``rows`` (in that order; a repeated row shares its blocks); this one is
        left empty and the rows not selected give their blocks back."""
        rows = [int(r) for r in rows]
        out = PagedCache(self.pool, [list(self.tables[r]) for r in rows], [self.lengths[r] for r in rows])
        for table in out.tables:
            self.pool.share(table)
        self.release()
        return out

    @staticmethod
    def concatenate(caches: Sequence["PagedCache"]) -> "PagedCache":
        """The rows of ``caches`` in order, in one cache (each source is left empty)."""
        if not caches:
            raise ValueError("nothing to concatenate")
        out = PagedCache(caches[0].pool)
        for c in caches:
            if c.pool is not out.pool:
                raise ValueError("caches of different pools cannot be concatenated")
            out.tables += c.tables
            out.lengths += c.lengths
            c.tables, c.lengths = [], []
        return out

    def release(self) -> None:
        """Give back every block reference (idempotent)."""
        for table in self.tables:
            self.pool.release(table)
        self.tables, self.lengths = [], []

    def block_index(self, rows: Sequence[int], blocks: int) -> torch.Tensor:
        """``[len(rows), blocks]`` the tables of ``rows``, each padded with its last block."""
        return torch.tensor([t + [t[-1]] * (blocks - len(t)) for t in (self.tables[r] for r in rows)],
                            dtype=torch.long)


class PromptCache:
    """The contexts this pool prefilled lately, kept for the next row with the same one.

    GLM's context attends bidirectionally, so a context token's key and value depend on the
    whole context: what can be reused is a whole context, never a prefix (docs/model.md,
    "Masks"). An entry, keyed by the context's ids and its blank (``key``), holds one
    reference to each block of the context's ``length`` tokens; a row admitted with the same
    key and nothing generated starts from those blocks (shared; its first write copies the
    last, partly filled one) and feeds only ``sop``, as a decode row does. The full blocks are
    shared with the row that prefilled them (it never writes into them again); the last,
    partly filled one is copied for the entry, so that row never copies a block because of
    the cache: the blocks the cache adds to what the rows hold are its own, and
    ``make_room`` can always give them back. Entries are
    dropped least recently used first when a step needs their blocks (``make_room``) and at
    most ``max_entries`` are kept. Every rank runs the same calls, so every rank holds the
    same entries."""

    def __init__(self, pool: BlockPool, max_entries: int = 256) -> None:
        self.pool, self.max_entries = pool, max_entries
        self.entries: dict[tuple, tuple[list[int], int]] = {}     # insertion order = least recent first
        self.hits = 0                                                # rows that read an entry

    @staticmethod
    def key(blank) -> tuple:
        return (tuple(blank.context), blank.mask_pos, blank.use_gmask)

    def touch(self, key: tuple) -> None:
        """A step reads ``key``'s entry: it becomes the most recent (and counts as a hit)."""
        self.entries[key] = self.entries.pop(key)
        self.hits += 1

    def insert(self, key: tuple, table: Sequence[int], length: int) -> None:
        """Keep the blocks of a row's first ``length`` tokens (its context) under ``key``: its
        full blocks shared, the partly filled last one copied (skipped when no block is free)."""
        if key in self.entries or length < 1:
            return
        full, partial = divmod(length, self.pool.block_size)
        blocks = list(table[:full])
        if partial:
            if self.pool.free_blocks < 1:
                return
            [copy] = self.pool.allocate(1)
            self.pool.copy_block(table[full], copy)
            blocks.append(copy)
        self.pool.share(blocks[:full])
        self.entries[key] = (blocks, length)
        while len(self.entries) > self.max_entries:
            self._drop(next(iter(self.entries)))

    def make_room(self, need: int, keep: Sequence[tuple] = ()) -> int:
        """Drop the least recent entries (not those of ``keep``) while fewer than ``need`` blocks
        are free; the free blocks then."""
        keep = set(keep)
        for key in [k for k in self.entries if k not in keep]:
            if self.pool.free_blocks >= need:
                break
            self._drop(key)
        return self.pool.free_blocks

    def _drop(self, key: tuple) -> None:
        blocks, _ = self.entries.pop(key)
        self.pool.release(blocks)

    def clear(self) -> None:
        for key in list(self.entries):
            self._drop(key)

    @property
    def blocks(self) -> int:
        """Block references the entries hold."""
        return sum(len(b) for b, _ in self.entries.values())


DECODE_CHUNK_BYTES = 2 << 20   # bytes of gathered keys one chunk of paged decode attention reads


@dataclass
class PagedStep:
    """What the layers of one packed forward need: where every token's key and value go,
    and how each row attends.

    Tokens are packed row after row: the ``decode`` rows first (one token each), then the
    admitted rows (``prefill``: their whole prompt). ``last`` indexes each row's last token
    (the one whose logits are wanted), in the same row order.
    """

    pool: BlockPool
    slots: torch.Tensor                    # [n] pool slot of each packed token
    cache: PagedCache
    decode_lengths: list[int]              # cached tokens of each decode row after this step's write
    prefill: list[tuple[int, int, int]]    # (packed offset, tokens, context tokens) of each admitted row
    last: torch.Tensor                     # [rows] packed index of each row's last token
    kernel: bool = False                   # decode rows attend through kernels.cpu_paged / cuda_paged
    _tables: tuple[torch.Tensor, torch.Tensor] | None = None
    _chunks: list | None = None

    @classmethod
    def build(cls, cache: PagedCache, decode_rows: int, prefill: Sequence[tuple[int, int]]) -> "PagedStep":
        """Claim the slots of one step of ``cache``: its first ``decode_rows`` rows feed one
        token, the next ``len(prefill)`` rows (empty so far) their ``(tokens, context tokens)``.
        Raises ``PoolExhausted`` before taking anything when the pool is short."""
        if decode_rows + len(prefill) != cache.batch_size:
            raise ValueError(f"step of {decode_rows} + {len(prefill)} rows over a cache of {cache.batch_size}")
        pool = cache.pool
        slots = cache.append([1] * decode_rows + [n for n, _ in prefill]).to(pool.device)
        lengths = cache.lengths[:decode_rows]
        kernel = decode_rows > 0 and decode_kernel(pool)
        spans, offset, last = [], decode_rows, list(range(decode_rows))
        for n, context in prefill:
            spans.append((offset, n, context))
            offset += n
            last.append(offset - 1)
        return cls(pool, slots, cache, lengths, spans, torch.tensor(last, device=pool.device), kernel)

    def decode_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode rows' block tables ``[rows, most blocks]`` (padded with each row's last
        block) and cached lengths ``[rows]``, built once per step."""
        if self._tables is None:
            rows = range(len(self.decode_lengths))
            most = max(blocks_for(n, self.pool.block_size) for n in self.decode_lengths)
            self._tables = (self.cache.block_index(rows, most).to(self.pool.device),
                            torch.tensor(self.decode_lengths, dtype=torch.long, device=self.pool.device))
        return self._tables

    def decode_chunks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The torch path's chunks: rows sorted by length, about ``DECODE_CHUNK_BYTES`` of fp32
        keys each: (rows, their blocks ``[r, b]``, masked ``[r, b*bs]``), built once per step."""
        if self._chunks is None:
            pool, lengths = self.pool, self.decode_lengths
            order = sorted(range(len(lengths)), key=lambda r: lengths[r])
            per_slot = pool.heads_local * pool.head_dim * 4          # gathered as fp32
            self._chunks, i = [], 0
            while i < len(order):
                j = i + 1
                while j < len(order) and (j + 1 - i) * lengths[order[j]] * per_slot <= DECODE_CHUNK_BYTES:
                    j += 1
                blocks = blocks_for(lengths[order[j - 1]], pool.block_size)
                rows = order[i:j]
                index = self.cache.block_index(rows, blocks).to(pool.device)               # [r, b]
                lens = torch.tensor([lengths[r] for r in rows], device=pool.device)
                masked = torch.arange(blocks * pool.block_size, device=pool.device)[None, :] >= lens[:, None]
                self._chunks.append((torch.tensor(rows, device=pool.device), index, masked))
                i = j
        return self._chunks

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``layer``'s keys/values ``[n, np, hn]`` of the packed tokens in their slots."""
        self.pool.keys[layer].index_copy_(1, self.slots, key.transpose(0, 1))
        self.pool.values[layer].index_copy_(1, self.slots, value.transpose(0, 1))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coeff: float,
               attention: Callable) -> torch.Tensor:
        """Attention of every packed query ``q [n, np, hn]`` (``k``/``v``: this step's own keys and
        values, already written); ``[n, np*hn]``. ``attention(q, k, v, mask, coeff)`` is the
        dense function for the admitted rows (``[1, np, s, hn]``, mask ``[1, 1, s, s]``)."""
        n, heads, d = q.shape
        out = torch.empty((n, heads * d), dtype=q.dtype, device=q.device)
        if self.decode_lengths:
            self._decode(layer, q, coeff, out)
        for offset, s, context in self.prefill:
            mask = prefill_mask(s, context, q.device)                                 # [1, 1, s, s]
            part = [t[offset:offset + s].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]   # [1, np, s, hn]
            out[offset:offset + s] = attention(*part, mask, coeff)[0].transpose(0, 1).reshape(s, heads * d)
        return out

    def _decode(self, layer: int, q: torch.Tensor, coeff: float, out: torch.Tensor) -> None:
        """One query per decode row over its cached tokens: through ``kernels.cpu_paged`` or
        ``kernels.cuda_paged`` where one serves the pool (keys and values read where they lie);
        otherwise chunk by chunk of rows of similar length, the chunk's blocks gathered from the
        pool (whole blocks, fp32, while they are in cache), then the official arithmetic as in
        ``model.glm.decode_attention``."""
        d = self.pool.head_dim
        fill = -10000.0 * coeff
        scale = 1.0 / math.sqrt(d)
        rows = len(self.decode_lengths)
        if self.kernel:
            tables, lens = self.decode_tables()
            kernel = cpu_paged if self.pool.device.type == "cpu" else cuda_paged
            res = kernel.paged_decode(q[:rows].float() * scale, self.pool.keys[layer],
                                      self.pool.values[layer], tables, lens, self.pool.block_size)
            out[:rows] = res.view(rows, -1)
            return
        for rows, index, masked in self.decode_chunks():
            query = q.index_select(0, rows).float().mul_(scale)
            res = gathered_attention(self.pool, layer, query, index, masked, fill)
            out.index_copy_(0, rows, res.to(out.dtype))


def gathered_attention(pool: BlockPool, layer: int, query: torch.Tensor, index: torch.Tensor,
                       masked: torch.Tensor, fill: float) -> torch.Tensor:
    """The torch path of decode attention: each row's query ``[r, np, hn]`` (fp32, scaled)
    over the blocks ``index [r, b]`` of ``layer``, gathered whole as fp32, with the slots
    ``masked [r, b*bs]`` scored ``fill``; the official arithmetic (``model.glm.decode_attention``):
    fp32 ``[r, np*hn]``."""
    keys = pool.blocks_view(pool.keys[layer])                                         # [np, blocks, bs, hn]
    values = pool.blocks_view(pool.values[layer])
    r, heads, d = query.shape
    w = masked.shape[1]
    query = query.transpose(0, 1).reshape(heads * r, 1, d)
    k = keys.index_select(1, index.reshape(-1)).float().view(heads * r, w, d)         # [np*r, w, hn]
    v = values.index_select(1, index.reshape(-1)).float().view(heads * r, w, d)
    scores = torch.bmm(query, k.transpose(1, 2))                                      # [np*r, 1, w]
    scores.view(heads, r, w).masked_fill_(masked[None], fill)
    return torch.bmm(torch.softmax(scores, dim=-1), v).view(heads, r, d).transpose(0, 1).reshape(r, heads * d)


def decode_kernel(pool: BlockPool) -> bool:
    """A kernel that reads ``pool`` in place serves decode attention on its device
    (``kernels.cpu_paged`` on a CPU, ``kernels.cuda_paged`` on a GPU)."""
    if pool.device.type == "cpu":
        return cpu_paged.supports(pool.keys.dtype)
    return cuda_paged.supports(pool.device, pool.keys.dtype, pool.head_dim)


def prefill_mask(s: int, context: int, device=None) -> torch.Tensor:
    """GLM's mask ``[1, 1, s, s]`` (True = masked) of a row's ``s`` new tokens of which the
    first ``context`` are the context: query ``i`` sees key ``j`` iff ``j < context or j <= i``."""
    i = torch.arange(s, device=device)
    visible = (i[None, :] < context) | (i[None, :] <= i[:, None])
    return ~visible[None, None]
