"""Presses that need the attention mass of all prefill queries (H2O, observed attention, EMS)
take it from the prefill's own attention (one pass, ``ctxzip.kvcache.fused``) instead of a
second Q Kᵀ pass: the fused function equals the kernels' reference, the caches equal those of
the recompute path on every tiny family (with and without left padding), and the model's
attention implementation is restored after the block."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import ctxzip.kvcache.fused as fused
from ctxzip.budget import Budget
from ctxzip.kernels.reference import attention_and_mass_ref
from ctxzip.kvcache import (
    EMSPress,
    EvictThenQuantizePress,
    H2OPress,
    KIVIPress,
    ObservedAttentionPress,
    SnapKVPress,
)
from ctxzip.kvcache.base import BasePress
from ctxzip.kvcache.fused import attention_with_mass, prefill_block_size
from ctxzip.testing import TINY_FAMILIES, prefill_then_decode, random_ids, tiny_causal_lm

T = 40


@pytest.fixture(scope="module")
def models():
    return {f: tiny_causal_lm(f) for f in TINY_FAMILIES}


@pytest.mark.parametrize("block", [1, 7, 16, 64])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_fused_equals_reference(block, heads):
    hq, hkv = heads
    g = torch.Generator().manual_seed(block)
    q = torch.randn(2, hq, 23, 8, generator=g)
    k = torch.randn(2, hkv, 23, 8, generator=g)
    v = torch.randn(2, hkv, 23, 5, generator=g)
    out, mass = attention_with_mass(q, k, v, scale=0.3, block=block)
    ref_out, _, ref_mass = attention_and_mass_ref(q, k, v, causal=True, scale=0.3, gqa="per_head")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-5)


def test_fused_with_padding_mask_and_query_weights():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d = 2, 4, 2, 19, 8
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hkv, hkv))
    real = torch.ones(b, t, dtype=torch.bool)
    real[1, :5] = False  # left padding of row 1
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = causal[None, None] & real[:, None, None, :]  # padded query rows see nothing
    out, mass = attention_with_mass(q, k, v, scale=0.5, attention_mask=mask, query_weights=real, block=6)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    ref_out, _, ref_mass = attention_and_mass_ref(
        q, k, v, causal=True, scale=0.5, gqa="per_head", attention_mask=real
    )
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :, 5:], ref_out[1, :, 5:], atol=1e-5, rtol=1e-5)
    assert mass[1, :, :5].abs().max() == 0  # padding keys get no mass


def test_fused_rejects_bad_shapes():
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match="same T"):
        attention_with_mass(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), scale=1.0)
    with pytest.raises(ValueError, match="multiple"):
        attention_with_mass(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8), scale=1.0)
    with pytest.raises(ValueError, match="boolean"):
        attention_with_mass(q, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), scale=1.0,
                            attention_mask=torch.zeros(1, 1, 6, 6))


def test_block_size_is_bounded():
    assert prefill_block_size(1, 9, 1024) == 32
    assert prefill_block_size(1, 9, 4096) == 64
    assert prefill_block_size(1, 9, 3) == 3
    assert prefill_block_size(4, 64, 1 << 20) == 1  # O(block x T) memory even for huge inputs


def _presses(budget):
    return {
        "h2o": H2OPress(budget=budget),
        "observed": ObservedAttentionPress(budget=budget),
        "ems": EMSPress(budget=budget),
        "h2o+kivi": EvictThenQuantizePress(evict=H2OPress(budget=budget), quant=KIVIPress(window=4)),
    }


def _cache_tensors(cache):
    out = []
    for layer in cache.layers:
        for name in ("keys", "values", "flat_keys", "flat_values", "positions", "sink_keys"):
            x = getattr(layer, name, None)
            if isinstance(x, torch.Tensor):
                out.append(x)
    return out


def _prefill(model, press, ids, am=None):
    cache = DynamicCache(config=model.config)
    kw = {} if am is None else {"attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp_min(0)}
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache, **kw)
    return cache


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", ["h2o", "observed", "ems", "h2o+kivi"])
@pytest.mark.parametrize("padded", [False, True])
def test_captured_mass_gives_the_recompute_cache(models, family, name, padded, monkeypatch):
    model = models[family]
    ids = random_ids(2, T, seed=3)
    am = None
    if padded:
        am = torch.ones_like(ids)
        am[1, :9] = 0
        ids = ids.masked_fill(am == 0, 0)
    calls = []
    real = fused.attention_with_mass

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(fused, "attention_with_mass", spy)
    press = _presses(Budget(rate=0.3))[name]
    got = _prefill(model, press, ids, am)
    n_full = sum(1 for layer in got.layers if not getattr(layer, "is_sliding", False))
    assert len(calls) == n_full >= 1  # one fused pass per full-attention layer, no other
    monkeypatch.setattr(type(press), "uses_prefill_mass", lambda self: False)
    ref = _prefill(model, _presses(Budget(rate=0.3))[name], ids, am)
    assert len(calls) == n_full
    for a, b in zip(_cache_tensors(got), _cache_tensors(ref), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["h2o", "observed"])
def test_attention_implementation_restored(models, name):
    model = tiny_causal_lm("llama")
    assert model.config._attn_implementation == "sdpa"
    _prefill(model, _presses(Budget(rate=0.3))[name], random_ids(1, T))
    assert model.config._attn_implementation == "sdpa"
    # EMS stores ragged head-wise layers: the ragged attention stays for the decoding steps
    _prefill(model, EMSPress(budget=Budget(rate=0.3)), random_ids(1, T))
    assert model.config._attn_implementation == "ctxzip_ragged"


def test_no_capture_without_eviction_or_for_window_presses(models, monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "attention_with_mass", lambda *a, **k: calls.append(1))
    model = models["llama"]
    ids, new = random_ids(1, T), random_ids(1, 3, seed=1)
    ref, _ = prefill_then_decode(model, None, ids, new)
    out, _ = prefill_then_decode(model, H2OPress(budget=Budget(rate=1.0)), ids, new)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # plain SDPA, not the fused pass
    prefill_then_decode(model, SnapKVPress(budget=Budget(rate=0.3), window=8), ids, new)
    assert not calls
    assert not BasePress().uses_prefill_mass()
