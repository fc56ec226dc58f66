"""retrieve -> compress -> build prompt: the RECOMP setting as one object.

``RAGPipeline(index, compressor).run(query, k=5, budget=0.2)`` retrieves the top-``k`` passages,
compresses them for the query with any ctxzip compressor that accepts a document list
(:class:`~ctxzip.prompt.ExtractiveCompressor`, :class:`~ctxzip.prompt.AbstractiveCompressor`) or a
plain text compressor (the passages are then joined), and prepends the result to the prompt.
An empty compressed context (selective augmentation) yields the prompt without documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctxzip.budget import Budget
from ctxzip.compressor import CompressionResult, check_budget, ensure_text
from ctxzip.rag.index import Hit, PassageIndex

__all__ = ["RAGPipeline", "RAGOutput", "DEFAULT_TEMPLATE", "compress_documents"]

DEFAULT_TEMPLATE = "{context}\n\n{query}"


@dataclass
class RAGOutput:
    """Result of :meth:`RAGPipeline.run`."""

    prompt: str
    hits: list[Hit]
    compression: CompressionResult | None
    context: str
    details: dict[str, Any] = field(default_factory=dict)


def compress_documents(compressor: Any, documents: list[Any], *, query: str | None,
                       budget: Budget | float | int) -> CompressionResult:
    """Run any ctxzip compressor on a list of documents (``str`` or ``{"text", "metadata"}``).

    RECOMP compressors take the list as is (and attribute kept text per document); other text
    compressors get the documents joined by blank lines.
    """
    from ctxzip.prompt.abstractive import AbstractiveCompressor
    from ctxzip.prompt.extractive import ExtractiveCompressor, as_documents

    if isinstance(compressor, (ExtractiveCompressor, AbstractiveCompressor)):
        return compressor.compress(documents, query=query, budget=budget)
    texts, _ = as_documents(documents)
    return compressor.compress("\n\n".join(texts), query=query, budget=budget)


class RAGPipeline:
    """Retrieval-augmented prompt builder with a compression step.

    Args:
        index: a :class:`~ctxzip.rag.index.PassageIndex`.
        compressor: any ctxzip compressor, or ``None`` to prepend the retrieved passages whole.
        template: prompt template with ``{context}`` and ``{query}``; when the context is empty
            only the query is used.
        k: passages to retrieve (RECOMP: top-5).
    """

    def __init__(self, index: PassageIndex, compressor: Any = None, *,
                 template: str = DEFAULT_TEMPLATE, k: int = 5) -> None:
        if "{context}" not in template or "{query}" not in template:
            raise ValueError("template must contain {context} and {query}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.index = index
        self.compressor = compressor
        self.template = template
        self.k = int(k)

    def retrieve(self, query: str, k: int | None = None, **kwargs: Any) -> list[Hit]:
        return self.index.search([query], k or self.k, **kwargs)[0]

    def compress(self, query: str, hits: list[Hit],
                 budget: Budget | float | int | None) -> CompressionResult | None:
        if self.compressor is None or budget is None or not hits:
            return None
        docs = [{"text": h.passage.text, "metadata": {**h.passage.metadata, "id": h.passage.id,
                                                      "score": h.score}} for h in hits]
        return compress_documents(self.compressor, docs, query=query, budget=check_budget(budget))

    def build_prompt(self, query: str, context: str) -> str:
        if not context.strip():
            return query
        return self.template.format(context=context, query=query)

    def run(self, query: str, *, k: int | None = None, budget: Budget | float | int | None = None,
            exclude: Any = None) -> RAGOutput:
        """retrieve -> compress -> build prompt."""
        query = ensure_text(query, name="query")
        hits = self.retrieve(query, k, exclude=exclude)
        res = self.compress(query, hits, budget)
        context = res.text if res is not None else "\n\n".join(h.passage.text for h in hits)
        return RAGOutput(self.build_prompt(query, context), hits, res, context)
