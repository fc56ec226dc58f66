"""Shared logic of the LangChain / LlamaIndex adapters: compress a list of (text, metadata)
documents and map the result back to per-document outputs that keep their metadata."""

from __future__ import annotations

from typing import Any

from ctxzip.compressor import check_budget
from ctxzip.rag.pipeline import compress_documents


def compress_for_framework(
    compressor: Any, texts: list[str], metas: list[dict[str, Any]], query: str, budget: Any,
    *, keep_empty: bool = False,
) -> list[tuple[int | None, str, dict[str, Any]]]:
    """Return ``(source_index, text, extra_metadata)`` triples.

    Extractive compressors give one output per input document (its kept sentences; documents
    with nothing kept are dropped unless ``keep_empty``); other compressors (abstractive,
    token-level) give one combined output whose ``extra_metadata["ctxzip_sources"]`` lists the
    source documents' metadata. Selective augmentation (empty result) gives no output.
    """
    from ctxzip.prompt.extractive import ExtractiveCompressor

    if not texts:
        return []
    budget = check_budget(budget)
    docs = [{"text": t, "metadata": m} for t, m in zip(texts, metas)]
    res = compress_documents(compressor, docs, query=query, budget=budget)
    stats = {"method": res.method, "rate": res.rate, "original_tokens": res.original_tokens,
             "compressed_tokens": res.compressed_tokens}
    if isinstance(compressor, ExtractiveCompressor):
        out = []
        for d in res.details.get("documents", []):
            if d["text"] or keep_empty:
                out.append((d["index"], d["text"], {
                    "ctxzip": {**stats, "kept_sentences": d["kept_sentences"],
                               "kept_tokens": d["kept_tokens"], "max_score": d["max_score"]}}))
        return out
    if not res.text.strip():
        return []
    return [(None, res.text, {"ctxzip": stats, "ctxzip_sources": metas})]
