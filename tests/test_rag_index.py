"""faiss passage index (flat and IVF, save/load) and the retrieve -> compress -> prompt pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from _rag_helpers import DOCS, HashEncoder, minilm_tokenizer

pytest.importorskip("faiss")

from ctxzip.prompt import ExtractiveCompressor  # noqa: E402
from ctxzip.rag import PassageIndex, RAGPipeline, chunk_words, index_documents  # noqa: E402


def test_chunk_words():
    text = " ".join(f"w{i}" for i in range(250))
    ch = chunk_words(text, 100)
    assert [len(c.split()) for c in ch] == [100, 100, 50]
    assert chunk_words(text, 100, overlap=50)[1].split()[0] == "w50"
    assert chunk_words("", 100) == []
    with pytest.raises(ValueError):
        chunk_words(text, 0)


def test_flat_search_exclude_save_load(tmp_path):
    idx = PassageIndex(HashEncoder())
    idx.add([{"text": t, "metadata": {"doc_id": f"d{i}"}} for i, t in enumerate(DOCS)])
    assert idx.kind == "flat" and len(idx) == 3
    hits = idx.search("tuples are immutable", k=2)[0]
    assert hits[0].passage.metadata["doc_id"] == "d2" and hits[0].score >= hits[1].score
    ex = idx.search("tuples are immutable", k=2,
                    exclude=lambda p: p.metadata["doc_id"] == "d2")[0]
    assert [h.passage.metadata["doc_id"] for h in ex] and "d2" not in [
        h.passage.metadata["doc_id"] for h in ex]
    idx.save(tmp_path / "ix")
    idx2 = PassageIndex.load(tmp_path / "ix", encoder=HashEncoder())
    assert [h.passage.id for h in idx2.search("while loop", k=3)[0]] == [
        h.passage.id for h in idx.search("while loop", k=3)[0]]
    with pytest.raises(FileNotFoundError):
        PassageIndex.load(tmp_path / "missing")
    with pytest.raises(ValueError):
        PassageIndex(HashEncoder()).search("q")
    with pytest.raises(ValueError):
        idx.search("q", k=0)


def test_ivf_index_matches_flat_on_top1(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"tok{i}" for i in range(400)]
    texts = [" ".join(rng.choice(words, 12)) for _ in range(600)]
    flat = PassageIndex(HashEncoder()).add(texts)
    ivf = PassageIndex(HashEncoder(), ivf_min_passages=100, nprobe=64).add(texts)
    assert ivf.kind == "ivf" and flat.kind == "flat"
    qs = texts[:20]
    agree = sum(a[0].row == b[0].row for a, b in zip(flat.search(qs, 1), ivf.search(qs, 1)))
    assert agree >= 18  # the passage itself is its own nearest neighbour
    ivf.save(tmp_path / "ivf")
    again = PassageIndex.load(tmp_path / "ivf", encoder=HashEncoder())
    assert again.kind == "ivf" and again.search(qs[:1], 1)[0][0].row == 0


def test_pipeline_retrieve_compress_prompt():
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)]
    idx = index_documents(docs, words=12, encoder=HashEncoder())
    comp = ExtractiveCompressor(encoder=HashEncoder(), tokenizer=minilm_tokenizer())
    pipe = RAGPipeline(idx, comp, k=3)
    out = pipe.run("How does a while loop end?", budget=0.3)
    assert len(out.hits) == 3 and out.compression is not None
    assert out.prompt.endswith("How does a while loop end?")
    assert out.context and out.context in out.prompt
    assert out.compression.rate <= 0.3 + 1e-9
    # no compressor: full passages; selective (empty) context: the bare query
    assert RAGPipeline(idx, None, k=2).run("loop").context.count("\n\n") == 1
    sel = ExtractiveCompressor(encoder=HashEncoder(), threshold=2.0, tokenizer=minilm_tokenizer())
    assert RAGPipeline(idx, sel).run("loop", budget=0.3).prompt == "loop"
    with pytest.raises(ValueError):
        RAGPipeline(idx, comp, template="no slots")


def test_lm_examples_never_retrieve_own_document_or_copies():
    from types import SimpleNamespace

    from ctxzip.rag.train_extractive import lm_examples, make_triplets

    a = " ".join(f"alpha{i} beta{i % 7}" for i in range(119))  # B: 240 words, 6 chunks
    docs = [SimpleNamespace(id="A", text=a), SimpleNamespace(id="B", text="intro words " + a),
            SimpleNamespace(id="C", text=" ".join(f"alpha{i} gamma" for i in range(120)))]
    idx = index_documents(docs, words=40, encoder=HashEncoder())
    tok = minilm_tokenizer()
    cases = lm_examples(docs[:1], idx, tok, prefix_tokens=32, continuation_tokens=8,
                        query_tokens=8, k=2)
    assert cases
    for c in cases:
        assert c.passage_ids and all(pid.startswith("C#") for pid in c.passage_ids)
    leaky = lm_examples(docs[:1], idx, tok, prefix_tokens=32, continuation_tokens=8,
                        query_tokens=8, k=2, dedup_ngram=None)
    assert any(pid.startswith("B#") for c in leaky for pid in c.passage_ids)
    # triplets: positive = best positive-gain sentence, negatives score lower
    c = cases[0]
    c.sentences, c.gains = ["s0", "s1", "s2", "s3"], [0.1, 0.5, -0.2, 0.3]
    trip = make_triplets([c], [[0.9, 0.1, 0.8, 0.2]], num_negatives=2)
    assert trip == [(c.query, "s1", "s0"), (c.query, "s1", "s2")]
    c.gains = [-0.1, -0.2, -0.3, -0.4]
    assert make_triplets([c], [[0.9, 0.1, 0.8, 0.2]]) == []
