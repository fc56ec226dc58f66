"""Eviction presses added for the quality-vs-kvpress work (observed attention, TOVA, PyramidKV)
and the one-prefill evaluation path, on the shared matrix: budget >= context -> identical
logits, positions continue, batch > 1 with left padding, budget respected, every tiny family
(llama, qwen2, qwen3, mistral, gemma3, phi3). Scores are checked against the eager attention
matrix they replace."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from ctxzip.budget import Budget
from ctxzip.kvcache import (
    EvictedLayer,
    ObservedAttentionPress,
    PyramidKVPress,
    RaggedLayer,
    SnapKVPress,
    TOVAPress,
    cache_nbytes,
    prefill,
    pyramid_budgets,
)
from ctxzip.kvcache.base import LayerContext
from ctxzip.kvcache.evaluate import EVICTION_PRESSES, compress_many, make_press
from ctxzip.testing import TINY_FAMILIES, prefill_then_decode, random_ids, tiny_causal_lm

T = 48
N_NEW = 4


@pytest.fixture(scope="module")
def models():
    return {f: tiny_causal_lm(f) for f in TINY_FAMILIES}


def press_by_name(name: str, budget: Budget):
    if name == "observed":
        return ObservedAttentionPress(budget=budget)
    if name == "observed_adaptive":
        return ObservedAttentionPress(budget=budget, head_budget="adaptive")
    if name == "h2o_raw":
        return ObservedAttentionPress(budget=budget, normalize=False, gqa="sum")
    if name == "tova":
        return TOVAPress(budget=budget)
    if name == "snapkv_gqa_max":
        return SnapKVPress(budget=budget, window=8, gqa="max")
    if name == "pyramidkv":
        return PyramidKVPress(budget=budget, window=8)
    if name == "pyramidkv_adaptive":
        return PyramidKVPress(budget=budget, window=8, head_budget="adaptive")
    raise KeyError(name)


NAMES = [
    "observed", "observed_adaptive", "h2o_raw", "tova", "pyramidkv", "pyramidkv_adaptive",
    "snapkv_gqa_max",
]


def _ids(b=1, t=T, seed=0):
    return random_ids(b, t, seed)


_run = prefill_then_decode


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_identity_at_full_budget(models, family, name):
    model = models[family]
    ids, new = _ids(2), _ids(2, N_NEW, seed=1)
    ref, _ = _run(model, None, ids, new)
    out, cache = _run(model, press_by_name(name, Budget(rate=1.0)), ids, new)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == T + N_NEW


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_budget_respected_and_positions_continue(models, family, name):
    model = models[family]
    budget = Budget(rate=0.25)
    ids = _ids(2)
    _, dense = _run(model, None, ids, _ids(2, 1))
    out, cache = _run(model, press_by_name(name, budget), ids, _ids(2, N_NEW, seed=7))
    assert torch.isfinite(out).all()
    assert cache.get_seq_length() == T + N_NEW  # positions continue from the original length
    keep = budget.resolve(T)
    hkv = model.config.num_key_value_heads
    stored = []
    for layer in cache.layers:
        if isinstance(layer, EvictedLayer):
            stored.append(layer.keys.shape[-2] - N_NEW)
            stored[-1] *= hkv
        elif isinstance(layer, RaggedLayer):
            assert layer.flat_keys.shape[1] == sum(layer.lengths)  # no padding in memory
            stored.append(sum(layer.lengths))
        else:
            assert getattr(layer, "is_sliding", False)
    assert stored
    # every press keeps keep * Hkv entries per layer on average (PyramidKV: in total)
    assert sum(stored) == keep * hkv * len(stored)
    if name.startswith("pyramidkv") and len(stored) > 2:
        assert stored[0] > stored[-1]
    assert cache_nbytes(cache) < cache_nbytes(dense)


PAD_EXACT = ["observed", "h2o_raw", "tova", "pyramidkv", "snapkv_gqa_max"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", PAD_EXACT)
def test_left_padded_batch_matches_rows_alone(models, family, name):
    model = models[family]
    budget = Budget(tokens=24)
    long, short = _ids(1, T, seed=3), _ids(1, T - 10, seed=4)
    new = _ids(2, N_NEW, seed=5)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 10, dtype=torch.long), short], 1)])
    am = torch.ones_like(ids)
    am[1, :10] = 0
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    new_pos = pos[:, -1:] + 1 + torch.arange(N_NEW)[None]
    press = press_by_name(name, budget)
    if name == "pyramidkv":  # per-layer budgets depend on the row length: compare one budget
        press = PyramidKVPress(budget=budget, window=8, beta=1.0)
    out, _ = _run(model, press, ids, new, am, pos, new_pos)
    for r, row in enumerate((long, short)):
        alone, _ = _run(model, copy.deepcopy(press), row, new[r : r + 1])
        torch.testing.assert_close(out[r : r + 1], alone, atol=2e-5, rtol=1e-4)


def _eager_probs(model, ids):
    """Per-layer softmax attention ``[B, Hq, T, T]`` from an eager forward pass."""
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        return m(ids, output_attentions=True).attentions


def _contexts(model, ids):
    """The LayerContext every layer hands a press."""
    got = []

    class Spy(ObservedAttentionPress):
        def compress_layer(self, ctx: LayerContext):
            got.append((ctx, self.score(ctx), TOVAPress(budget=self.budget).score(ctx)))
            return None

    with torch.no_grad(), Spy(budget=Budget(rate=0.5))(model):
        model(ids, past_key_values=DynamicCache(config=model.config))
    return got


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_scores_match_eager_attention(models, family):
    """Observed attention (kvpress needs eager for it) and TOVA come from the kernels without the
    N x N matrix; both equal what the eager attention matrix gives."""
    model = models[family]
    ids = _ids(1)
    probs = _eager_probs(model, ids)
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    g = hq // hkv
    for ctx, observed, tova in _contexts(model, ids):
        p = probs[ctx.layer_idx][0]  # [Hq, T, T]
        ref = (p.sum(1) / torch.arange(T, 0, -1)).view(hkv, g, T).mean(1)
        torch.testing.assert_close(observed[0], ref, atol=1e-5, rtol=1e-4)
        last = p[:, -1, :].mean(0)
        torch.testing.assert_close(tova[0], last[None].expand(hkv, T), atol=1e-5, rtol=1e-4)


def test_pyramid_budgets_shape():
    b = pyramid_budgets(100, 10, 1000, beta=20)
    assert sum(b) == 1000
    assert b == sorted(b, reverse=True)
    assert b[0] > 3 * b[-1]
    capped = pyramid_budgets(90, 4, 100, beta=20)
    assert max(capped) <= 100 and sum(capped) == 360
    assert pyramid_budgets(5, 1, 10, beta=20) == [5]
    with pytest.raises(ValueError):
        PyramidKVPress(beta=0.5)
    with pytest.raises(ValueError):
        TOVAPress(window=0)
    with pytest.raises(ValueError):
        ObservedAttentionPress(gqa="max")
    with pytest.raises(ValueError):
        SnapKVPress(gqa="median")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compress_many_equals_one_press_at_a_time(models, family):
    model = models[family]
    ids, new = _ids(1), _ids(1, N_NEW, seed=9)
    presses = {(n, r): make_press(n, Budget(rate=r)) for n in EVICTION_PRESSES for r in (0.5, 0.1)}
    caches = compress_many(model, ids, presses)
    assert set(caches) == set(presses)
    with torch.no_grad():
        for (n, r), cache in caches.items():
            ref = prefill(model, ids, make_press(n, Budget(rate=r)))
            a = model(new, past_key_values=copy.deepcopy(cache)).logits
            b = model(new, past_key_values=ref).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert compress_many(model, ids, {}) == {}
