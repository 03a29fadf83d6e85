"""Key/value cache for incremental decoding, with GLM's prefix-LM visibility.

Every row of a batch owns the same number of slots; a row's tokens sit in its
slots in temporal order, possibly after padding slots (left padding, or the gap
left when batches of different lengths are concatenated). Two per-slot flags
define attention for every query, prefill or decode alike:

* ``valid``  – the slot holds a real token of this row;
* ``prefix`` – the slot is a context token (before ``sop``), visible to every
  query of the row, earlier or later (the bidirectional prefix).

A query in slot ``q`` sees key slot ``j`` iff ``valid[j] and (prefix[j] or j <= q)``.
Context queries thus see the whole context and nothing generated; ``sop`` and
generated tokens see the context and generated tokens up to themselves.
Keys are cached after rotary embedding, as the official code does.

``DecodeCache`` is what the decoding engine (``model.engine``) and the attention
layers need of a cache; ``KVCache`` is today's dense implementation of it.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import torch

C = TypeVar("C", bound="DecodeCache")


class DecodeCache(Protocol):
    """A batch's keys/values as the engine and the attention layers use them.

    Created empty for ``rows`` rows by a factory ``(rows, capacity) -> cache``; every
    call claims slots for all rows at once, so row ``i`` stays the batch's row ``i``.
    """

    @property
    def length(self) -> int:
        """Slots every row holds now (the key length of the next mask)."""

    @property
    def batch_size(self) -> int:
        """Rows held."""

    def nbytes(self) -> int:
        """Bytes of keys and values held."""

    def extend(self, valid: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Claim ``s`` new slots per row with flags ``valid``/``prefix`` ``[b, s]``; the
        attention mask ``[b, 1, s, length]`` (True = masked) of queries in them."""

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``layer``'s keys/values ``[b, np, s, hn]`` of the last claimed slots; all
        keys/values in use ``[b, np, length, hn]``."""

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more slots per row now."""

    def select(self: C, rows: torch.Tensor | list[int]) -> C:
        """A cache of ``rows`` (in that order; rows may repeat: beam search)."""

    @staticmethod
    def concatenate(caches: Sequence[C]) -> C:
        """One cache of the rows of ``caches``, in order."""


class KVCache:
    """The dense ``DecodeCache``: per-layer keys/values ``[b, np_local, capacity, hn]``
    plus slot flags ``[b, capacity]``, every row padded to the same length."""

    def __init__(self, num_layers: int, batch: int, capacity: int, heads_local: int,
                 head_dim: int, *, dtype: torch.dtype, device=None) -> None:
        self.num_layers = num_layers
        self.heads_local = heads_local
        self.head_dim = head_dim
        shape = (num_layers, batch, heads_local, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.prefix = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.length = 0  # slots in use, the same for every row

    @property
    def batch_size(self) -> int:
        """Rows held."""
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        """Slots allocated per row (``>= length``)."""
        return self.valid.shape[1]

    def nbytes(self) -> int:
        """Bytes of keys and values allocated."""
        return self.keys.nbytes + self.values.nbytes

    def reserve(self, extra: int) -> None:
        """Make room for exactly ``extra`` more slots per row now (no doubling), so a
        caller that budgets exact slots never sees the cache grow during decoding."""
        pad = self.length + extra - self.capacity
        if pad <= 0:
            return
        self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, pad))      # [L, b, np, cap, hn]
        self.values = torch.nn.functional.pad(self.values, (0, 0, 0, pad))
        self.valid = torch.nn.functional.pad(self.valid, (0, pad))          # [b, cap]
        self.prefix = torch.nn.functional.pad(self.prefix, (0, pad))

    def _grow(self, needed: int) -> None:
        self.reserve(max(needed, 2 * self.capacity) - self.length)

    def extend(self, valid: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Claim ``s`` new slots for every row; returns the boolean attention mask
        ``[b, 1, s, length]`` (True = masked) for queries in those slots.

        ``valid``/``prefix`` are ``[b, s]`` flags of the new tokens.
        """
        b, s = valid.shape
        if b != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows, got {b}")
        start, end = self.length, self.length + s
        if end > self.capacity:
            self._grow(end)
        self.valid[:, start:end] = valid
        self.prefix[:, start:end] = prefix
        self.length = end
        return self.attention_mask(start, end)

    def attention_mask(self, start: int, end: int) -> torch.Tensor:
        """Mask ``[b, 1, end-start, length]`` for queries in slots ``start..end-1``."""
        n = self.length
        device = self.valid.device
        q = torch.arange(start, end, device=device)[:, None]       # [s, 1]
        k = torch.arange(n, device=device)[None, :]                 # [1, n]
        causal = k <= q                                             # [s, n]
        visible = self.valid[:, None, :n] & (self.prefix[:, None, :n] | causal[None])  # [b, s, n]
        return ~visible[:, None]                                    # [b, 1, s, n]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's ``[b, np, s, hn]`` keys/values of ``layer`` into the last
        ``s`` claimed slots; return all keys/values in use ``[b, np, length, hn]``."""
        s = key.shape[2]
        start = self.length - s
        self.keys[layer, :, :, start:self.length] = key
        self.values[layer, :, :, start:self.length] = value
        return self.keys[layer, :, :, : self.length], self.values[layer, :, :, : self.length]

    def select(self, rows: torch.Tensor | list[int]) -> "KVCache":
        """A cache holding ``rows`` of this one (in that order; rows may repeat)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        out = KVCache.__new__(KVCache)
        out.num_layers, out.heads_local, out.head_dim = self.num_layers, self.heads_local, self.head_dim
        out.keys = self.keys.index_select(1, rows)
        out.values = self.values.index_select(1, rows)
        out.valid = self.valid.index_select(0, rows)
        out.prefix = self.prefix.index_select(0, rows)
        out.length = self.length
        return out

    @staticmethod
    def concatenate(caches: list["KVCache"]) -> "KVCache":
        """Stack the rows of several caches; shorter ones are left-padded with
        invalid slots so every row keeps its tokens in temporal order."""
        if not caches:
            raise ValueError("nothing to concatenate")
        first = caches[0]
        length = max(c.length for c in caches)

        def left_pad(t: torch.Tensor, c: "KVCache", dim: int) -> torch.Tensor:
            t = t.narrow(dim, 0, c.length)
            pad = [0, 0] * (t.dim() - 1 - dim) + [length - c.length, 0]
            return torch.nn.functional.pad(t, pad)

        out = KVCache.__new__(KVCache)
        out.num_layers, out.heads_local, out.head_dim = first.num_layers, first.heads_local, first.head_dim
        out.keys = torch.cat([left_pad(c.keys, c, 3) for c in caches], dim=1)
        out.values = torch.cat([left_pad(c.values, c, 3) for c in caches], dim=1)
        out.valid = torch.cat([left_pad(c.valid, c, 1) for c in caches], dim=0)
        out.prefix = torch.cat([left_pad(c.prefix, c, 1) for c in caches], dim=0)
        out.length = length
        return out
