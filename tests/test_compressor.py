"""The text-compressor interface and the baselines (real SmolLM2 tokenizer, no model weights)."""

import math

import numpy as np
import pytest

from ctxzip import Budget, CompressionResult
from ctxzip.compressor import ensure_text
from ctxzip.prompt import RandomDropCompressor, TruncationCompressor

TEXT = (
    "The quick brown fox jumps over the lazy dog. Compression keeps what matters and drops the "
    "rest, so that a model reads less and still answers well. " * 4
)


@pytest.fixture(scope="module")
def counter_tok():
    from ctxzip.models import load_tokenizer

    return load_tokenizer()


def test_result_ratio_and_rate():
    r = CompressionResult("x", 10, 4)
    assert r.ratio == 2.5 and r.rate == 0.4
    assert math.isinf(CompressionResult("", 10, 0).ratio)
    assert CompressionResult("", 0, 0).rate == 1.0
    d = CompressionResult("", 10, 0).to_dict()
    assert d["ratio"] is None and d["rate"] == 0.0


def test_ensure_text():
    assert ensure_text("é") == "é"
    assert ensure_text("é".encode()) == "é"
    with pytest.raises(ValueError, match="not valid UTF-8"):
        ensure_text(b"\xff\xfe abc")
    with pytest.raises(TypeError):
        ensure_text(3)


@pytest.mark.parametrize("cls", [RandomDropCompressor, TruncationCompressor])
@pytest.mark.parametrize("budget", [Budget(rate=0.5), Budget(rate=0.1), Budget(tokens=7)])
def test_baselines_hit_budget(cls, budget, counter_tok):
    c = cls(tokenizer=counter_tok)
    r = c.compress(TEXT, budget=budget)
    n = len(counter_tok(TEXT, add_special_tokens=False)["input_ids"])
    assert r.original_tokens == n
    k = budget.resolve(n)
    assert int(np.sum(r.kept)) == k
    # decoding then re-encoding may merge/split a token at the seams; stay within a few tokens
    assert abs(r.compressed_tokens - k) <= max(2, k // 10)
    assert r.rate == pytest.approx(r.compressed_tokens / n)


def test_baselines_identity_empty_and_bad_input(counter_tok):
    c = TruncationCompressor(tokenizer=counter_tok)
    assert c.compress(TEXT, budget=Budget(tokens=10**6)).text == TEXT
    assert c.compress(TEXT, budget=Budget(rate=1.0)).text == TEXT
    r = c.compress("   \n", budget=Budget(rate=0.5))
    assert r.text == "   \n" and r.rate == 1.0
    assert c.compress("", budget=Budget(rate=0.5)).text == ""
    with pytest.raises(ValueError):
        c.compress(TEXT, budget=0.0)
    with pytest.raises(ValueError):
        c.compress(b"\xff bad", budget=Budget(rate=0.5))
    with pytest.raises(ValueError):
        c.compress(TEXT, budget=None)
    with pytest.raises(ValueError):
        TruncationCompressor(side="middle")
    # non-English, mixed scripts
    r = c.compress("日本語のテキストと English text, смешанный текст. " * 5, budget=Budget(rate=0.5))
    assert 0 < r.rate <= 0.6


def test_truncation_sides(counter_tok):
    head = TruncationCompressor("head", tokenizer=counter_tok).compress(TEXT, budget=Budget(tokens=5))
    tail = TruncationCompressor("tail", tokenizer=counter_tok).compress(TEXT, budget=Budget(tokens=5))
    assert TEXT.startswith(head.text)
    assert TEXT.rstrip().endswith(tail.text.strip())


def test_random_drop_deterministic(counter_tok):
    a = RandomDropCompressor(seed=1, tokenizer=counter_tok).compress(TEXT, budget=Budget(rate=0.3))
    b = RandomDropCompressor(seed=1, tokenizer=counter_tok).compress(TEXT, budget=Budget(rate=0.3))
    c = RandomDropCompressor(seed=2, tokenizer=counter_tok).compress(TEXT, budget=Budget(rate=0.3))
    assert a.text == b.text and a.text != c.text
