"""The reference quantizer is the official GLM-130B scheme, bit for bit: hand-written golden
vectors, equality with a literal transcription of the official code, and the format's invariants."""

import numpy as np
import pytest
import torch

from kernels.reference import QuantizedWeight, dequantize, pack_int4, quantize, quantized_matmul, unpack_int4


# --- literal transcription of THUDM/GLM-130B quantization/layers.py (QuantizedColumnParallelLinear /
# QuantizedRowParallelLinear __init__) and of the CUDA int4WeightCompression kernel -----------------
def official_compress_int4_weight(weight: torch.Tensor) -> torch.Tensor:
    """int4WeightCompression: out[j] = (w[2j] << 4) | (w[2j+1] & 0x0F), on int8, in numpy."""
    w = weight.numpy().astype(np.int32)
    out = ((w[:, 0::2] << 4) | (w[:, 1::2] & 0x0F)) & 0xFF
    return torch.from_numpy(out.astype(np.uint8).view(np.int8))


def official_quantize(weight: torch.Tensor, weight_bit_width: int):
    weight_scale = (weight.abs().max(dim=-1).values / ((2 ** (weight_bit_width - 1)) - 1)).half()
    weight_q = torch.round(weight / weight_scale[:, None]).to(torch.int8)
    if weight_bit_width == 4:
        weight_q = official_compress_int4_weight(weight_q)
    return weight_q, weight_scale


def official_extract_weight_to_half(weight_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8WeightExtractionHalf: each value times its row's scale, in fp16."""
    return weight_q.half() * scale[:, None]


def glm_like_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """fp16, std 0.02 with a few large outliers per row and rows of very different magnitude."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    cols = torch.randint(0, in_features, (out_features, 4), generator=g)
    w.scatter_(1, cols, torch.randn(out_features, 4, generator=g) * 0.5)
    w *= torch.logspace(-1.5, 1, out_features)[:, None]  # fp16 scales stay normal (see the subnormal test)
    return w.half()


# --- golden vectors, worked out by hand ------------------------------------------------------------
def test_int8_golden_vector_fp16_division_and_half_to_even():
    # Row 0: absmax 1 -> scale = fp16(1/127) = 2**-7 * (1 + 8/1024) = 0.00787353515625.
    #   0.30322265625 / scale = 38.5116 -> fp16 38.5 -> half-to-even 38 (exact math would give 39);
    #   0.32666015625 / scale = 41.4884 -> fp16 41.5 -> 42 (exact math would give 41).
    # Row 1: absmax 127 -> scale 1: -63.5 -> -64, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    w = torch.tensor([[1.0, 0.30322265625, 0.32666015625, -0.30322265625, 0.0, -1.0],
                      [127.0, -63.5, 0.5, 1.5, 2.5, -2.5]], dtype=torch.float16)
    qw = quantize(w, 8)
    assert qw.values.tolist() == [[127, 38, 42, -38, 0, -127], [127, -64, 0, 2, 2, -2]]
    assert qw.scale.dtype == torch.float16
    assert qw.scale.float().tolist() == [0.00787353515625, 1.0]
    assert (qw.bits, qw.in_features, qw.out_features, qw.group_size) == (8, 6, 2, None)


def test_int4_golden_vector_and_nibble_order():
    # absmax 7 -> scale 1: q = [7, -4, 2, 0, 1, 0, -7, 5]  (-3.5 -> -4, 2.5 -> 2, -0.5 -> -0)
    w = torch.tensor([[7.0, -3.5, 2.5, -0.5, 1.0, 0.0, -7.0, 5.0]], dtype=torch.float16)
    qw = quantize(w, 4)
    # bytes: 0x7C, 0x20, 0x10, 0x95 (= -107 as int8): even column in the high nibble
    assert qw.values.tolist() == [[0x7C, 0x20, 0x10, 0x95 - 256]]
    assert qw.scale.float().tolist() == [1.0]
    assert unpack_int4(qw.values).tolist() == [[7, -4, 2, 0, 1, 0, -7, 5]]


def test_pack_known_byte_pattern():
    q = torch.tensor([[-7, 5, 0, -1, -8, 7]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.tolist() == [[-107, 0x0F, -128 + 0x07]]
    assert torch.equal(unpack_int4(packed), q)


def test_pack_unpack_round_trip_all_nibbles():
    a, b = torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij")
    q = torch.stack((a.flatten(), b.flatten()), dim=1).to(torch.int8).reshape(1, -1)  # [1, 512]
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert torch.equal(pack_int4(q), official_compress_int4_weight(q))


# --- equality with the official code on random data -----------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_official_transcription(bits, seed):
    w = glm_like_weight(192, 512, seed)
    official_q, official_scale = official_quantize(w, bits)
    qw = quantize(w, bits)
    assert qw.values.dtype == torch.int8 and qw.scale.dtype == torch.float16
    assert torch.equal(qw.values, official_q)
    assert torch.equal(qw.scale.view(torch.int16), official_scale.view(torch.int16))  # byte for byte


def test_float32_input_is_cast_to_fp16_first():
    w = glm_like_weight(64, 256, 3).float() * 1.0001
    official_q, official_scale = official_quantize(w.half(), 8)
    qw = quantize(w, 8)
    assert torch.equal(qw.values, official_q) and torch.equal(qw.scale, official_scale)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_equals_official_extraction(bits):
    w = glm_like_weight(96, 256, 4)
    qw = quantize(w, bits)
    expected = official_extract_weight_to_half(unpack_int4(qw.values) if bits == 4 else qw.values, qw.scale)
    assert torch.equal(dequantize(qw, torch.float16), expected)


# --- invariants -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (8, 128), (4, 128)])
def test_zero_row_gives_zeros_not_nan(bits, group_size):
    w = glm_like_weight(8, 256, 5)
    w[3] = 0
    w[5, :128] = 0  # a zero group inside a non-zero row
    qw = quantize(w, bits, group_size)
    deq = dequantize(qw, torch.float32)
    assert torch.isfinite(deq).all() and torch.isfinite(qw.scale).all()
    assert (deq[3] == 0).all() and (qw.scale[3] == 0).all()
    official_q, official_scale = official_quantize(w[[0, 1, 2, 4, 5, 6, 7]], bits)
    if group_size is None:  # every other row stays byte-identical to the official code
        rows = [0, 1, 2, 4, 5, 6, 7]
        assert torch.equal(qw.values[rows], official_q) and torch.equal(qw.scale[rows], official_scale)


def test_subnormal_scale_is_clamped_where_the_official_code_wraps():
    # absmax 1e-5 -> absmax / 127 = 7.9e-8 rounds to fp16's smallest subnormal 5.96e-8, so
    # 1e-5 / scale = 168 leaves [-127, 127]: the official int8 cast wraps it, we clamp it.
    w = torch.tensor([[1e-5, -0.5e-5, 0.25e-5, 0.0]], dtype=torch.float16)
    assert torch.round(w / official_quantize(w, 8)[1][:, None]).abs().max() > 127
    qw = quantize(w, 8)
    assert qw.values.tolist() == [[127, -84, 42, 0]] and qw.scale.item() == 2**-24


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (8, 128), (4, 64)])
def test_value_ranges(bits, group_size):
    qw = quantize(glm_like_weight(64, 512, 6), bits, group_size)
    q = unpack_int4(qw.values) if bits == 4 else qw.values
    limit = 2 ** (bits - 1) - 1
    assert int(q.min()) == -limit or int(q.max()) == limit
    assert int(q.abs().max()) <= limit


@pytest.mark.parametrize("bits", [8, 4])
def test_group_wise_round_trip(bits):
    w = glm_like_weight(32, 512, 7)
    qw = quantize(w, bits, group_size=128)
    assert qw.scale.shape == (32, 4) and qw.group_size == 128
    assert qw.values.shape == (32, 512 if bits == 8 else 256)
    # each group is its own absmax quantization: re-quantizing a group alone gives the same bytes
    for g in range(4):
        alone = quantize(w[:, g * 128:(g + 1) * 128], bits)
        assert torch.equal(qw.scale[:, g], alone.scale)
        assert torch.equal(unpack_int4(qw.values)[:, g * 128:(g + 1) * 128] if bits == 4
                           else qw.values[:, g * 128:(g + 1) * 128],
                           unpack_int4(alone.values) if bits == 4 else alone.values)
    # error per element: half a step, plus half an fp16 ulp of the quotient (|q| < 128: 2**-5 step)
    step = qw.scale.float().repeat_interleave(128, dim=1)
    assert ((dequantize(qw, torch.float32) - w.float()).abs() <= step * (0.5 + 2**-5) + 1e-7).all()


def test_group_wise_is_more_accurate_than_per_row():
    w = glm_like_weight(64, 1024, 8)
    err = {g: (dequantize(quantize(w, 4, g), torch.float32) - w.float()).norm() for g in (None, 128)}
    assert err[128] < err[None]


def test_quantized_matmul_is_dequantize_then_matmul():
    w = glm_like_weight(48, 256, 9)
    qw = quantize(w, 4)
    x = torch.randn(2, 3, 256, dtype=torch.float16)
    y = quantized_matmul(x, qw)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float16
    assert torch.equal(y, (x.reshape(6, 256) @ dequantize(qw, torch.float16).t()).reshape(2, 3, 48))


def test_nbytes_and_validation():
    qw = quantize(glm_like_weight(16, 256, 10), 4, 128)
    assert isinstance(qw, QuantizedWeight)
    assert qw.nbytes == 16 * 128 + 16 * 2 * 2
    with pytest.raises(ValueError):
        quantize(torch.zeros(4, 100), 8, group_size=64)
    with pytest.raises(ValueError):
        quantize(torch.zeros(4, 8), 3)
