"""``ctxzip rag`` and ``ctxzip serve`` command lines (real MiniLM, target-LM tokenizer)."""

from __future__ import annotations

import json

import pytest
from _rag_helpers import DOCS

from ctxzip.cli import main


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i, t in enumerate(DOCS):
        (d / f"doc{i}.txt").write_text(t)
    return d


def test_rag_index_query_compress(corpus, tmp_path, capsys):
    pytest.importorskip("faiss")
    assert main(["rag", "index", str(corpus), "--out", str(tmp_path / "ix"), "--words", "12"]) == 0
    assert "indexed" in capsys.readouterr().out
    assert main(["rag", "query", str(tmp_path / "ix"), "How does a while loop end?", "-k", "3",
                 "--budget", "30%", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["hits"]) == 3 and out["text"] and out["rate"] <= 0.3 + 1e-9
    assert out["prompt"].endswith("How does a while loop end?")
    assert main(["rag", "compress", str(corpus / "doc0.txt"), str(corpus / "doc2.txt"),
                 "--query", "immutable tuples", "--budget", "1", "--unit", "sentences"]) == 0
    cap = capsys.readouterr()
    assert "Tuples are immutable sequences." in cap.out and "rate" in cap.err


def test_rag_cli_errors(tmp_path, capsys):
    assert main(["rag", "compress", str(tmp_path / "missing.txt"), "--query", "q"]) == 2
    assert "no such document" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    assert main(["rag", "compress", str(bad), "--query", "q"]) == 2
    assert "UTF-8" in capsys.readouterr().err
    assert main(["rag", "query", str(tmp_path), "q"]) == 2  # not an index
    assert main(["rag", "train-extractive", "--out", str(tmp_path / "m"),
                 "--corpus", str(tmp_path / "nope")]) == 2
    with pytest.raises(SystemExit):
        main(["serve", "--port", "notaport"])
