"""Press-specific checks for the eviction presses added for the quality-vs-kvpress work
(observed attention, TOVA, PyramidKV) and the one-prefill evaluation path. The shared matrix
(identity at full budget, positions continue, left-padded batches, budget respected, every tiny
family) runs them in ``tests/test_kvcache.py``; here: scores against the eager attention matrix
they replace, PyramidKV's budget schedule, and ``compress_many``."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from ctxzip.budget import Budget
from ctxzip.kvcache import (
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    TOVAPress,
    prefill,
    pyramid_budgets,
)
from ctxzip.kvcache.base import LayerContext
from ctxzip.kvcache.evaluate import EVICTION_PRESSES, compress_many, make_press
from ctxzip.testing import TINY_FAMILIES, random_ids, tiny_causal_lm

T = 48
N_NEW = 4


@pytest.fixture(scope="module")
def models():
    return {f: tiny_causal_lm(f) for f in TINY_FAMILIES}


def _ids(b=1, t=T, seed=0):
    return random_ids(b, t, seed)



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
