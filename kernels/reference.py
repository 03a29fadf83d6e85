"""The torch reference that defines the quantized-weight format (GLM-130B's official scheme).

Official scheme (`quantization/layers.py` in THUDM/GLM-130B), per output row, symmetric absmax:

    scale = (W.abs().max(dim=-1).values / (2**(bits-1) - 1)).half()     # W is fp16
    q     = torch.round(W / scale[:, None]).to(torch.int8)               # fp16 division, half-to-even

INT8 values lie in [-127, 127], INT4 in [-7, 7]. INT4 is packed two per byte along the input dim,
even column in the HIGH nibble: `packed[:, j] = (q[:, 2j] << 4) | (q[:, 2j+1] & 0x0F)`.

Two deliberate differences from the official code, both invisible on every row the official code
handles correctly: an all-zero row (or group) quantizes to q = 0, scale = 0 instead of NaN, and
q is clamped to the representable range (the official code only leaves it when the fp16 scale is
subnormal, and then wraps around in the int8 cast).

Beyond the paper: `group_size` gives one scale per `group_size` input columns (same absmax math).

At the end, `paged_decode`: the result the paged decode attention kernels (kernels.cpu_paged,
kernels.cuda_paged) compute, written the plain way (each row's tokens gathered one by one).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight-only quantized `[out, in]` matrix in the canonical (official) layout."""

    values: torch.Tensor  # int8 [out, in] (8-bit) or [out, in // 2] packed (4-bit)
    scale: torch.Tensor  # fp16 [out] (official per-row) or [out, in // group_size] (group-wise)
    bits: int  # 8 or 4
    in_features: int
    group_size: int | None = None  # None = the official per-row scheme

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scale.numel() * self.scale.element_size()


def qmax(bits: int) -> int:
    """Largest magnitude of a quantized value: 127 for INT8, 7 for INT4."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return 2 ** (bits - 1) - 1


def _check_group(in_features: int, group_size: int | None) -> None:
    if group_size is not None and (group_size <= 0 or in_features % group_size):
        raise ValueError(f"group_size {group_size} must divide in_features {in_features}")


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Quantize a float `[out, in]` weight; bit-identical to the official code for `group_size=None`."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    limit = qmax(bits)
    _check_group(in_features, group_size)
    if bits == 4 and in_features % 2:
        raise ValueError(f"INT4 needs an even in_features, got {in_features}")
    w = weight.detach().to(torch.float16)  # the official model is .half() before quantizing
    if group_size is not None:
        w = w.reshape(out_features, in_features // group_size, group_size)  # [out, groups, g]
    # fp16 tensor / python int: computed in fp32, rounded to fp16, exactly as the official line.
    scale = w.abs().amax(dim=-1) / limit  # fp16 [out] or [out, groups]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # zero row: 0 / 1 = 0, not NaN
    q = torch.round(w / safe.unsqueeze(-1)).clamp_(-limit, limit).to(torch.int8)
    q = q.reshape(out_features, in_features)
    values = pack_int4(q) if bits == 4 else q
    return QuantizedWeight(values.contiguous(), scale.contiguous(), bits, in_features, group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 `[out, in]` with values in [-8, 7] -> int8 `[out, in // 2]`, even column in the high nibble."""
    if q.dtype != torch.int8 or q.shape[-1] % 2:
        raise ValueError("pack_int4 expects int8 with an even last dimension")
    high, low = q[..., 0::2], q[..., 1::2]
    return torch.bitwise_or(torch.bitwise_left_shift(high, 4), torch.bitwise_and(low, 0x0F))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 `[out, in // 2]` -> int8 `[out, in]`; arithmetic shifts sign-extend each nibble."""
    if packed.dtype != torch.int8:
        raise ValueError("unpack_int4 expects int8")
    high = torch.bitwise_right_shift(packed, 4)
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)
    return torch.stack((high, low), dim=-1).flatten(-2)  # [out, in/2, 2] -> [out, in]


def int_values(qw: QuantizedWeight) -> torch.Tensor:
    """The unpacked integer values, int8 `[out, in]`."""
    return unpack_int4(qw.values) if qw.bits == 4 else qw.values


def expanded_scale(qw: QuantizedWeight) -> torch.Tensor:
    """The scale as fp16 broadcastable against `[out, in]`: `[out, 1]` or `[out, in]`."""
    if qw.group_size is None:
        return qw.scale[:, None]
    return qw.scale.repeat_interleave(qw.group_size, dim=1)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """`[out, in]` weight in `dtype`: `q * scale` rounded once to `dtype`.

    q (|q| <= 127, 7 bits) times an fp16 scale (11 bits) is exact in fp32, so this is the correctly
    rounded product, the same value the official fp16 extraction kernel produces.
    """
    w = int_values(qw).to(torch.float32) * expanded_scale(qw).to(torch.float32)
    return w.to(dtype)


def quantized_matmul(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Reference semantics of every backend: `x @ dequantize(qw, x.dtype).T`, `[..., in] -> [..., out]`."""
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {qw.in_features}")
    x2 = x.reshape(-1, qw.in_features)  # [m, in]
    y = x2 @ dequantize(qw, x.dtype).t()  # [m, out]
    return y.reshape(*x.shape[:-1], qw.out_features)


def paged_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 ``[rows, heads, dim]``: each row's query ``q [rows, heads, dim]`` (already scaled by
    ``1/sqrt(dim)``) over its first ``lens[row]`` tokens, token ``t`` in slot
    ``tables[row, t // block_size] * block_size + t % block_size`` of one pool layer
    ``keys``/``values [heads, slots, dim]``; an fp32 softmax; a row of length 0 gives zeros."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    table_rows = tables.tolist()
    for r, n in enumerate(lens.tolist()):
        if n == 0:
            continue
        slots = torch.tensor([table_rows[r][t // block_size] * block_size + t % block_size for t in range(n)],
                             device=keys.device)
        k, v = keys[:, slots].float(), values[:, slots].float()              # [heads, n, dim]
        p = torch.softmax(torch.einsum("hd,hnd->hn", q[r].float(), k), dim=-1)
        out[r] = torch.einsum("hn,hnd->hd", p, v)
    return out
