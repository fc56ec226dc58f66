"""CodeCompressor options added in the second pass: paper-normalised block values, the
reference spike rule, and the (non-paper) cursor adjacency option."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from ctxzip.budget import Budget
from ctxzip.prompt import CodeCompressor
from ctxzip.prompt.code import _minmax, find_spikes
from ctxzip.prompt.code_chunking import split_units


def test_find_spikes_rules_differ_as_documented():
    # 2.5 is a local maximum above mean + 0.2 * std (paper) but rises only 1.5 over its left
    # neighbour, below the threshold (~1.54) the reference code compares the rise with
    v = np.array([1.0, 2.5, 2.0, 1.0, 1.0, 1.0])
    assert find_spikes(v, 0.2, "paper") == [1]
    assert find_spikes(v, 0.2, "reference") == []
    w = np.array([1.0, 5.0, 1.0, 1.0, 1.0, 4.0, 1.0, np.nan, 1.0])
    assert find_spikes(w, 0.2, "reference") == [1, 5]


def test_reference_spikes_are_a_subset_of_paper_spikes_for_nonnegative_values():
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.gamma(2.0, 1.0, size=rng.integers(3, 40))
        assert set(find_spikes(v, 0.2, "reference")) <= set(find_spikes(v, 0.2, "paper"))


def test_minmax():
    assert np.allclose(_minmax(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    assert np.allclose(_minmax(np.array([1.0, 1.0])), [1.0, 1.0])
    assert _minmax(np.array([])).size == 0


@pytest.fixture(scope="module")
def tiny():
    from ctxzip.models import load_tokenizer
    from ctxzip.testing import tiny_causal_lm

    tok = load_tokenizer()
    return tiny_causal_lm("llama", vocab_size=len(tok)), tok


@pytest.fixture(scope="module")
def src():
    return Path(textwrap.__file__).read_text()


def _cc(tiny, **kw):
    model, tok = tiny
    return CodeCompressor(model=model, tokenizer=tok, **kw)


def test_normalized_block_values_span_unit_interval(tiny, src):
    r = _cc(tiny).compress(src, query="def wrap(text):", budget=Budget(rate=0.25))
    assert r.details["blocks"]
    units = split_units(src)
    for blocks in r.details["blocks"].values():
        vals = [b[4] for b in blocks if "".join(units[b[0]:b[1]]).strip()]
        assert all(0.0 <= x <= 1.0 for x in vals)
        if len(set(vals)) > 1:
            assert min(vals) == 0.0 and max(vals) == 1.0


def test_raw_values_and_reference_rule_run_within_budget(tiny, src):
    b = Budget(rate=0.25)
    r = _cc(tiny, block_values="raw", spike_rule="reference").compress(
        src, query="def wrap(text):", budget=b)
    assert 0 < r.compressed_tokens <= b.resolve(r.original_tokens)


def test_coarse_overflow_keeps_a_prefix_of_the_ranking(tiny, src):
    b = Budget(rate=0.25)
    r = _cc(tiny).compress(src, query="def wrap(text):", budget=b)
    kept, rank = r.details["coarse_kept"], r.details["ranking"]
    assert set(kept) == set(rank[: len(kept)])  # no lower-ranked chunk fills a gap
    assert 0 < r.compressed_tokens <= b.resolve(r.original_tokens)
    assert len(kept) < len(rank)
    r2 = _cc(tiny, coarse_overflow=False).compress(src, query="def wrap(text):", budget=b)
    assert 0 < r2.compressed_tokens <= b.resolve(r2.original_tokens)
    ro = _cc(tiny).compress(src, query="def wrap(text):", budget=b, rank_only=True)
    assert 0 < ro.compressed_tokens <= b.resolve(ro.original_tokens)


def test_adjacent_chunks_kept_whole_near_cursor(tiny, src):
    cursor = src.index("def dedent(")
    b = Budget(rate=0.25)
    cc = _cc(tiny, adjacent_fraction=0.5)
    r = cc.compress(src, query="def dedent(text):", budget=b, cursor=cursor)
    assert r.compressed_tokens <= b.resolve(r.original_tokens)
    adj = r.details["adjacent_chunks"]
    assert adj
    units = split_units(src)
    cu = len(src[:cursor].splitlines())
    for i in adj:
        a, e, _, _ = r.details["chunk_ranges"][i]
        assert "".join(units[a:e]).strip() in r.text  # kept whole
        assert min(abs(a - cu), abs(e - cu)) < len(units) // 2
    # without a cursor (or with fraction 0) the option does nothing
    r0 = _cc(tiny).compress(src, query="def dedent(text):", budget=b, cursor=cursor)
    assert r0.details["adjacent_chunks"] == []
    r1 = cc.compress(src, query="def dedent(text):", budget=b)
    assert r1.details["adjacent_chunks"] == []


def test_bad_options(tiny, src):
    for kw in ({"block_values": "x"}, {"spike_rule": "x"}, {"adjacent_fraction": 1.5},
               {"adjacent_fraction": -0.1}, {"coarse_overflow": "yes"}):
        with pytest.raises(ValueError):
            _cc(tiny, **kw)
    cc = _cc(tiny, adjacent_fraction=0.5)
    for bad in (-1, len(src) + 1, 1.5, True):
        with pytest.raises(ValueError, match="cursor"):
            cc.compress(src, query="q", budget=Budget(rate=0.25), cursor=bad)


def test_cli_cursor_options(tiny, tmp_path, capsys, src):
    import json

    from ctxzip.cli import main

    model, tok = tiny
    mdir = tmp_path / "tiny-lm"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    f = tmp_path / "m.py"
    f.write_text(src)
    line = src[: src.index("def dedent(")].count("\n") + 1
    rc = main(["code", str(f), "-q", "def dedent(text):", "--rate", "0.25", "--json",
               "--model", str(mdir), "--cursor-line", str(line), "--adjacent-fraction", "0.5",
               "--block-values", "raw", "--spike-rule", "paper", "--no-coarse-overflow"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert 0 < d["compressed_tokens"] <= d["original_tokens"] // 4 + 1
    rc = main(["code", str(f), "-q", "x", "--model", str(mdir), "--cursor-line", "999999",
               "--adjacent-fraction", "0.5"])
    assert rc != 0
