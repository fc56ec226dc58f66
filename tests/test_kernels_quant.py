"""The shared group-quantized K/V layout (ctxzip.kernels.quant)."""

from __future__ import annotations

import pytest
import torch

from ctxzip.kernels import decode_quantized, quant
from ctxzip.kernels.reference import attention_ref


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 16), generator=g, dtype=torch.uint8)
    packed = quant.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 16 * bits // 8)
    assert torch.equal(quant.unpack_codes(packed, bits), codes)


def test_pack_layout_is_little_end_first():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert quant.pack_codes(codes, 2).tolist() == [[1 | (2 << 2) | (3 << 4)]]
    assert quant.pack_codes(torch.tensor([[5, 9]], dtype=torch.uint8), 4).tolist() == [[5 | (9 << 4)]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_quantize_error_bound(bits, axis):
    x = torch.randn(2, 2, 32, 16, generator=torch.Generator().manual_seed(1))
    qt = quant.quantize(x, bits=bits, group_size=8, axis=axis)
    xh = quant.dequantize(qt)
    # asymmetric min/max rounding: error <= half a step (+ fp16 rounding of scale/zero)
    step = (qt.scale.float().repeat_interleave(8, dim=2 if axis == "channel" else 3))
    assert torch.all((x - xh).abs() <= step / 2 + 1e-2 * step + 2e-3)
    assert qt.nbytes() == qt.codes.numel() + 2 * qt.scale.numel() * 2


def test_constant_groups_and_low_rank():
    x = torch.ones(1, 1, 8, 8) * 3.0
    qt = quant.quantize(x, bits=2, group_size=4, axis="channel")
    assert torch.allclose(quant.dequantize(qt), x)
    a, b = torch.randn(1, 1, 8, 2), torch.randn(1, 1, 2, 8)
    lr = qt.with_low_rank(a, b)
    torch.testing.assert_close(quant.dequantize(lr), x + a @ b)
    assert lr.rank == 2 and lr.nbytes() == qt.nbytes() + (16 + 16) * 4


def test_decode_quantized_reference_matches_dequantized_attention():
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
    q = torch.randn(1, 4, 8, generator=g)
    kq = quant.quantize(k, bits=4, group_size=8, axis="channel")
    vq = quant.quantize(v, bits=4, group_size=4, axis="token")
    out = decode_quantized(q, kq, vq)
    want = attention_ref(q[:, :, None], quant.dequantize(kq), quant.dequantize(vq), causal=False)[:, :, 0]
    torch.testing.assert_close(out, want)
    # 4-bit is close to full precision
    full = attention_ref(q[:, :, None], k, v, causal=False)[:, :, 0]
    assert (out - full).abs().max() < 0.2


def test_bad_quant_inputs():
    x = torch.randn(1, 1, 10, 8)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quant.quantize(x, bits=2, group_size=4, axis="channel")
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(x, bits=3, group_size=2)
    with pytest.raises(ValueError, match="axis"):
        quant.quantize(x, group_size=2, axis="row")
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize(x, group_size=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.pack_codes(torch.zeros(1, 6, dtype=torch.uint8), 2)
    qt = quant.quantize(x, bits=2, group_size=2, axis="channel")
    with pytest.raises(ValueError, match="low-rank"):
        qt.with_low_rank(torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 3, 8))
