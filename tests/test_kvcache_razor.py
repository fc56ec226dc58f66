"""RazorAttention specifics (the shared matrix in test_kvcache.py covers identity at full
budget and left-padded batches): the compensation token's weighting, real storage, head
selection, the random-token probe and bad parameters."""

from __future__ import annotations

import math

import pytest
import torch

from ctxzip.budget import Budget
from ctxzip.kvcache import (
    HeadSplitLayer,
    KIVIPress,
    RazorAttentionPress,
    cache_nbytes,
    install_ctxzip_attention,
    prefill,
    retrieval_head_scores,
)
from ctxzip.kvcache.cache import _ctxzip_attention, _register_key_mask
from ctxzip.testing import prefill_then_decode, random_ids, tiny_causal_lm

T = 48


@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama")


def test_compensation_weight_equals_repeated_token():
    """Equation 5: a compensation token with bias log(n) is attended as n copies of itself."""
    install_ctxzip_attention()
    g = torch.Generator().manual_seed(0)
    b, h, d, n = 1, 2, 8, 5
    q = torch.randn(b, h, 1, d, generator=g)
    kept_k, kept_v = torch.randn(b, h, 3, d, generator=g), torch.randn(b, h, 3, d, generator=g)
    ck, cv = torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g)

    class M(torch.nn.Module):
        pass

    k = torch.cat([ck, kept_k], 2)
    v = torch.cat([cv, kept_v], 2)
    bias = torch.zeros(b, h, 4)
    bias[..., 0] = math.log(n)
    _register_key_mask(k, bias)
    out, _ = _ctxzip_attention(M(), q, k, v, None, scaling=d**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([ck.expand(-1, -1, n, -1), kept_k], 2), torch.cat([cv.expand(-1, -1, n, -1), kept_v], 2),
        scale=d**-0.5,
    )
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_storage_is_real_and_quantized_is_smaller(llama):
    ids, new = random_ids(2, T, 0), random_ids(2, 1, 1)
    _, dense = prefill_then_decode(llama, None, ids, new)
    press = RazorAttentionPress(budget=Budget(tokens=8), min_buffer=0, retrieval_fraction=0.5, sink=2)
    _, cache = prefill_then_decode(llama, press, ids, new)
    layers = [lay for lay in cache.layers if isinstance(lay, HeadSplitLayer)]
    assert layers, "no head-split layer"
    for lay in layers:
        if lay.local is not None and lay.local_heads:
            # sink + buffer + the decoded token per local head, no padding to the context length
            assert lay.local.keys.shape[-2] == 2 + 8 + 1
            assert lay.local.keys.shape[1] == len(lay.local_heads)
        if lay.full is not None:
            assert lay.full.keys.shape[-2] == T + 1
    fp = cache_nbytes(cache)
    qpress = RazorAttentionPress(budget=Budget(tokens=8), min_buffer=0, retrieval_fraction=0.5, sink=2,
                                 quant=KIVIPress(key_bits=4, value_bits=2, key_group=16, window=0))
    _, qcache = prefill_then_decode(llama, qpress, ids, new)
    assert cache_nbytes(qcache) < fp < cache_nbytes(dense)


def test_all_retrieval_heads_is_lossless_and_none_is_streaming(llama):
    ids, new = random_ids(1, T, 2), random_ids(1, 3, 3)
    ref, _ = prefill_then_decode(llama, None, ids, new)
    out, _ = prefill_then_decode(llama, RazorAttentionPress(budget=Budget(tokens=4), retrieval_fraction=1.0), ids, new)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # no retrieval head and no compensation: every head keeps sink + buffer = StreamingLLM
    from ctxzip.kvcache import StreamingLLMPress

    razor = RazorAttentionPress(budget=Budget(tokens=10), min_buffer=0, retrieval_fraction=0.0,
                                echo_fraction=0.0, sink=2, compensation=False)
    stream = StreamingLLMPress(budget=Budget(tokens=12), n_sink=2)
    a, _ = prefill_then_decode(llama, razor, ids, new)
    b, _ = prefill_then_decode(llama, stream, ids, new)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the compensation token changes the output (the check can fail)
    c, _ = prefill_then_decode(llama, RazorAttentionPress(budget=Budget(tokens=10), min_buffer=0, retrieval_fraction=0.0,
                                                          echo_fraction=0.0, sink=2), ids, new)
    assert not torch.allclose(a, c, atol=1e-4)


def test_head_selection_counts_and_order():
    scores = {0: torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.0, 0.8]]), 1: torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.0, 0.0]])}
    p = RazorAttentionPress(retrieval_fraction=0.5, echo_fraction=1 / 6, head_scores=scores)
    # 6 heads -> 3 kept: the best echo head (0, 2), then induction (0, 0) and (1, 0)
    assert p.retrieval_heads() == {(0, 2), (0, 0), (1, 0)}


def test_head_selection_with_long_range_mass():
    # rows: induction, echo, long-range mass
    scores = {0: torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.8, 0.0], [0.1, 0.2, 0.3]]),
              1: torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.9, 0.05]])}
    # 6 heads, keep 4: echo (0, 1), induction (0, 0), then long-range (1, 1), (0, 2)
    p = RazorAttentionPress(retrieval_fraction=4 / 6, echo_fraction=1 / 6, induction_fraction=1 / 6,
                            head_scores=scores)
    assert p.retrieval_heads() == {(0, 1), (0, 0), (1, 1), (0, 2)}
    # the paper's order (induction_fraction=None) takes (1, 0) by its induction score instead
    p = RazorAttentionPress(retrieval_fraction=4 / 6, echo_fraction=1 / 6, head_scores=scores)
    assert (1, 0) in p.retrieval_heads()
    with pytest.raises(ValueError, match="induction_fraction"):
        RazorAttentionPress(retrieval_fraction=0.2, echo_fraction=0.1, induction_fraction=0.2)
    two_rows = {0: torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="long-range"):
        RazorAttentionPress(retrieval_fraction=0.5, echo_fraction=0.0, induction_fraction=0.0,
                            head_scores=two_rows).retrieval_heads()


def test_probe_finds_an_induction_head_in_smollm():
    """On the offline SmolLM2 the random-token probe finds strong induction heads (a copy task a
    random model cannot do): the best KV head puts most of its attention on the next token."""
    from ctxzip.models import load_causal_lm

    model, _ = load_causal_lm()
    s = retrieval_head_scores(model, length=64, seeds=1)
    ind = torch.stack([v[0] for v in s.values()])
    assert ind.max() > 0.5
    assert float(ind.median()) < 0.05  # most heads are not retrieval heads
    far = torch.stack([v[2] for v in s.values()])
    assert ((far >= 0) & (far <= 1)).all() and far.max() > far.median()


def test_bad_parameters_and_missing_scores(llama):
    with pytest.raises(ValueError, match="retrieval_fraction"):
        RazorAttentionPress(retrieval_fraction=1.5)
    with pytest.raises(ValueError, match="echo_fraction"):
        RazorAttentionPress(retrieval_fraction=0.1, echo_fraction=0.2)
    with pytest.raises(ValueError, match="min_buffer"):
        RazorAttentionPress(min_buffer=-1)
    with pytest.raises(ValueError, match="quant"):
        RazorAttentionPress(quant="kivi")
    with pytest.raises(TypeError, match="Budget"):
        RazorAttentionPress(budget=0.5)
    with pytest.raises(ValueError, match="no head scores"):
        RazorAttentionPress().retrieval_heads()
    with pytest.raises(ValueError, match="length"):
        retrieval_head_scores(llama, length=2)
    # applying the press calibrates it once
    p = RazorAttentionPress(budget=Budget(tokens=8))
    prefill(llama, random_ids(1, T, 4), p)
    assert p.head_scores is not None and len(p.retrieval_heads()) >= 1


def test_bytes_grow_linearly_with_the_buffer_and_the_retrieval_share(llama):
    ids = random_ids(1, T, 5)

    def nbytes(buf, frac):
        press = RazorAttentionPress(budget=Budget(tokens=buf), min_buffer=0, retrieval_fraction=frac, sink=2,
                                    compensation=False)
        return cache_nbytes(prefill(llama, ids, press))

    b8, b16, b24 = nbytes(8, 0.25), nbytes(16, 0.25), nbytes(24, 0.25)
    assert b8 < b16 < b24 and b16 - b8 == b24 - b16
    assert nbytes(8, 0.25) < nbytes(8, 0.5) < nbytes(8, 0.75)


def test_cli_press_names_are_all_in_the_registry_and_razor_kivi_is_the_10pct_config():
    from ctxzip.commands.kv import PRESS_NAMES
    from ctxzip.kvcache.evaluate import PRESSES, make_press

    assert set(PRESS_NAMES) <= set(PRESSES)
    p = make_press("razor+kivi", Budget(tokens=64))
    assert isinstance(p, RazorAttentionPress) and p.budget.tokens == 64
    assert (p.retrieval_fraction, p.echo_fraction, p.induction_fraction) == (0.36, 0.1, 0.05)
    assert p.quant.rotate_values and p.quant.value_bits == 2 and p.quant.value_group == 32
    assert make_press("razor+kivi", Budget(tokens=96), retrieval_fraction=0.2).retrieval_fraction == 0.2
