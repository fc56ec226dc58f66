"""Shared test matrix for the KV-cache presses: every press x every tiny family
(``tests/test_kvcache_eviction.py`` keeps only press-specific checks: scores against eager
attention, PyramidKV's budget schedule, the one-prefill evaluation path).

Checks: identity at full budget (logits equal to no press), positions continue from the
original length (decode after eviction equals the uncompressed model with the evicted columns
masked), batch > 1 with left padding (each row as if alone), budget respected (stored entries
and real bytes), plus the ragged head-wise layer against the kernels' ragged decode reference,
GEAR storage, low-rank calibration, decoding-time re-compression, generate() and bad input.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from ctxzip.budget import Budget
from ctxzip.kvcache import (
    DecodingPress,
    EMSPress,
    EvictedLayer,
    EvictThenQuantizePress,
    GEARLayer,
    GEARPress,
    H2OPress,
    KNormPress,
    LowRankLayer,
    LowRankPress,
    ObservedAttentionPress,
    PyramidKVPress,
    RaggedLayer,
    RazorAttentionPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
    cache_nbytes,
    calibrate_pca,
    generate,
    prefill,
)
from ctxzip.kvcache.gear import gear_compress, gear_decompress
from ctxzip.testing import TINY_FAMILIES, prefill_then_decode, random_ids, tiny_causal_lm

T = 48  # context length
N_NEW = 4


@pytest.fixture(scope="module")
def models():
    return {f: tiny_causal_lm(f) for f in TINY_FAMILIES}


_CAL: dict[str, object] = {}


def _calibration(model, family):
    if family not in _CAL:
        g = torch.Generator().manual_seed(1)
        seqs = [torch.randint(3, 256, (1, 64), generator=g) for _ in range(3)]
        _CAL[family] = calibrate_pca(model, seqs)
    return _CAL[family]


def make_press(name: str, budget: Budget, model=None, family=None, **kw):
    if name == "streaming":
        return StreamingLLMPress(budget=budget, n_sink=2, **kw)
    if name == "snapkv":
        return SnapKVPress(budget=budget, window=8, **kw)
    if name == "snapkv_adaptive":
        return SnapKVPress(budget=budget, window=8, head_budget="adaptive", **kw)
    if name == "h2o":
        return H2OPress(budget=budget, **kw)
    if name == "knorm":
        return KNormPress(budget=budget, **kw)
    if name == "ems":
        return EMSPress(budget=budget, window=8, **kw)
    if name == "ems_uniform":
        return EMSPress(budget=budget, window=8, head_budget="uniform", **kw)
    if name == "observed":
        return ObservedAttentionPress(budget=budget, **kw)
    if name == "observed_adaptive":
        return ObservedAttentionPress(budget=budget, head_budget="adaptive", **kw)
    if name == "h2o_raw":
        return ObservedAttentionPress(budget=budget, normalize=False, gqa="sum", **kw)
    if name == "tova":
        return TOVAPress(budget=budget, **kw)
    if name == "snapkv_gqa_max":
        return SnapKVPress(budget=budget, window=8, gqa="max", **kw)
    if name == "pyramidkv":
        return PyramidKVPress(budget=budget, window=8, **kw)
    if name == "pyramidkv_adaptive":
        return PyramidKVPress(budget=budget, window=8, head_budget="adaptive", **kw)
    if name == "razor":
        return RazorAttentionPress(budget=budget, min_buffer=4, retrieval_fraction=0.5, **kw)
    if name == "lowrank":
        return LowRankPress(budget=budget, recent_window=8, calibration=_calibration(model, family))
    raise KeyError(name)


EVICTION = ["streaming", "snapkv", "snapkv_adaptive", "snapkv_gqa_max", "h2o", "h2o_raw", "observed",
            "observed_adaptive", "tova", "pyramidkv", "pyramidkv_adaptive", "knorm", "ems", "ems_uniform"]
PYRAMID = {"pyramidkv", "pyramidkv_adaptive"}  # the budget is split unevenly over the layers
ALL = EVICTION + ["razor", "lowrank"]


def _ids(b=1, t=T, seed=0):
    return random_ids(b, t, seed)


_run = prefill_then_decode


# ------------------------------------------------------------------ identity at full budget
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", ALL)
def test_identity_at_full_budget(models, family, name):
    model = models[family]
    ids, new = _ids(2), _ids(2, N_NEW, seed=1)
    ref, _ = _run(model, None, ids, new)
    budgets = [Budget(rate=1.0)]
    if family == "llama" and name != "lowrank":
        budgets.append(Budget(tokens=10_000))
    for budget in budgets:
        out, cache = _run(model, make_press(name, budget, model, family), ids, new)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert cache.get_seq_length() == T + N_NEW


# ------------------------------------------------------------------ positions / masking
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_positions_continue_from_original_length(models, family):
    """StreamingLLM keeps the same tokens in every head and layer, so decoding from its cache
    must equal the uncompressed model whose 2D mask hides the evicted columns - which only
    holds if the new tokens take positions T, T+1, ... and the mask lines up."""
    model = models[family]
    ids, new = _ids(1), _ids(1, N_NEW, seed=2)
    keep, sink = 20, 2
    out, cache = _run(model, StreamingLLMPress(budget=Budget(tokens=keep), n_sink=sink), ids, new)
    assert cache.get_seq_length() == T + N_NEW
    mask = torch.zeros(1, T + N_NEW, dtype=torch.long)
    mask[:, :sink] = 1
    mask[:, T - (keep - sink) :] = 1
    with torch.no_grad():
        full = DynamicCache(config=model.config)
        model(ids, past_key_values=full)
        ref = model(new, attention_mask=mask, past_key_values=full).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and it differs from decoding at restarted positions (the check can fail)
    press = StreamingLLMPress(budget=Budget(tokens=keep), n_sink=sink)
    cache = prefill(model, ids, press)
    with torch.no_grad():
        wrong = model(new, position_ids=torch.arange(keep, keep + N_NEW)[None],
                      past_key_values=cache).logits
    assert not torch.allclose(wrong, ref, atol=1e-4)


# ------------------------------------------------------------------ batch with left padding
PAD_EXACT = ["streaming", "snapkv", "snapkv_gqa_max", "h2o", "h2o_raw", "observed", "tova", "pyramidkv", "knorm",
             "ems_uniform", "razor", "lowrank"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", PAD_EXACT)
def test_left_padded_batch_matches_rows_alone(models, family, name):
    model = models[family]
    budget = Budget(tokens=24) if name != "lowrank" else Budget(rate=0.5)
    long, short = _ids(1, T, seed=3), _ids(1, T - 10, seed=4)
    new = _ids(2, N_NEW, seed=5)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 10, dtype=torch.long), short], 1)])
    am = torch.ones_like(ids)
    am[1, :10] = 0
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    new_pos = pos[:, -1:] + 1 + torch.arange(N_NEW)[None]
    # PyramidKV's per-layer budgets depend on the row length unless the schedule is flat
    kw = {"beta": 1.0} if name in PYRAMID else {}
    out, _ = _run(model, make_press(name, budget, model, family, **kw), ids, new, am, pos, new_pos)
    for r, row in enumerate((long, short)):
        alone, _ = _run(model, make_press(name, budget, model, family, **kw), row, new[r : r + 1])
        torch.testing.assert_close(out[r : r + 1], alone, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ budget respected
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", EVICTION)
def test_budget_respected(models, family, name):
    budget = Budget(tokens=17) if family == "llama" else Budget(rate=0.25)
    model = models[family]
    ids = _ids(2)
    _, dense = _run(model, None, ids, _ids(2, 1))
    out, cache = _run(model, make_press(name, budget, model, family), ids, _ids(2, 1))
    assert torch.isfinite(out).all()
    assert cache.get_seq_length() == T + 1  # positions continue from the original length
    keep = budget.resolve(T)
    hkv = model.config.num_key_value_heads
    stored = []  # prefill entries kept per compressed layer, over all KV heads
    for layer in cache.layers:
        if isinstance(layer, EvictedLayer):
            stored.append((layer.keys.shape[-2] - 1) * hkv)
        elif isinstance(layer, RaggedLayer):
            assert layer.flat_keys.shape[1] == sum(layer.lengths)  # stored without padding
            stored.append(sum(layer.lengths))
        else:
            assert getattr(layer, "is_sliding", False)
    assert stored
    if name in PYRAMID:  # keep * Hkv per layer on average, more in the lower layers
        assert sum(stored) == keep * hkv * len(stored)
        if len(stored) > 2:
            assert stored[0] > stored[-1]
    else:
        assert stored == [keep * hkv] * len(stored)
    assert cache_nbytes(cache) < cache_nbytes(dense)


def test_budget_type_and_params_errors():
    with pytest.raises(TypeError):
        SnapKVPress(budget=0.25)
    with pytest.raises(ValueError):
        SnapKVPress(window=0)
    with pytest.raises(ValueError):
        SnapKVPress(kernel=4)
    with pytest.raises(ValueError):
        SnapKVPress(pooling="median")
    with pytest.raises(ValueError):
        SnapKVPress(head_budget="random")
    with pytest.raises(ValueError):
        H2OPress(recent_fraction=1.5)
    with pytest.raises(ValueError):
        StreamingLLMPress(n_sink=-1)
    with pytest.raises(ValueError):
        EMSPress(alpha=2.0)
    with pytest.raises(ValueError):
        EMSPress(combine="prod")
    with pytest.raises(ValueError):
        GEARPress(bits=3)
    with pytest.raises(ValueError):
        GEARPress(buffer=50, group_size=64)
    with pytest.raises(ValueError):
        GEARPress(outlier=1.0)
    with pytest.raises(ValueError):
        LowRankPress(budget=Budget(tokens=8))
    with pytest.raises(ValueError):
        DecodingPress(interval=0)
    with pytest.raises(ValueError):
        DecodingPress(press=SnapKVPress(head_budget="adaptive"))
    with pytest.raises(ValueError):
        Budget(rate=0.0)


def test_uncalibrated_lowrank_and_non_llm_errors(models):
    model = models["llama"]
    with pytest.raises(ValueError, match="calibration"), LowRankPress(budget=Budget(rate=0.5))(model):
        model(_ids(1), past_key_values=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="self-attention"), SnapKVPress()(torch.nn.Linear(2, 2)):
        pass
    with pytest.raises(TypeError):
        cache_nbytes([1, 2])
    with pytest.raises(ValueError):
        calibrate_pca(model, [])


# ------------------------------------------------------------------ ragged layer
def test_ragged_attention_matches_kernel_reference():
    from ctxzip.kernels import decode_ragged_ref
    from ctxzip.kvcache.cache import _ctxzip_attention

    g = torch.Generator().manual_seed(0)
    b, hkv, hq, d = 2, 2, 4, 8
    lengths = [5, 9]
    padded_k = torch.randn(b, hkv, 9, d, generator=g)
    padded_v = torch.randn(b, hkv, 9, d, generator=g)
    layer = RaggedLayer.from_padded(padded_k, padded_v, lengths, logical_length=30)
    assert layer.nbytes() == (sum(lengths) * b * d * 2) * 4
    new_k, new_v = torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g)
    k, v = layer.update(new_k, new_v)
    assert layer.get_seq_length() == 31 and layer.get_mask_sizes(1) == (11, 21)
    q = torch.randn(b, hq, 1, d, generator=g)

    class M(torch.nn.Module):
        num_key_value_groups = 2
        is_causal = True

    out, _ = _ctxzip_attention(M(), q, k, v, None, scaling=d**-0.5)
    # reference: per head, kept entries at the front + the new token
    ref_k = torch.zeros(b, hkv, 10, d)
    ref_v = torch.zeros(b, hkv, 10, d)
    for h, n in enumerate(lengths):
        ref_k[:, h, :n] = padded_k[:, h, :n]
        ref_v[:, h, :n] = padded_v[:, h, :n]
        ref_k[:, h, n] = new_k[:, h, 0]
        ref_v[:, h, n] = new_v[:, h, 0]
    lens = torch.tensor([[n + 1 for n in lengths]] * b)
    ref = decode_ragged_ref(q[:, :, 0], ref_k, ref_v, lens, scale=d**-0.5)
    torch.testing.assert_close(out[:, 0], ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ GEAR
def test_gear_roundtrip_outliers_and_bytes():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 128, 16, generator=g)
    v = torch.randn(1, 2, 128, 16, generator=g)
    k[0, 0, 5, 3] = 40.0  # an outlier must come back exactly
    errs = {}
    for bits in (2, 4, 8):
        ch = gear_compress(k, v, bits=bits, group_size=64, rank=4, outlier=0.02, loops=3)
        kk, vv = gear_decompress(ch)
        assert abs(float(kk[0, 0, 5, 3]) - 40.0) < 0.05
        errs[bits] = float((kk - k).norm() / k.norm() + (vv - v).norm() / v.norm())
        assert ch.nbytes() < 2 * k.numel() * 2  # below the fp16 K+V size
    assert errs[2] > errs[4] > errs[8]
    plain = gear_compress(k, v, bits=2, group_size=64, rank=0, outlier=0.0, loops=3)
    e_plain = float((gear_decompress(plain)[0] - k).norm() / k.norm())
    ch = gear_compress(k, v, bits=2, group_size=64, rank=4, outlier=0.02, loops=3)
    assert float((gear_decompress(ch)[0] - k).norm() / k.norm()) < e_plain  # L + S help


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_gear_press_close_and_streaming(models, family):
    model = models[family]
    ids, new = _ids(2, 200), _ids(2, 80, seed=7)
    ref, _ = _run(model, None, ids, new)
    out8, c8 = _run(model, GEARPress(bits=8, outlier=0.0, rank=0, prefill_rank=0, chunk=64), ids, new)
    out2, c2 = _run(model, GEARPress(bits=2), ids, new)
    e8, e2 = (out8 - ref).abs().max(), (out2 - ref).abs().max()
    assert e8 < 0.02 and e8 < e2
    gl = [layer for layer in c2.layers if isinstance(layer, GEARLayer)]
    assert gl and c2.get_seq_length() == 280
    # prefill keeps >= buffer fp tokens; the decoded 80 tokens crossed one buffer boundary
    assert all(layer.keys.shape[-2] < 64 + 64 for layer in gl)
    assert cache_nbytes(c2) < cache_nbytes(c8)


def test_evict_then_quantize_positions_and_bytes(models):
    model = models["llama"]
    ids, new = _ids(1, 256), _ids(1, 3, seed=8)
    press = EvictThenQuantizePress(evict=SnapKVPress(budget=Budget(rate=0.5), window=8),
                                   quant=GEARPress(bits=4))
    _, cache = _run(model, press, ids, new)
    _, ev = _run(model, SnapKVPress(budget=Budget(rate=0.5), window=8), ids, new)
    assert cache.get_seq_length() == 259
    assert cache_nbytes(cache) < cache_nbytes(ev)


# ------------------------------------------------------------------ low rank
def test_lowrank_rank_allocation_and_error_decreases(models):
    model = models["qwen3"]
    cal = _calibration(model, "qwen3")
    ids, new = _ids(1, 64), _ids(1, 3, seed=9)
    ref, _ = _run(model, None, ids, new)
    errs = []
    for rate in (0.25, 0.5, 0.75):
        p = LowRankPress(budget=Budget(rate=rate), recent_window=8, calibration=cal)
        ranks = p.ranks()
        d = model.config.head_dim
        total = sum(sum(rk) + sum(rv) for rk, rv in ranks.values())
        n_groups = sum(len(rk) + len(rv) for rk, rv in ranks.values())
        assert total == round(rate * d * n_groups)
        out, cache = _run(model, p, ids, new)
        assert any(isinstance(layer, LowRankLayer) for layer in cache.layers)
        errs.append(float((out - ref).abs().max()))
    assert errs[0] > errs[2]


def test_calibration_save_load(tmp_path, models):
    cal = _calibration(models["llama"], "llama")
    cal.save(str(tmp_path / "pca.pt"))
    from ctxzip.kvcache import PCACalibration

    back = PCACalibration.load(str(tmp_path / "pca.pt"))
    torch.testing.assert_close(back.basis_k[0], cal.basis_k[0])


# ------------------------------------------------------------------ EMS specifics
def test_ems_merge_changes_cache_and_zero_class_evicts(models):
    model = models["llama"]
    ids, new = _ids(1), _ids(1, 2, seed=10)
    _, merged = _run(model, EMSPress(budget=Budget(rate=0.5), window=8, merge_threshold=-1.0), ids, new)
    _, evicted = _run(model, EMSPress(budget=Budget(rate=0.5), window=8, merge_threshold=1.0), ids, new)
    a, b = merged.layers[0], evicted.layers[0]
    assert isinstance(a, RaggedLayer) and a.lengths == b.lengths
    assert not torch.allclose(a.flat_keys, b.flat_keys)  # every non-kept token merged somewhere


# ------------------------------------------------------------------ decoding-time compression
def test_decoding_press_keeps_cache_bounded(models):
    model = models["mistral"]
    press = DecodingPress(budget=Budget(tokens=20), press=SnapKVPress(budget=Budget(tokens=20), window=4),
                          interval=8)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(_ids(1), past_key_values=cache)
        x = _ids(1, 1, seed=11)
        sizes = []
        for _ in range(30):
            logits = model(x, past_key_values=cache).logits
            x = logits[:, -1:].argmax(-1)
            sizes.append(cache.layers[0].stored_length())
    assert max(sizes) <= 20 + 8
    assert cache.get_seq_length() == T + 30
    assert sizes.count(20) >= 3  # re-compressed back to the target several times


# ------------------------------------------------------------------ generate()
class _Tok:
    eos_token_id = 2

    def __call__(self, s, return_tensors=None, add_special_tokens=True):
        return {"input_ids": torch.tensor([[3 + (ord(c) % 250) for c in s]], dtype=torch.long)}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_generate_matches_manual_greedy_and_answers_many(models):
    model = models["llama"]
    ctx = "the quick brown fox jumps over the lazy dog " * 3
    tok = _Tok()
    one = generate(model, tok, ctx, "why?", max_new_tokens=6)
    ids = torch.cat([tok(ctx)["input_ids"], tok("why?")["input_ids"]], 1)
    with torch.no_grad():
        want = []
        for _ in range(6):
            nxt = int(model(ids).logits[0, -1].argmax())
            if nxt == 2:
                break
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert one == " ".join(map(str, want))
    many = generate(model, tok, ctx, ["why?", "how?"], press=SnapKVPress(budget=Budget(rate=1.0)),
                    max_new_tokens=6)
    assert isinstance(many, list) and many[0] == one
    with pytest.raises(ValueError):
        generate(model, tok, "", "q")
    with pytest.raises(TypeError):
        generate(model, tok, b"bytes", "q")


def test_ragged_layers_share_one_mask_across_layers():
    """transformers builds one mask for all full-attention layers, so ragged layers with different
    per-head maxima must expose one padded length; decoding with an explicit 2D mask (as the
    evaluator and generate() do) must equal decoding without one."""
    model = tiny_causal_lm("llama", num_layers=4, seed=3)
    ids, new = _ids(2, 64, seed=12), _ids(2, 5, seed=13)
    press = SnapKVPress(budget=Budget(rate=0.3), window=4, head_budget="adaptive")
    c1, c2 = prefill(model, ids, press), prefill(model, ids, press)
    lengths = [tuple(layer.lengths) for layer in c1.layers]
    assert len(set(lengths)) > 1  # the layers really differ
    assert len({layer.stored_length() for layer in c1.layers}) == 1
    with torch.no_grad():
        a = model(new, past_key_values=c1).logits
        am = torch.ones(2, 64 + 5, dtype=torch.long)
        b = model(new, attention_mask=am, past_key_values=c2).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cli_rejects_bad_budget_without_loading_a_model(capsys):
    from ctxzip.cli import main

    assert main(["kv", "eval", "--press", "snapkv", "--rate", "2.5"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["kv", "eval", "--docs", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["kv", "eval", "--press", "nope"])


def test_ragged_attention_does_not_replace_the_kernels_registration():
    """ctxzip.kernels owns attn_implementation="ctxzip"; the ragged-cache attention has its own
    name, so installing it never swaps out the kernels' function (score recording)."""
    from transformers import AttentionInterface

    from ctxzip.kernels.hf import ctxzip_attention_forward
    from ctxzip.kvcache import install_ctxzip_attention

    name = install_ctxzip_attention()
    assert name != "ctxzip"
    assert AttentionInterface._global_mapping["ctxzip"] is ctxzip_attention_forward
