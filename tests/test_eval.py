import math

import numpy as np
import pytest
import torch

from ctxzip import Budget
from ctxzip.eval import (
    ContextEvaluator,
    code_documents,
    context_benefit,
    pooled_benefit,
    pooled_benefit_diff,
    prose_documents,
)
from ctxzip.testing import tiny_causal_lm


class IdTokenizer:
    """Token ids written as space-separated integers (for tiny random models)."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def get_vocab(self):
        return {"<s>": 1, "</s>": 2}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _direct_nll(model, prefix, target):
    ids = torch.tensor([prefix + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    tgt = ids[0, 1:]
    nll = -logp.gather(-1, tgt[:, None])[:, 0]
    return float(nll[len(prefix) - 1 :].sum())


def test_metric_formulas():
    assert context_benefit(3.0, 1.0, 2.0) == 0.5
    assert context_benefit(3.0, 1.0, 1.0) == 1.0
    assert math.isnan(context_benefit(2.0, 2.0, 1.0))
    assert pooled_benefit([(3, 1, 2), (5, 1, 1)]) == pytest.approx((1 + 4) / (2 + 4))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_score_items_matches_direct_computation(family):
    model = tiny_causal_lm(family, num_layers=2)
    ev = ContextEvaluator(model, IdTokenizer(), max_batch=3)
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, 250, size=40).tolist()
    items = [
        (rng.integers(3, 250, size=5).tolist(), rng.integers(3, 250, size=7).tolist()),
        ([], rng.integers(3, 250, size=12).tolist()),
        (rng.integers(3, 250, size=5).tolist(), rng.integers(3, 250, size=7).tolist()),
        (rng.integers(3, 250, size=2).tolist(), rng.integers(3, 250, size=3).tolist()),
    ]
    got = ev.score_items(ctx, items)
    for (p, t), (s, n) in zip(items, got):
        assert n == len(t)
        assert s == pytest.approx(_direct_nll(model, [1] + ctx + p, t), rel=1e-4, abs=1e-4)
    # no context
    got0 = ev.score_items(None, items[:1])
    assert got0[0][0] == pytest.approx(_direct_nll(model, [1] + items[0][0], items[0][1]), rel=1e-4)

    # the KV-cache hook with a plain prefill gives the same numbers
    def make_cache(m, ids):
        return m(ids, use_cache=True).past_key_values, ids.shape[1]

    got_c = ev.score_items(ctx, items, make_cache=make_cache)
    for a, b in zip(got, got_c):
        assert a[0] == pytest.approx(b[0], rel=1e-4, abs=1e-4)


def test_pooled_benefit_diff_paired_interval():
    rng = np.random.default_rng(1)
    none = rng.uniform(3.0, 4.0, 12)
    full = none - rng.uniform(0.5, 1.5, 12)
    a = none - 0.8 * (none - full)  # a keeps 80% of every case's benefit
    b = none - 0.5 * (none - full)  # b keeps 50%
    d = pooled_benefit_diff(none, full, a, b, n_boot=500)
    assert d["diff"] == pytest.approx(0.3)
    # a constant per-case ratio survives every resample: the interval collapses onto it
    assert d["ci95"] == pytest.approx([0.3, 0.3])
    assert d["p_ahead"] == 1.0 and d["n_cases"] == 12
    assert d["diff"] == pytest.approx(pooled_benefit(zip(none, full, a)) - pooled_benefit(zip(none, full, b)))
    # noisy gaps: the interval contains the estimate, is deterministic per seed, flips with the order
    c = none - rng.uniform(0.2, 1.0, 12) * (none - full)
    d1 = pooled_benefit_diff(none, full, c, b, n_boot=500, seed=3)
    assert d1["ci95"][0] < d1["diff"] < d1["ci95"][1]
    assert d1 == pooled_benefit_diff(none, full, c, b, n_boot=500, seed=3)
    d2 = pooled_benefit_diff(none, full, b, c, n_boot=500, seed=3)
    assert d2["diff"] == pytest.approx(-d1["diff"])
    assert d2["ci95"] == pytest.approx([-d1["ci95"][1], -d1["ci95"][0]])
    with pytest.raises(ValueError, match="same non-zero length"):
        pooled_benefit_diff(none, full, a, b[:-1])
    with pytest.raises(ValueError, match="same non-zero length"):
        pooled_benefit_diff([], [], [], [])
    with pytest.raises(ValueError, match="n_boot"):
        pooled_benefit_diff(none, full, a, b, n_boot=0)
    with pytest.raises(ValueError, match="undefined"):
        pooled_benefit_diff(none, none, a, b)


def test_make_case_layout_and_errors():
    model = tiny_causal_lm("llama")
    ev = ContextEvaluator(model, IdTokenizer())
    text = " ".join(str(3 + i % 250) for i in range(400))
    case = ev.make_case(text, context_tokens=200, continuation_tokens=50, n_recall=5,
                        span_tokens=10, cue_tokens=4, seed=3)
    assert len(case.context_ids) == 200 and len(case.continuation_ids) == 50
    assert len(case.recall) == 5
    prev_end = 0
    for s, (cue, span) in zip(case.span_starts, case.recall):
        assert s >= prev_end and s >= 4 and s + 10 <= 200  # ordered, disjoint, inside
        assert cue == case.context_ids[s - 4 : s] and span == case.context_ids[s : s + 10]
        prev_end = s + 10
    assert ev.make_case(text, context_tokens=200, continuation_tokens=50, n_recall=5,
                        span_tokens=10, cue_tokens=4, seed=3).span_starts == case.span_starts
    with pytest.raises(ValueError, match="needs"):
        ev.make_case(text, context_tokens=390, continuation_tokens=50)
    with pytest.raises(ValueError):
        ev.make_case(text, context_tokens=0)
    with pytest.raises(ValueError, match="do not fit"):
        ev.make_case(text, context_tokens=100, continuation_tokens=10, n_recall=50, span_tokens=10)
    res = ev.benefit(case, case.context_ids)
    assert res["continuation"] == pytest.approx(1.0) and res["recall"] == pytest.approx(1.0)
    assert ev.benefit(case, None)["recall"] == pytest.approx(0.0, abs=1e-9)


def test_corpora_deterministic_and_real():
    a = prose_documents(5)
    assert [d.id for d in a] == [d.id for d in prose_documents(5)]
    assert all(len(d.text) >= 6000 for d in a)
    assert len({d.id.split(":")[1] for d in a}) == 5  # round-robin over topics
    assert len(prose_documents()) >= 30
    c = code_documents(3, max_chars=8000)
    assert [d.id for d in c] == [d.id for d in code_documents(3, max_chars=8000)]
    assert all(6000 <= len(d.text) <= 8000 for d in c)
    compile(code_documents(1)[0].text, "x", "exec")  # real Python
    with pytest.raises(ValueError):
        prose_documents(1, min_chars=10, max_chars=5)


@pytest.mark.slow
def test_real_model_truncation_beats_random():
    from ctxzip.prompt import RandomDropCompressor, TruncationCompressor

    ev = ContextEvaluator()
    doc = prose_documents(1)[0]
    case = ev.make_case(doc.text, context_tokens=512, continuation_tokens=64, n_recall=8)
    base = ev.baseline(case)
    assert base["full"]["recall"] < base["none"]["recall"] - 1.0  # the context really helps
    tr = ev.benefit(case, TruncationCompressor().compress(case.context_text, budget=Budget(rate=0.33)).text)
    rd = ev.benefit(case, RandomDropCompressor().compress(case.context_text, budget=Budget(rate=0.33)).text)
    assert tr["continuation"] > rd["continuation"] + 0.3
    assert 0.0 <= rd["recall"] < 0.5
