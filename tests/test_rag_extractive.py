"""RECOMP extractive compressor: selection mechanics, budgets, attribution, selective
augmentation, bad input. Fast tests use a hashing encoder; ``slow`` ones the packaged MiniLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _rag_helpers import DOCS, HashEncoder, minilm_tokenizer

from ctxzip.budget import Budget
from ctxzip.prompt import ExtractiveCompressor
from ctxzip.prompt.extractive import as_documents, calibrate_threshold, split_sentences


@pytest.fixture
def comp():
    return ExtractiveCompressor(encoder=HashEncoder(), tokenizer=minilm_tokenizer())


def test_split_sentences_spans_and_code_blocks():
    text = 'First one. Second "two" here.\n\nA para:\n\n   code line 1\n   code. Line 2\n\nLast!'
    sents = split_sentences(text)
    assert [s.text for s in sents] == ["First one.", 'Second "two" here.', "A para:",
                                       "   code line 1\n   code. Line 2", "Last!"]
    for s in sents:
        assert text[s.start:s.end] == s.text
    assert [s.newline for s in sents] == [False, False, True, True, True]
    long = "word " * 1000
    assert all(len(s.text) <= 2000 for s in split_sentences(long))
    assert split_sentences("   \n\n  ") == []


def test_sentence_budget_keeps_topk_in_original_order(comp):
    q = "when does a while loop end with break"
    r = comp.__class__(encoder=comp.model, unit="sentences", tokenizer=minilm_tokenizer()) \
        .compress(DOCS, query=q, budget=Budget(tokens=2))
    sc = np.array([s["score"] for s in r.details["sentences"]])
    kept = np.array([s["kept"] for s in r.details["sentences"]])
    assert kept.sum() == 2
    assert set(np.flatnonzero(kept)) == set(np.argsort(-sc, kind="stable")[:2])
    # original order: the kept sentences appear in the output in source order
    texts = [s for s, k in zip(_all_sentences(), kept) if k]
    assert r.text.index(texts[0]) < r.text.index(texts[1])
    assert all(d["index"] == 1 for d in r.details["documents"] if d["kept_sentences"])


def _all_sentences():
    return [s.text for i, d in enumerate(DOCS) for s in split_sentences(d, doc=i)]


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5, 0.9])
def test_token_budget_respected(comp, rate):
    r = comp.compress(DOCS, query="assert statement condition", budget=rate)
    cap = Budget(rate=rate).resolve(r.original_tokens)
    kept_tokens = sum(s["tokens"] for s in r.details["sentences"] if s["kept"])
    assert kept_tokens <= cap
    assert r.compressed_tokens <= cap + r.details["kept_sentences"] + 2  # joiners may merge
    assert 0 <= r.rate <= 1
    # greedy fill: any unkept sentence is either lower-ranked or would not fit
    assert r.details["kept_sentences"] >= 1 or min(
        s["tokens"] for s in r.details["sentences"]) > cap


def test_identity_budget_keeps_everything(comp):
    r = comp.compress(DOCS, query="anything", budget=1.0)
    assert r.details["kept_sentences"] == r.details["n_sentences"]
    for d in DOCS:
        for s in split_sentences(d):
            assert s.text in r.text


def test_attribution_metadata_and_spans(comp):
    docs = [{"text": DOCS[0], "metadata": {"source": "a.txt"}}, {"text": DOCS[2], "id": "doc-2"}]
    r = comp.compress(docs, query="tuples immutable sequences", budget=Budget(rate=0.4))
    att = r.details["documents"]
    assert [d["metadata"] for d in att] == [{"source": "a.txt"}, {"id": "doc-2"}]
    assert att[1]["kept_sentences"], "the tuple sentence should be kept"
    for d, src in zip(att, (DOCS[0], DOCS[2])):
        for a, b in d["kept_spans"]:
            assert src[a:b] in d["text"]
    assert sum(d["kept_tokens"] for d in att) == sum(
        s["tokens"] for s in r.details["sentences"] if s["kept"])
    json.dumps(r.to_dict(with_details=True))  # JSON-ready


def test_selective_augmentation_threshold(comp):
    r0 = comp.compress(DOCS, query="tuples immutable", budget=0.5)
    best = r0.details["best_score"]
    hi = ExtractiveCompressor(encoder=comp.model, threshold=best + 0.01,
                              tokenizer=minilm_tokenizer())
    r = hi.compress(DOCS, query="tuples immutable", budget=0.5)
    assert r.text == "" and r.compressed_tokens == 0 and r.details["selective_empty"]
    lo = ExtractiveCompressor(encoder=comp.model, threshold=best - 0.01,
                              tokenizer=minilm_tokenizer())
    assert lo.compress(DOCS, query="tuples immutable", budget=0.5).text == r0.text


def test_calibrate_threshold():
    # low scores hurt, high scores help: the threshold separates them
    s = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]
    g = [-1.0, -0.5, -0.2, 0.4, 0.5, 0.1]
    t = calibrate_threshold(s, g)
    assert 0.3 < t < 0.6
    kept = [gi if si >= t else 0.0 for si, gi in zip(s, g)]
    assert sum(kept) >= max(sum(g), 0.0)  # never worse than always or never augmenting
    assert calibrate_threshold([0.1, 0.2], [0.3, 0.1]) is None  # everything helps
    assert calibrate_threshold([0.1, 0.2], [-0.3, -0.1]) > 0.2  # nothing helps: never augment
    assert calibrate_threshold([], []) is None
    with pytest.raises(ValueError):
        calibrate_threshold([0.1], [0.1, 0.2])
    with pytest.raises(ValueError):
        calibrate_threshold([float("nan")], [0.1])


def test_bad_input(comp):
    with pytest.raises(ValueError, match="query"):
        comp.compress(DOCS, budget=0.2)
    with pytest.raises(ValueError, match="empty"):
        comp.compress(DOCS, query="  ", budget=0.2)
    with pytest.raises(ValueError, match="UTF-8"):
        comp.compress([b"\xff\xfe bad"], query="q", budget=0.2)
    with pytest.raises(TypeError):
        comp.compress(42, query="q", budget=0.2)
    with pytest.raises(TypeError):
        comp.compress({"text": "x"}, query="q", budget=0.2)
    with pytest.raises(ValueError, match="no 'text'"):
        comp.compress([{"body": "x"}], query="q", budget=0.2)
    with pytest.raises(ValueError):
        comp.compress(DOCS, query="q", budget=1.5)
    with pytest.raises(ValueError):
        comp.compress(DOCS, query="q", budget=-3)
    with pytest.raises(ValueError, match="unit"):
        ExtractiveCompressor(unit="words")
    with pytest.raises(ValueError, match="threshold"):
        ExtractiveCompressor(threshold=float("nan"))
    with pytest.raises(FileNotFoundError):
        ExtractiveCompressor.from_pretrained("/nonexistent/dir")


def test_empty_and_huge_inputs(comp):
    r = comp.compress(["", "   "], query="q", budget=0.2)
    assert r.text == "" and r.original_tokens == 0 and r.rate == 1.0
    r = comp.compress("single string document. Another sentence here.", query="another",
                      budget=Budget(tokens=4))
    assert r.text == "Another sentence here."
    huge = [f"Sentence number {i} talks about loops and lists. " * 3 for i in range(400)]
    r = comp.compress(huge, query="lists", budget=0.05)
    assert r.details["n_sentences"] == 1200 and r.rate <= 0.05 + 1e-9


def test_as_documents_forms():
    assert as_documents("x") == (["x"], [{}])
    assert as_documents([b"y", {"page_content": "z", "metadata": {"a": 1}}]) == (
        ["y", "z"], [{}, {"a": 1}])


def test_save_and_from_pretrained_roundtrip(tmp_path):
    from ctxzip.models import load_encoder

    c = ExtractiveCompressor(encoder=load_encoder(), threshold=0.25, unit="sentences",
                             tokenizer=minilm_tokenizer())
    c.save_pretrained(tmp_path / "m", trained_on=["d1"])
    cfg = json.loads((tmp_path / "m" / "ctxzip_extractive.json").read_text())
    assert cfg["threshold"] == 0.25 and cfg["trained_on"] == ["d1"]
    c2 = ExtractiveCompressor.from_pretrained(tmp_path / "m", tokenizer=minilm_tokenizer())
    assert c2.threshold == 0.25 and c2.unit == "sentences"
    q = "assert raises AssertionError"
    np.testing.assert_allclose(c.score(q, _all_sentences()), c2.score(q, _all_sentences()),
                               atol=1e-5)


@pytest.mark.slow
def test_minilm_ranks_the_relevant_sentence_first():
    from pydoc_data.topics import topics

    docs = [topics["assert"], topics["while"], topics["pass"]]
    c = ExtractiveCompressor(unit="sentences")
    r = c.compress(docs, query="What happens to assert statements when optimization is "
                   "requested at compile time?", budget=Budget(tokens=1))
    assert "optimization is requested" in r.text
    assert r.details["documents"][0]["kept_sentences"]
    assert 0 < r.rate < 0.1


def test_pickle_drops_named_model_only():
    import pickle

    from ctxzip.prompt import AbstractiveCompressor

    c = ExtractiveCompressor(encoder="all-minilm-l6-v2", threshold=0.3, unit="sentences")
    c._model = object()  # pretend it was loaded
    c2 = pickle.loads(pickle.dumps(c))
    assert c2._model is None and c2.threshold == 0.3 and c2.unit == "sentences"
    a = pickle.loads(pickle.dumps(AbstractiveCompressor(relevance_threshold=0.7)))
    assert a.relevance_threshold == 0.7 and a._lm is None and a._load_lock is not None
