"""Torch reference kernels against a naive full-matrix computation (and SDPA)."""

from __future__ import annotations

import math

import pytest
import torch

import ctxzip.kernels as K
from ctxzip.kernels.reference import attention_mass_ref, attention_ref


def naive_probs(q, k, *, causal=True, scale=None, key_mask=None, mask4=None):
    """Full [B, Hq, Tq, Tk] softmax probabilities (fp64), the textbook way."""
    B, Hq, Tq, d = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(d))
    allowed = torch.ones(B, Hq, Tq, Tk, dtype=torch.bool)
    if causal:
        allowed &= torch.arange(Tk)[None, :] <= (torch.arange(Tq)[:, None] + Tk - Tq)
    if key_mask is not None:
        allowed &= key_mask.bool()[:, None, None, :]
    if mask4 is not None:
        allowed &= mask4
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0), s


def naive_attention(q, k, v, **kw):
    p, s = naive_probs(q, k, **kw)
    vv = v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return p @ vv, torch.logsumexp(s, dim=-1)


def rand_qkv(B=2, Hq=6, Hkv=2, Tq=5, Tk=9, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (3, 11), (1, 5)])
def test_attention_matches_naive(Hq, Hkv, causal, Tq, Tk):
    q, k, v = rand_qkv(Hq=Hq, Hkv=Hkv, Tq=Tq, Tk=Tk)
    out, lse = K.attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = naive_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert out.shape == (2, Hq, Tq, 8) and lse.shape == (2, Hq, Tq) and lse.dtype == torch.float32


def test_attention_blocked_equals_unblocked():
    q, k, v = rand_qkv(Tq=33, Tk=40)
    a = attention_ref(q, k, v, return_lse=True)
    b = attention_ref(q, k, v, return_lse=True, max_block_elems=1)  # one query row per block
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_attention_matches_sdpa_and_dtype():
    q, k, v = rand_qkv(Hq=4, Hkv=4, Tq=10, Tk=10, dtype=torch.float16)
    out = K.attention(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_attention_key_padding_and_empty_rows():
    q, k, v = rand_qkv(Tq=6, Tk=6)
    key_mask = torch.ones(2, 6, dtype=torch.long)
    key_mask[1, :3] = 0  # left padding on the second sequence
    out, lse = K.attention(q, k, v, causal=True, attention_mask=key_mask, return_lse=True)
    ref_out, _ = naive_attention(q, k, v, causal=True, key_mask=key_mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    # padded query rows see no key: output 0, lse -inf
    assert torch.all(out[1, :, :3] == 0) and torch.all(torch.isneginf(lse[1, :, :3]))
    assert torch.isfinite(lse[1, :, 3:]).all()


def test_attention_4d_bool_and_additive_masks():
    q, k, v = rand_qkv(Hq=4, Hkv=2, Tq=5, Tk=8)
    g = torch.Generator().manual_seed(3)
    m = torch.rand(2, 4, 5, 8, generator=g) > 0.3
    m[..., -1] = True
    ref_out, _ = naive_attention(q, k, v, causal=False, mask4=m)
    out_b = K.attention(q, k, v, causal=False, attention_mask=m)
    add = torch.zeros(2, 1, 5, 8).masked_fill(~m[:, :1], torch.finfo(torch.float32).min)
    out_a = K.attention(q, k, v, causal=False, attention_mask=add)
    ref_a, _ = naive_attention(q, k, v, causal=False, mask4=m[:, :1].expand(2, 4, 5, 8))
    torch.testing.assert_close(out_b.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_a.double(), ref_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gqa", ["sum", "mean", "per_head"])
@pytest.mark.parametrize("window", [None, 0, 1, 3, 100])
@pytest.mark.parametrize("Hq,Hkv", [(3, 1), (4, 4), (8, 1)])
def test_attention_mass_matches_naive(gqa, window, Hq, Hkv):
    q, k, _ = rand_qkv(Hq=Hq, Hkv=Hkv, Tq=7, Tk=10)
    mass = K.attention_mass(q, k, window=window, gqa=gqa)
    p, _ = naive_probs(q, k, causal=True)
    rows = p if window is None else p[:, :, p.shape[2] - min(window, 7):]
    per_head = rows.sum(dim=2)  # [B,Hq,Tk]
    if gqa == "per_head":
        want = per_head
    else:
        want = per_head.view(2, Hkv, Hq // Hkv, 10).sum(2)
        if gqa == "mean":
            want = want / (Hq // Hkv)
    assert mass.dtype == torch.float32
    assert mass.shape == want.shape
    torch.testing.assert_close(mass.double(), want, atol=1e-5, rtol=1e-5)
    n_rows = 7 if window is None else min(window, 7)
    # each query row's probabilities sum to one
    per_head_total = n_rows * (1 if gqa in ("per_head", "mean") else Hq // Hkv)
    torch.testing.assert_close(mass.sum(-1), torch.full_like(mass.sum(-1), float(per_head_total)))


def test_attention_mass_with_lse_and_padding_and_blocks():
    q, k, v = rand_qkv(Hq=6, Hkv=2, Tq=12, Tk=12)
    km = torch.ones(2, 12, dtype=torch.bool)
    km[0, :4] = False
    _, lse = K.attention(q, k, v, attention_mask=km, return_lse=True)
    a = K.attention_mass(q, k, attention_mask=km, lse=lse, gqa="per_head")
    b = attention_mass_ref(q, k, attention_mask=km, gqa="per_head", max_block_elems=7)
    p, _ = naive_probs(q, k, key_mask=km)
    torch.testing.assert_close(a.double(), p.sum(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert torch.all(a[0, :, :4] == 0)


def test_attention_mass_noncausal_window():
    q, k, _ = rand_qkv(Hq=2, Hkv=2, Tq=4, Tk=6)
    mass = K.attention_mass(q, k, window=2, causal=False, gqa="per_head")
    p, _ = naive_probs(q, k, causal=False)
    torch.testing.assert_close(mass.double(), p[:, :, 2:].sum(2), atol=1e-5, rtol=1e-5)


def test_long_input_memory_is_blocked():
    # 4096 queries x 4096 keys x 2 heads in fp32 would be 128 MB; the blocked path must not need it.
    q = torch.randn(1, 2, 4096, 16)
    k = torch.randn(1, 1, 4096, 16)
    bq = K.reference._block_size(1, 2, 4096, 4096, None)
    assert bq * 2 * 4096 <= K.reference.DEFAULT_MAX_BLOCK_ELEMS
    mass = K.attention_mass(q, k, window=64)
    assert mass.shape == (1, 1, 4096)
    torch.testing.assert_close(mass.sum(), torch.tensor(128.0))


def test_bad_inputs():
    q, k, v = rand_qkv()
    with pytest.raises(ValueError, match="multiple"):
        K.attention(q[:, :5], k, v)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        K.attention(k.repeat(1, 3, 1, 1), q[:, :2, :2], q[:, :2, :2])
    with pytest.raises(ValueError, match="window"):
        K.attention_mass(q, k, window=-1)
    with pytest.raises(ValueError, match="gqa"):
        K.attention_mass(q, k, gqa="max")
    with pytest.raises(ValueError, match="attention_mask"):
        K.attention(q, k, v, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="lse"):
        K.attention_mass(q, k, lse=torch.zeros(2, 6, 4))
    with pytest.raises(ValueError, match=r"\[B, Hq, Tq, d\]"):
        K.attention(q[0], k, v)
    with pytest.raises(TypeError):
        K.attention(q.long(), k, v)


def test_empty_shapes():
    q, k, v = rand_qkv(Tq=0, Tk=4)
    out, lse = K.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 6, 0, 8) and lse.shape == (2, 6, 0)
    q, k, v = rand_qkv(Tq=0, Tk=0)
    assert K.attention_mass(q, k).shape == (2, 2, 0)


def test_backend_env(monkeypatch):
    monkeypatch.setenv("CTXZIP_KERNELS", "torch")
    assert K.backend_for("cpu") == "torch"
    monkeypatch.setenv("CTXZIP_KERNELS", "bogus")
    with pytest.raises(ValueError, match="CTXZIP_KERNELS"):
        K.backend_for("cpu")
    monkeypatch.delenv("CTXZIP_KERNELS")
    assert K.backend_for("cpu") == "torch"


@pytest.mark.parametrize("window", [None, 0, 3])
@pytest.mark.parametrize("gqa", ["sum", "per_head"])
def test_attention_and_mass_one_pass(window, gqa):
    q, k, v = rand_qkv(Hq=6, Hkv=2, Tq=9, Tk=14)
    km = torch.ones(2, 14, dtype=torch.bool)
    km[1, :2] = False
    out, lse, mass = K.attention_and_mass(q, k, v, window=window, gqa=gqa, attention_mask=km)
    ro, rl = K.attention(q, k, v, attention_mask=km, return_lse=True)
    torch.testing.assert_close(out, ro)
    torch.testing.assert_close(lse, rl)
    torch.testing.assert_close(mass, K.attention_mass(q, k, window=window, gqa=gqa, attention_mask=km))
    b = K.attention_and_mass_ref(
        q, k, v, window=window, gqa=gqa, attention_mask=km, max_block_elems=1
    )
    torch.testing.assert_close(b[2], mass, atol=1e-6, rtol=1e-5)
