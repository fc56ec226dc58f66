"""RECOMP abstractive compressor: budget cap, selective augmentation, seq2seq and causal paths,
bad input. Fast tests use tiny random models; ``slow`` ones SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
from _rag_helpers import DOCS, minilm_tokenizer

from ctxzip.budget import Budget
from ctxzip.prompt import AbstractiveCompressor


@pytest.fixture(scope="module")
def tiny():
    from ctxzip.testing import tiny_causal_lm

    tok = minilm_tokenizer()
    return tiny_causal_lm("llama", vocab_size=len(tok)), tok


def _comp(tiny, **kw):
    model, tok = tiny
    return AbstractiveCompressor(model=model, generation_tokenizer=tok, tokenizer=tok, **kw)


def test_output_budget_caps_generation(tiny):
    c = _comp(tiny, relevance_threshold=None)
    r = c.compress(DOCS, query="what ends a loop", budget=Budget(tokens=7))
    assert r.compressed_tokens <= 7 and r.text  # random weights: gibberish, but capped
    assert r.details["selective_empty"] is False
    r = c.compress(DOCS, query="what ends a loop", budget=0.1)
    assert r.compressed_tokens <= Budget(rate=0.1).resolve(r.original_tokens)
    assert [d["index"] for d in r.details["documents"]] == [0, 1, 2]


def test_relevance_gate_and_marker(tiny, monkeypatch):
    c = _comp(tiny, relevance_threshold=1.0)  # nothing can clear P(yes) >= 1
    r = c.compress(DOCS, query="q", budget=20)
    assert r.text == "" and r.details["selective_empty"] and 0 <= r.details["relevance"] <= 1
    c0 = _comp(tiny, relevance_threshold=0.0)
    assert c0.compress(DOCS, query="q", budget=20).text
    monkeypatch.setattr(c0, "summarize", lambda *a, **k: "NONE.")
    r = c0.compress(DOCS, query="q", budget=20)
    assert r.text == "" and r.details["selective_empty"] and r.compressed_tokens == 0


def test_seq2seq_model_path(tmp_path):
    import transformers as tf

    tok = minilm_tokenizer()
    cfg = tf.T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=1, num_heads=2,
                      d_kv=16, decoder_start_token_id=tok.pad_token_id,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    c = AbstractiveCompressor(model=str(tmp_path / "t5"), tokenizer=tok)
    assert c.is_seq2seq
    r = c.compress(DOCS, query="loops", budget=Budget(tokens=5))
    assert "relevance" in r.details and r.compressed_tokens <= 5


def test_bad_input(tiny):
    c = _comp(tiny)
    with pytest.raises(ValueError, match="query"):
        c.compress(DOCS, budget=10)
    with pytest.raises(ValueError, match="UTF-8"):
        c.compress([b"\xff"], query="q", budget=10)
    with pytest.raises(ValueError, match="relevance_threshold"):
        AbstractiveCompressor(relevance_threshold=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        AbstractiveCompressor(max_new_tokens=0)
    with pytest.raises(ValueError, match="generation_tokenizer"):
        AbstractiveCompressor(model=tiny[0])
    with pytest.raises(ValueError, match="query"):
        AbstractiveCompressor(instruction="no slots {documents}")
    r = c.compress(["", " "], query="q", budget=10)
    assert r.text == "" and r.original_tokens == 0
    from ctxzip.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        AbstractiveCompressor(model="/nonexistent/model-dir-xyz").compress(DOCS, query="q",
                                                                          budget=10)


@pytest.mark.slow
def test_smollm2_summary_is_on_topic():
    from pydoc_data.topics import topics

    c = AbstractiveCompressor(relevance_threshold=None, max_input_tokens=600)
    r = c.compress([topics["assert"][:1500]], query="What does the assert statement do?",
                   budget=Budget(tokens=60))
    assert r.text and r.compressed_tokens <= 60
    assert "assert" in r.text.lower()
