"""Every Triton kernel against its torch reference.

Without a GPU the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set
before the kernels are decorated (i.e. before ``ctxzip.kernels.triton_*`` is imported), which
this module does at import time. Shapes are tiny because the interpreter is slow. bf16 is not
tested here (``tl.dot`` on bf16 is wrong in the interpreter); fp32 and fp16 are.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    if any(m.startswith("ctxzip.kernels.triton_") for m in sys.modules) and os.environ.get(
        "TRITON_INTERPRET", "0"
    ) in ("", "0"):
        pytest.skip("Triton kernels were compiled before TRITON_INTERPRET was set", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from ctxzip.kernels import quant  # noqa: E402
from ctxzip.kernels.reference import (  # noqa: E402
    attention_mass_ref,
    attention_ref,
    decode_quantized_ref,
    decode_ragged_ref,
)
from ctxzip.kernels.triton_attention import attention_mass_triton, attention_triton  # noqa: E402
from ctxzip.kernels.triton_decode import decode_quantized_triton, decode_ragged_triton  # noqa: E402

DEV = "cuda" if _HAS_CUDA else "cpu"
# the interpreter evaluates log(0) = -inf for rows that see no key, with a numpy warning
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


CASES = [
    # (Hq, Hkv, Tq, Tk, d, causal)
    (2, 2, 19, 19, 16, True),  # GQA 1, odd length, square causal
    (3, 1, 5, 23, 8, True),  # GQA 3, queries at the end of a longer key range, d < 16
    (8, 1, 1, 17, 16, True),  # GQA 8, single decode query
    (4, 2, 7, 13, 24, False),  # non-causal, non power of two head dim
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,Tq,Tk,d,causal", CASES)
def test_attention_forward(dtype, Hq, Hkv, Tq, Tk, d, causal):
    q, k, v = rand(2, Hq, Tq, d, dtype=dtype), rand(2, Hkv, Tk, d, dtype=dtype, seed=1), rand(
        2, Hkv, Tk, d, dtype=dtype, seed=2
    )
    out, lse = attention_triton(q, k, v, causal=causal, return_lse=True, block_m=16, block_n=16)
    ro, rl = attention_ref(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ro.float(), **TOL[dtype])
    torch.testing.assert_close(lse, rl, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_forward_masks(dtype):
    B, Hq, Hkv, T, d = 2, 4, 2, 11, 16
    q, k, v = rand(B, Hq, T, d, dtype=dtype), rand(B, Hkv, T, d, dtype=dtype, seed=1), rand(
        B, Hkv, T, d, dtype=dtype, seed=2
    )
    km = torch.ones(B, T, dtype=torch.long, device=DEV)
    km[1, :4] = 0  # left padding -> rows 0..3 of sequence 1 see nothing
    out, lse = attention_triton(q, k, v, attention_mask=km, return_lse=True, block_m=16, block_n=16)
    ro, rl = attention_ref(q, k, v, attention_mask=km, return_lse=True)
    torch.testing.assert_close(out.float(), ro.float(), **TOL[dtype])
    torch.testing.assert_close(lse, rl, **TOL[dtype])
    assert torch.isneginf(lse[1, :, :4]).all() and (out[1, :, :4] == 0).all()

    g = torch.Generator().manual_seed(5)
    m4 = (torch.rand(B, 1, T, T, generator=g) > 0.4).to(DEV)
    m4[..., 0] = True
    add = torch.zeros(B, Hq, T, T, device=DEV).masked_fill(~m4.expand(B, Hq, T, T), float("-inf"))
    for mask in (m4, add):
        out = attention_triton(q, k, v, causal=False, attention_mask=mask, block_m=16, block_n=16)
        ro = attention_ref(q, k, v, causal=False, attention_mask=mask)
        torch.testing.assert_close(out.float(), ro.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gqa", ["sum", "mean", "per_head"])
@pytest.mark.parametrize("window", [None, 0, 4, 64])  # all queries, empty, partial, full window
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (3, 1), (8, 1)])
def test_attention_mass(dtype, gqa, window, Hq, Hkv):
    Tq, Tk, d = 9, 21, 16
    q, k = rand(1, Hq, Tq, d, dtype=dtype), rand(1, Hkv, Tk, d, dtype=dtype, seed=1)
    got = attention_mass_triton(q, k, window=window, gqa=gqa, block_m=16, block_n=16)
    want = attention_mass_ref(q, k, window=window, gqa=gqa)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_attention_mass_lse_mask_noncausal():
    B, Hq, Hkv, T, d = 2, 6, 2, 13, 16
    q, k, v = rand(B, Hq, T, d), rand(B, Hkv, T, d, seed=1), rand(B, Hkv, T, d, seed=2)
    km = torch.ones(B, T, dtype=torch.bool, device=DEV)
    km[0, :5] = False
    _, lse = attention_triton(q, k, v, attention_mask=km, return_lse=True, block_m=16, block_n=16)
    got = attention_mass_triton(q, k, lse=lse, attention_mask=km, gqa="per_head", block_m=16, block_n=16)
    want = attention_mass_ref(q, k, attention_mask=km, gqa="per_head")
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    got = attention_mass_triton(q, k, causal=False, window=3, block_m=16, block_n=16)
    torch.testing.assert_close(got, attention_mass_ref(q, k, causal=False, window=3), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (3, 1), (8, 1)])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_ragged(dtype, Hq, Hkv, splits):
    B, Tmax, d = 2, 21, 16
    q = rand(B, Hq, d, dtype=dtype)
    k, v = rand(B, Hkv, Tmax, d, dtype=dtype, seed=1), rand(B, Hkv, Tmax, d, dtype=dtype, seed=2)
    lengths = torch.tensor([[0, 21][: Hkv] if Hkv > 1 else [0], [7, 1][: Hkv] if Hkv > 1 else [13]], device=DEV)
    out, lse = decode_ragged_triton(q, k, v, lengths, return_lse=True, block_n=16, num_splits=splits)
    ro, rl = decode_ragged_ref(q, k, v, lengths, return_lse=True)
    torch.testing.assert_close(out.float(), ro.float(), **TOL[dtype])
    torch.testing.assert_close(lse, rl, **TOL[dtype])
    zero_heads = (lengths == 0).repeat_interleave(Hq // Hkv, dim=1)
    assert (out[zero_heads] == 0).all() and torch.isneginf(lse[zero_heads]).all()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_quantized(bits, low_rank, dtype):
    B, Hq, Hkv, T, Tr, d, gs = 2, 6, 2, 32, 5, 16, 8
    q = rand(B, Hq, d, dtype=dtype)
    k, v = rand(B, Hkv, T, d, seed=1), rand(B, Hkv, T, d, seed=2)
    kq = quant.quantize(k, bits=bits, group_size=gs, axis="channel")
    vq = quant.quantize(v, bits=bits, group_size=gs, axis="token")
    if low_rank:
        r = 3
        kq = kq.with_low_rank(rand(B, Hkv, T, r, seed=3) * 0.1, rand(B, Hkv, r, d, seed=4))
        vq = vq.with_low_rank(rand(B, Hkv, T, r, seed=5) * 0.1, rand(B, Hkv, r, d, seed=6))
    kt, vt = rand(B, Hkv, Tr, d, dtype=dtype, seed=7), rand(B, Hkv, Tr, d, dtype=dtype, seed=8)
    for tails in ((None, None), (kt, vt)):
        out, lse = decode_quantized_triton(
            q, kq, vq, k_tail=tails[0], v_tail=tails[1], return_lse=True, block_n=16, num_splits=2
        )
        ro, rl = decode_quantized_ref(q, kq, vq, k_tail=tails[0], v_tail=tails[1], return_lse=True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ro.float(), **TOL[dtype])
        torch.testing.assert_close(lse, rl, **TOL[dtype])


def test_dispatch_forced_triton(monkeypatch):
    import ctxzip.kernels as K

    monkeypatch.setenv("CTXZIP_KERNELS", "triton")
    assert K.backend_for(DEV) == "triton"
    q, k, v = rand(1, 2, 3, 16), rand(1, 1, 5, 16, seed=1), rand(1, 1, 5, 16, seed=2)
    torch.testing.assert_close(K.attention(q, k, v), attention_ref(q, k, v), **TOL[torch.float32])
    torch.testing.assert_close(K.attention_mass(q, k), attention_mass_ref(q, k), **TOL[torch.float32])
