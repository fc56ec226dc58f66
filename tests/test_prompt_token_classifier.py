"""LLMLingua-2 TokenClassifierCompressor: mechanism checks with a tiny random classifier on the
real MiniLM tokenizer, plus decision-for-decision agreement with the `llmlingua` anchor."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ctxzip.budget import Budget

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = (
    "The assert statement is a convenient way to insert debugging assertions into a program. "
    "If the expression is false, AssertionError is raised with 3 optional arguments.\n\n"
    "Identifiers (also referred to as names) are described by the following lexical "
    "definitions. Unbelievably, tokenization splits words like 'internationalization' into pieces.\n"
    "```python\nx = f(42)\n```\n"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random BertForTokenClassification on the real (packaged) MiniLM tokenizer, saved
    under a path containing 'bert-base-multilingual-cased' so the anchor picks `##` merging."""
    from ctxzip.testing import save_tiny_token_classifier

    return save_tiny_token_classifier(tmp_path_factory.mktemp("clf") / "bert-base-multilingual-cased-tiny")


def make(tiny_dir, **kw):
    from transformers import AutoTokenizer

    from ctxzip.prompt import TokenClassifierCompressor

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    kw.setdefault("tokenizer", tok)  # count in the classifier's tokens: no LM download needed
    return TokenClassifierCompressor(model=str(tiny_dir), **kw)


def test_words_and_spans(tiny_dir):
    c = make(tiny_dir, return_word_labels=True)
    ws = c.score_words(TEXT)
    # every word span is non-empty text from the input; spans increase
    assert (ws.spans[:, 1] > ws.spans[:, 0]).all()
    assert (np.diff(ws.spans[:, 0]) > 0).all()
    surf = [TEXT[a:b] for a, b in ws.spans]
    assert "internationalization" in surf and "Unbelievably" in surf  # subwords merged, case kept
    assert "AssertionError" in surf
    assert ((ws.prob >= 0) & (ws.prob <= 1)).all()


def test_chunking_matches_anchor_rule(tiny_dir):
    c = make(tiny_dir, max_seq_len=16)
    _, tok = c.classifier()
    ids = np.asarray(tok(TEXT * 3, add_special_tokens=False)["input_ids"])
    toks = tok.convert_ids_to_tokens(ids.tolist())
    # the anchor's loop, verbatim in behaviour
    max_len, n, st, ref = 14, len(toks), 0, []
    while st < n:
        if st + max_len > n - 1:
            ref.append((st, n))
            break
        ed = st + max_len
        for j in range(0, ed - st):
            if toks[ed - j] in {".", "\n"}:
                ed = ed - j
                break
        ref.append((st, ed + 1))
        st = ed + 1
    assert c.chunk(ids) == ref
    assert all(b - a <= 15 for a, b in ref)


def _anchor_reference(c, text, rate):
    """Per-token Python reimplementation of llmlingua's __compress for one context (reference)."""
    ws = c.score_words(text)
    keep = np.zeros(len(ws.prob), dtype=bool)
    reduce_rate = max(0, 1 - rate)
    for ch in np.unique(ws.chunk):
        idx = np.flatnonzero(ws.chunk == ch)
        new = []
        for i in idx:
            new.extend([ws.prob[i]] * int(ws.weight[i]))
        thr = np.percentile(new, int(100 * reduce_rate + 1))
        for i in idx:
            keep[i] = ws.prob[i] > thr or (thr == 1.0 and ws.prob[i] == thr)
    return keep


@pytest.mark.parametrize("rate", [0.5, 0.33, 0.1])
def test_chunk_mode_is_percentile_rule(tiny_dir, rate):
    c = make(tiny_dir, mode="chunk", max_seq_len=24, token_weights="classifier")
    ws = c.score_words(TEXT * 2)
    got = c.select(ws, Budget(rate=rate), 1000)
    assert (got == _anchor_reference(c, TEXT * 2, rate)).all()


def test_global_mode_respects_budget(tiny_dir):
    c = make(tiny_dir, max_seq_len=32)
    for rate in (0.7, 0.5, 0.33, 0.2):
        r = c.compress(TEXT * 3, budget=Budget(rate=rate))
        k = Budget(rate=rate).resolve(r.original_tokens)
        assert r.compressed_tokens <= k
        assert r.compressed_tokens >= 0.85 * k  # and close to it
    r = c.compress(TEXT, budget=Budget(tokens=20))
    assert r.compressed_tokens <= 20
    assert 0 < r.rate < 1 and r.ratio > 1


def test_force_tokens_digits_and_newlines(tiny_dir):
    c = make(tiny_dir, force_tokens=("AssertionError", "?"), force_reserve_digit=True, return_word_labels=True)
    r = c.compress(TEXT + " Why?", budget=Budget(rate=0.2))
    assert "AssertionError" in r.text and "42" in r.text and "3" in r.text
    assert "?" in r.text
    assert "\n" in r.text  # line structure survives
    assert len(r.details["words"]) == len(r.details["word_labels"])


def test_render_whitespace_policies(tiny_dir):
    from ctxzip.prompt.token_classifier import render_words

    text = "| a     | b |\n|  c    | d |\n    indented  line\n\nnext par"
    spans = np.asarray([(m.start(), m.end()) for m in re.finditer(r"\S+", text)])
    words = [text[a:b] for a, b in spans]
    keep = np.ones(len(spans), bool)
    assert render_words(text, spans, keep, whitespace="keep") == text  # nothing dropped: verbatim
    assert render_words(text, spans, keep, whitespace="collapse") == "| a | b |\n| c | d |\nindented line\n\nnext par"
    keep[0] = False  # drop the first word: no leading gap
    out = render_words(text, spans, keep, whitespace="keep")
    assert out.startswith("a     |")
    # across a dropped line end: line break plus the next word's indentation
    keep = np.ones(len(spans), bool)
    keep[[i for i, w in enumerate(words) if w in ("d", "|")][-1]] = False  # last "|" of row 2
    keep[words.index("d")] = False
    out = render_words(text, spans, keep, whitespace="keep")
    assert "c    |\n    indented  line" in out
    assert render_words(text, spans, np.zeros(len(spans), bool)) == ""
    with pytest.raises(ValueError, match="whitespace"):
        make(tiny_dir, whitespace="tabs")
    # the compressor's output follows the policy and both fit the budget
    for ws in ("keep", "collapse"):
        r = make(tiny_dir, whitespace=ws, max_seq_len=32).compress(TEXT * 2, budget=Budget(rate=0.5))
        assert r.compressed_tokens <= Budget(rate=0.5).resolve(r.original_tokens)


def test_drop_consecutive(tiny_dir):
    c = make(tiny_dir, force_tokens=(",",), drop_consecutive=True, mode="chunk", token_weights="classifier")
    text = "alpha , , , beta gamma , delta , , epsilon"
    r = c.compress(text, budget=Budget(rate=0.3))
    assert ", ," not in r.text and ",," not in r.text


def test_identity_empty_and_errors(tiny_dir):
    c = make(tiny_dir)
    assert c.compress("", budget=Budget(rate=0.5)).text == ""
    assert c.compress("   \n ", budget=Budget(rate=0.5)).text == "   \n "
    assert c.compress(TEXT, budget=Budget(rate=1.0)).text == TEXT
    assert c.compress(TEXT, budget=Budget(tokens=10**6)).text == TEXT
    with pytest.raises(ValueError):
        c.compress(TEXT, budget=Budget(rate=0.0))
    with pytest.raises(ValueError):
        c.compress(TEXT, budget=1.5)
    with pytest.raises(ValueError, match="UTF-8"):
        c.compress(b"\xff\xfe bad", budget=Budget(rate=0.5))
    with pytest.raises(ValueError):
        make(tiny_dir, mode="nope")
    with pytest.raises(ValueError):
        make(tiny_dir, token_to_word="max")
    with pytest.raises(TypeError):
        make(tiny_dir, force_tokens="abc")
    from ctxzip.models import ModelNotFoundError
    from ctxzip.prompt import TokenClassifierCompressor

    with pytest.raises(ModelNotFoundError):
        TokenClassifierCompressor(model="/nonexistent/classifier").compress(TEXT, budget=Budget(rate=0.5))


def test_long_mixed_script_and_keep_nothing(tiny_dir):
    c = make(tiny_dir, max_seq_len=64)
    text = ("Καλημέρα κόσμε. 你好，世界。 Привет, мир! ") * 40 + TEXT
    r = c.compress(text, budget=Budget(rate=0.3))
    assert r.compressed_tokens <= Budget(rate=0.3).resolve(r.original_tokens)
    assert set(r.text) <= set(text)  # only original characters
    r0 = c.compress(TEXT, budget=Budget(tokens=0))
    assert r0.text == "" and r0.compressed_tokens == 0


def test_first_token_to_word(tiny_dir):
    c = make(tiny_dir, token_to_word="first")
    cm = make(tiny_dir)
    a, b = c.score_words(TEXT), cm.score_words(TEXT)
    assert len(a.prob) == len(b.prob)
    single = (a.weight == 1)
    assert np.allclose(a.prob[single], b.prob[single])


def test_context_filter(tiny_dir):
    c = make(tiny_dir)
    ctxs = [TEXT, "Completely unrelated filler words here. " * 5, "Numbers 1 2 3 and more text."]
    r = c.compress_contexts(ctxs, budget=Budget(rate=0.5), force_context_ids=[1])
    assert 1 in r.details["kept_contexts"]
    assert r.compressed_tokens <= r.original_tokens
    with pytest.raises(ValueError):
        c.compress_contexts([], budget=Budget(rate=0.5))
    with pytest.raises(ValueError):
        c.compress_contexts(ctxs, budget=Budget(rate=0.5), force_context_ids=[7])


def test_matches_llmlingua_anchor(tiny_dir, monkeypatch):
    """Same model, same text: our chunk mode keeps exactly the words llmlingua 0.2.2 keeps."""
    llmlingua = pytest.importorskip("llmlingua")
    import tiktoken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)

    class Standin:  # the anchor downloads a GPT tokenizer; count with the classifier's tokenizer
        def encode(self, s):
            return tok(s, add_special_tokens=False)["input_ids"]

        def decode(self, ids):
            return tok.decode(ids)

    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: Standin())
    anchor = llmlingua.PromptCompressor(model_name=str(tiny_dir), device_map="cpu", use_llmlingua2=True)
    text = re.sub(r"```.*?```", "", TEXT, flags=re.S) * 6  # plain prose, several chunks
    ours = make(tiny_dir, mode="chunk", token_weights="classifier", return_word_labels=True)
    for rate in (0.5, 0.33):
        a = anchor.compress_prompt_llmlingua2([text], rate=rate, return_word_label=True)
        pairs = [p.rsplit(" ", 1) for p in a["fn_labeled_original_prompt"].split("\t\t|\t\t")]
        r = ours.compress(text, budget=Budget(rate=rate))
        assert [w for w, _ in pairs] == r.details["words"]
        assert [int(lab) for _, lab in pairs] == r.details["word_labels"]


def test_sentence_filter_keeps_best_sentences(tiny_dir):
    """Coarse stage (LLMLingua-1 budget controller on the classifier's probabilities): with the
    ratio at 1.0 the kept words come from the sentences with the highest mean probability."""
    from ctxzip.prompt.perplexity import split_sentences

    text = TEXT * 2
    plain = make(tiny_dir, max_seq_len=64)
    sf = make(tiny_dir, max_seq_len=64, sentence_filter=True, token_budget_ratio=1.0)
    r = sf.compress(text, budget=Budget(rate=0.4))
    k = Budget(rate=0.4).resolve(r.original_tokens)
    assert r.compressed_tokens <= k and r.compressed_tokens >= 0.7 * k
    assert 0 < r.details["kept_sentences"] < r.details["sentences"]
    ws = plain.score_words(text)
    sents = split_sentences(text)
    starts = np.asarray([a for a, _ in sents])
    sid = np.searchsorted(starts, ws.spans[:, 0], side="right") - 1
    kept_s = set(sid[r.kept].tolist())
    w = ws.weight.astype(float)
    mean = np.bincount(sid, ws.prob_raw * w, len(sents)) / np.maximum(np.bincount(sid, w, len(sents)), 1e-9)
    best = np.argsort(-mean, kind="stable")[: len(kept_s)]
    assert len(kept_s & set(best.tolist())) >= len(kept_s) - 1
    # words of a kept sentence are kept mostly whole; plain LLMLingua-2 mode differs
    r2 = plain.compress(text, budget=Budget(rate=0.4))
    assert "sentences" not in r2.details
    assert r2.kept.tolist() != r.kept.tolist()
    with pytest.raises(ValueError):
        make(tiny_dir, token_budget_ratio=0.5)
