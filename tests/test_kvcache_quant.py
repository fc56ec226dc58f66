"""KIVI-style quantized cache (pre-RoPE keys), evict-then-quantize and GEAR sinks: every tiny
family, closeness to no press at 8 bits, decode positions, left padding, real bytes, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from ctxzip.budget import Budget
from ctxzip.kvcache import (
    EvictThenQuantizePress,
    GEARLayer,
    GEARPress,
    H2OPress,
    KIVILayer,
    KIVIPress,
    SnapKVPress,
    cache_nbytes,
    dense_cache_nbytes,
)
from ctxzip.kvcache.kivi import rotate_keys
from ctxzip.testing import TINY_FAMILIES, prefill_then_decode, random_ids, tiny_causal_lm

T, N_NEW = 80, 4


@pytest.fixture(scope="module")
def models():
    return {f: tiny_causal_lm(f) for f in TINY_FAMILIES}


def _ids(b=1, t=T, seed=0):
    return random_ids(b, t, seed)


_run = prefill_then_decode


def _close(out, ref, tol):
    return float((out - ref).abs().max()) <= tol * float(ref.abs().max())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_kivi_8bit_close_to_no_press_and_positions_continue(models, family):
    model = models[family]
    ids, new = _ids(2), _ids(2, N_NEW, seed=1)
    ref, _ = _run(model, None, ids, new)
    for press in (
        KIVIPress(key_bits=8, value_bits=8, key_group=16, window=8),
        KIVIPress(key_bits=8, value_bits=8, key_group=16, window=8, pre_rope=False),
        KIVIPress(key_bits=8, value_bits=8, key_group=16, window=8, rotate_values=True),
        EvictThenQuantizePress(evict=H2OPress(budget=Budget(rate=1.0)),
                               quant=KIVIPress(key_bits=8, value_bits=8, key_group=16)),
    ):
        out, cache = _run(model, press, ids, new)
        assert _close(out, ref, 0.02), (family, press)
        assert cache.get_seq_length() == T + N_NEW
        # a second decode step keeps working (tail grows, positions continue)
        with torch.no_grad():
            model(new[:, :1], past_key_values=cache)
        assert cache.get_seq_length() == T + N_NEW + 1


def test_pre_rope_roundtrip_partial_rotary():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 5, 8, generator=g)
    ang = torch.randn(1, 5, 3, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # d_rot = 6 < 8
    r = rotate_keys(k, cos[:, None], sin[:, None])
    torch.testing.assert_close(rotate_keys(r, cos[:, None], sin[:, None], inverse=True), k)
    torch.testing.assert_close(r[..., 6:], k[..., 6:])


def test_pre_rope_keys_quantize_better_on_llama(models):
    """Low-bit pre-RoPE keys reconstruct the post-RoPE keys better than post-RoPE codes."""
    model = models["llama"]
    ids = _ids(1, 128)
    errs = {}
    for pre in (True, False):
        _, cache = _run(model, KIVIPress(key_bits=2, value_bits=8, key_group=32, window=0, sink=0,
                                         pre_rope=pre), ids, ids[:, :1])
        _, full = _run(model, None, ids, ids[:, :1])
        layer = next(ly for ly in cache.layers if isinstance(ly, KIVILayer))
        i = cache.layers.index(layer)
        k, _ = layer.dequantized()
        errs[pre] = float((k - full.layers[i].keys[:, :, : k.shape[2]]).norm())
    assert errs[True] < errs[False]


def test_kivi_left_padding_rows_as_alone(models):
    model = models["llama"]
    a, b = _ids(1, T, seed=2), _ids(1, T - 10, seed=3)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 10, dtype=torch.long), b], 1)], 0)
    am = torch.ones_like(ids)
    am[1, :10] = 0
    new = _ids(2, 2, seed=4)
    press = KIVIPress(key_bits=8, value_bits=8, key_group=16, window=8)
    out, _ = _run(model, press, ids, new, attention_mask=am)
    alone, _ = _run(model, press, b, new[1:])
    assert _close(out[1:], alone, 0.03)


def test_bytes_counted_and_proportional_to_keep(models):
    model = models["llama"]
    ids, new = _ids(1, 256), _ids(1, 1, seed=1)
    dense = dense_cache_nbytes(model, 256)
    sizes = []
    for keep in (0.25, 0.5, 1.0):
        press = EvictThenQuantizePress(evict=SnapKVPress(budget=Budget(rate=keep), window=8),
                                       quant=KIVIPress(key_bits=4, value_bits=2, window=0, sink=0))
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), press(model):
            model(ids, past_key_values=cache)
        sizes.append(cache_nbytes(cache, float_bytes=2) / dense)
        layer = next(ly for ly in cache.layers if isinstance(ly, KIVILayer))
        # codes + fp16 scale/zero + int16 positions, nothing hidden
        # (positions are implicit - not stored - when nothing was evicted)
        assert (layer.positions is None) == (keep == 1.0)
        pos_bytes = 0 if layer.positions is None else layer.positions.numel() * 2
        want = sum(q.nbytes() for q in layer.kq) + layer.vq.nbytes() + pos_bytes
        assert layer.nbytes() == want
    assert sizes[0] < sizes[1] < sizes[2] < 0.3
    assert sizes[1] / sizes[0] == pytest.approx(2.0, rel=0.1)
    # deep copies and batch expansion (the evaluator's path) keep working
    c2 = copy.deepcopy(cache)
    c2.batch_repeat_interleave(3)
    with torch.no_grad():
        out = model(new.expand(3, -1), past_key_values=c2).logits
    assert out.shape[0] == 3


def test_gear_sink_kept_exact(models):
    model = models["llama"]
    ids, new = _ids(1, 160), _ids(1, 1, seed=1)
    _, cache = _run(model, GEARPress(bits=2, sink=4, chunk=64), ids, new)
    _, full = _run(model, None, ids, new)
    i, layer = next((i, ly) for i, ly in enumerate(cache.layers) if isinstance(ly, GEARLayer))
    torch.testing.assert_close(layer.sink_keys, full.layers[i].keys[:, :, :4])
    assert layer.get_seq_length() == 161


@pytest.mark.parametrize("kw", [dict(key_bits=3), dict(value_bits=1), dict(key_group=0),
                                dict(value_group=True), dict(sink=-1), dict(window=-2)])
def test_kivi_bad_params(kw):
    with pytest.raises(ValueError):
        KIVIPress(**kw)


def test_combo_rejects_bad_parts():
    with pytest.raises(ValueError):
        EvictThenQuantizePress(quant=SnapKVPress())
    with pytest.raises(ValueError):
        EvictThenQuantizePress(evict=SnapKVPress(head_budget="adaptive"), quant=KIVIPress())
    with pytest.raises(ValueError):
        GEARPress(sink=-1)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_lowrank_pre_rope_full_rank_is_exact(models, family):
    from ctxzip.kvcache import LowRankPress, calibrate_pca

    model = models[family]
    cal = calibrate_pca(model, [_ids(1, 64, seed=7), _ids(1, 64, seed=8)])
    assert cal.pre_rope
    ids, new = _ids(2), _ids(2, N_NEW, seed=1)
    ref, _ = _run(model, None, ids, new)
    press = LowRankPress(budget=Budget(rate=0.999), allocation="uniform", recent_window=8, calibration=cal)
    out, cache = _run(model, press, ids, new)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == T + N_NEW


def test_value_rotation_is_orthonormal_and_lowers_2bit_error(models):
    from ctxzip.kernels.quant import dequantize, orthogonal_rotation, quantize

    for d in (64, 48):  # Hadamard, and a seeded random orthogonal matrix
        r = orthogonal_rotation(d)
        torch.testing.assert_close(r @ r.T, torch.eye(d), atol=1e-5, rtol=0)
        assert orthogonal_rotation(d) is r  # a cached model constant
    with pytest.raises(ValueError):
        orthogonal_rotation(0)
    # values with outlier channels (as real value caches have): the rotation spreads them
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, 256, 64, generator=g)
    v[..., 3] *= 10
    r = orthogonal_rotation(64)
    plain = (dequantize(quantize(v, bits=2, group_size=64, axis="token")) - v).pow(2).mean()
    rot = (dequantize(quantize(v @ r, bits=2, group_size=64, axis="token")) @ r.T - v).pow(2).mean()
    assert rot < 0.5 * plain
    # through the press the rotation costs no bytes (the matrix is a shared model constant);
    # on a random tiny model (no outlier channels) it neither helps nor hurts reliably, so the
    # gain is measured on SmolLM2 in benchmarks/kvcache_memory.py ("razor screen" rows)
    model = models["llama"]
    ids, new = _ids(1), _ids(1, N_NEW, seed=7)
    sizes, shared = [], []
    for rotate in (False, True):
        _, cache = _run(model, KIVIPress(key_bits=8, value_bits=2, key_group=16, window=0, rotate_values=rotate), ids, new)
        sizes.append(cache_nbytes(cache))
        shared.append(next(ly for ly in cache.layers if isinstance(ly, KIVILayer)).shared_nbytes())
    assert sizes[0] == sizes[1]
    assert shared[1] > shared[0]
