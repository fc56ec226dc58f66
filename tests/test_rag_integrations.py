"""LangChain and LlamaIndex adapters, tested against the real langchain-core / llama-index-core."""

from __future__ import annotations

import pytest
from _rag_helpers import DOCS, HashEncoder, minilm_tokenizer

from ctxzip.prompt import ExtractiveCompressor
from ctxzip.prompt.baselines import TruncationCompressor


@pytest.fixture
def comp():
    return ExtractiveCompressor(encoder=HashEncoder(), tokenizer=minilm_tokenizer())


def test_langchain_keeps_metadata(comp):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document
    from langchain_core.documents.compressor import BaseDocumentCompressor

    from ctxzip.rag.langchain import CtxzipDocumentCompressor

    lc = CtxzipDocumentCompressor(compressor=comp, budget=0.3)
    assert isinstance(lc, BaseDocumentCompressor)
    docs = [Document(page_content=t, metadata={"source": f"doc{i}.txt", "page": i}, id=f"id{i}")
            for i, t in enumerate(DOCS)]
    out = lc.compress_documents(docs, query="while loop ends break statement")
    assert out and all(isinstance(d, Document) for d in out)
    by_src = {d.metadata["source"]: d for d in out}
    assert "doc1.txt" in by_src
    d1 = by_src["doc1.txt"]
    assert d1.metadata["page"] == 1 and d1.id == "id1"
    assert d1.page_content and set(d1.page_content.split()) <= set(DOCS[1].split())
    assert d1.metadata["ctxzip"]["method"] == "extractive"
    total = sum(len(d.page_content) for d in out)
    assert total < sum(len(t) for t in DOCS) * 0.6
    # keep_empty keeps one output per input
    lc2 = CtxzipDocumentCompressor(compressor=comp, budget=0.3, keep_empty=True)
    assert len(lc2.compress_documents(docs, query="while loop")) == 3
    # async path of the base class
    import asyncio

    assert asyncio.run(lc.acompress_documents(docs, query="while loop ends"))
    assert lc.compress_documents([], query="q") == []


def test_langchain_non_extractive_combines_with_sources():
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from ctxzip.rag.langchain import CtxzipDocumentCompressor

    lc = CtxzipDocumentCompressor(compressor=TruncationCompressor(tokenizer=minilm_tokenizer()),
                                  budget=0.5)
    docs = [Document(page_content=t, metadata={"i": i}) for i, t in enumerate(DOCS)]
    out = lc.compress_documents(docs, query="q")
    assert len(out) == 1 and out[0].metadata["ctxzip_sources"] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_llamaindex_keeps_metadata_and_scores(comp):
    pytest.importorskip("llama_index.core")
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, TextNode

    from ctxzip.rag.llamaindex import CtxzipNodePostprocessor

    post = CtxzipNodePostprocessor(compressor=comp, budget=0.3)
    assert isinstance(post, BaseNodePostprocessor)
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{i}", metadata={"file": f"f{i}"}),
                           score=1.0 - i / 10) for i, t in enumerate(DOCS)]
    out = post.postprocess_nodes(nodes, query_str="tuples immutable sequences")
    assert out
    src = {n.node.metadata["file"]: n for n in out}
    assert "f2" in src
    n2 = src["f2"]
    assert n2.score == pytest.approx(0.8)
    assert n2.node.relationships[NodeRelationship.SOURCE].node_id == "n2"
    assert "immutable" in n2.node.get_content()
    assert n2.node.metadata["ctxzip"]["rate"] <= 0.3 + 1e-9
    out2 = post.postprocess_nodes(nodes, query_bundle=QueryBundle("tuples"))
    assert [n.node.get_content() for n in out2]
    with pytest.raises(ValueError, match="query"):
        post.postprocess_nodes(nodes)
