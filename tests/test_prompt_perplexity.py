"""PerplexityCompressor (LLMLingua-1 / LongLLMLingua) with a tiny random Llama on the real
SmolLM2 tokenizer: the iterative KV-cache scores equal scores recomputed from scratch."""

from __future__ import annotations

import numpy as np
import pytest

from ctxzip.budget import Budget

torch = pytest.importorskip("torch")

TEXT = (
    "The assert statement is a convenient way to insert debugging assertions into a program. "
    "If the expression is false, AssertionError is raised. Identifiers are names. "
    "Comparisons can be chained arbitrarily, e.g. x < y <= z is equivalent to x < y and y <= z.\n"
)


@pytest.fixture(scope="module")
def lm():
    from ctxzip.models import load_tokenizer
    from ctxzip.testing import tiny_causal_lm

    tok = load_tokenizer()
    return tiny_causal_lm("llama", vocab_size=len(tok)), tok


def make(lm, **kw):
    from ctxzip.prompt import PerplexityCompressor

    model, tok = lm
    return PerplexityCompressor(model=model, lm_tokenizer=tok, **kw)


def _loss_from_scratch(model, prefix, target):
    x = torch.tensor([prefix + [target]])
    with torch.no_grad():
        logits = model(x).logits[0, -2]
    return float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([target])))


def test_iterative_scores_match_recomputation(lm):
    model, tok = lm
    c = make(lm, iterative_size=5)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:23]
    counts = [2, 3, 1, 4, 1]
    scores, kept = c.token_scores(ids, counts)
    from ctxzip.models import doc_start_ids

    start = doc_start_ids(tok)
    prefix = list(start)
    for w in range(5):
        win = ids[w * 5 : (w + 1) * 5]
        for j, t in enumerate(win):
            ref = _loss_from_scratch(model, prefix + win[:j], t)
            assert abs(scores[w * 5 + j] - ref) < 1e-3
        m = kept[w * 5 : w * 5 + len(win)]
        assert m.sum() == counts[w]
        # the kept ones are the highest-scoring of the window
        s = scores[w * 5 : w * 5 + len(win)]
        assert s[m].min() >= s[~m].max() if (~m).any() else True
        prefix += [t for t, k in zip(win, m) if k]


def test_contrastive_query_scores(lm):
    model, tok = lm
    c = make(lm, iterative_size=8)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:8]
    q = "What does assert do?"
    scores, _ = c.token_scores(ids, None, query=q)
    from ctxzip.models import doc_start_ids

    start = doc_start_ids(tok)
    q_ids = start + tok(q + "\n\n", add_special_tokens=False)["input_ids"]
    for j, t in enumerate(ids):
        ref = _loss_from_scratch(model, start + ids[:j], t) - _loss_from_scratch(model, q_ids + ids[:j], t)
        assert abs(scores[j] - ref) < 1e-3


def test_budget_exact_and_query(lm):
    c = make(lm, iterative_size=16)
    for rate in (0.5, 0.33):
        r = c.compress(TEXT * 3, budget=Budget(rate=rate))
        assert r.details["lm_kept"] == Budget(rate=rate).resolve(r.details["lm_tokens"])
        assert r.compressed_tokens <= r.original_tokens
    r = c.compress(TEXT, budget=Budget(tokens=12), query="what is assert?")
    assert r.details["lm_kept"] == 12


def test_cache_rebuild_path(lm):
    c = make(lm, iterative_size=8, max_context=16)
    r = c.compress(TEXT * 4, budget=Budget(rate=0.5))
    assert r.details["lm_kept"] == Budget(rate=0.5).resolve(r.details["lm_tokens"])


def test_sentence_unit(lm):
    c = make(lm, unit="sentence")
    r = c.compress(TEXT, budget=Budget(rate=0.5))
    assert r.details["unit"] == "sentence"
    for sent in r.text.split(". "):
        assert sent.strip()[:20] in TEXT  # whole sentences, verbatim
    assert r.compressed_tokens <= Budget(rate=0.5).resolve(r.original_tokens) + 2


def test_rank_and_contexts(lm):
    c = make(lm, iterative_size=16)
    ctxs = ["Assert statements insert debugging assertions.", "Bananas are yellow fruit.", TEXT]
    losses = c.rank_contexts(ctxs, "what does assert do?")
    assert losses.shape == (3,) and np.isfinite(losses).all()
    r = c.compress_contexts(ctxs, budget=Budget(rate=0.5), query="what does assert do?", force_context_ids=[1])
    assert 1 in r.details["kept_contexts"]
    with pytest.raises(ValueError):
        c.compress_contexts([], budget=Budget(rate=0.5))


def test_errors(lm):
    from ctxzip.prompt import PerplexityCompressor

    with pytest.raises(ValueError):
        make(lm, iterative_size=0)
    with pytest.raises(ValueError):
        make(lm, unit="paragraph")
    with pytest.raises(ValueError):
        make(lm, max_context=10, iterative_size=8)
    with pytest.raises(ValueError):
        PerplexityCompressor(model=lm[0])  # object without tokenizer
    c = make(lm)
    assert c.compress("", budget=Budget(rate=0.5)).text == ""
    assert c.compress(" \n", budget=Budget(rate=0.5)).text == " \n"
    with pytest.raises(ValueError):
        c.compress(TEXT, budget=Budget(rate=-1))
    with pytest.raises(ValueError, match="UTF-8"):
        c.compress(b"\xc3\x28", budget=Budget(rate=0.5))
    assert c.compress(TEXT, budget=Budget(tokens=10**6)).text == TEXT


def test_budget_controller_sentence_then_tokens(lm):
    """LLMLingua-1 budget controller: the coarse stage keeps whole sentences by mean score up
    to token_budget_ratio * budget (the crossing one included); the token stage hits the
    budget exactly, dropping only tokens of kept sentences."""
    model, tok = lm
    text = TEXT * 3
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for ratio in (1.0, 1.4):
        c = make(lm, sentence_filter=True, token_budget_ratio=ratio, iterative_size=16)
        r = c.compress(text, budget=Budget(rate=0.4))
        k = Budget(rate=0.4).resolve(len(ids))
        assert r.details["lm_kept"] == k == int(r.kept.sum())
        assert 0 < r.details["kept_sentences"] < r.details["sentences"]
        # the coarse stage, recomputed: kept tokens lie only in sentences it selected
        import numpy as np

        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offs = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
        full, _ = c.token_scores(ids, None)
        sent_keep, tok_sent, _ = c._sentence_stage(text, offs, full, int(np.ceil(k * ratio)))
        assert not r.kept[~sent_keep[tok_sent]].any()
        cnt = np.bincount(tok_sent, minlength=len(sent_keep))
        assert cnt[sent_keep].sum() >= int(np.ceil(k * ratio))  # crossing sentence included
    # with the ratio at 1.0 almost all kept sentences survive whole
    c = make(lm, sentence_filter=True, token_budget_ratio=1.0)
    r = c.compress(text, budget=Budget(rate=0.5))
    assert r.compressed_tokens <= Budget(rate=0.5).resolve(r.original_tokens) + 1


def test_budget_controller_errors_and_identity(lm):
    for bad in (0.9, float("nan"), True, "1.4"):
        with pytest.raises(ValueError):
            make(lm, sentence_filter=True, token_budget_ratio=bad)
    c = make(lm, sentence_filter=True)
    r = c.compress(TEXT, budget=Budget(rate=1.0))
    assert r.text == TEXT
    r = c.compress("one sentence without an end", budget=Budget(rate=0.5))
    assert 0 < r.compressed_tokens <= Budget(rate=0.5).resolve(r.original_tokens)
    r = c.compress(TEXT, budget=Budget(rate=0.5), query="what raises AssertionError?")
    assert r.details["lm_kept"] == Budget(rate=0.5).resolve(r.details["lm_tokens"])
