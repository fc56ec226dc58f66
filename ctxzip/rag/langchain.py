"""LangChain integration: a ``BaseDocumentCompressor`` backed by any ctxzip compressor.

Use it where LangChain's ``LLMLinguaCompressor`` goes, e.g. in a
``ContextualCompressionRetriever``::

    from ctxzip.prompt import ExtractiveCompressor
    from ctxzip.rag.langchain import CtxzipDocumentCompressor

    comp = CtxzipDocumentCompressor(compressor=ExtractiveCompressor(), budget=0.2)
    docs = comp.compress_documents(retrieved_docs, query="...")

Every output ``Document`` keeps its source's ``metadata`` (plus ``metadata["ctxzip"]`` with the
compression stats); extractive compression returns one document per source that kept anything.
Needs the ``langchain`` extra (``pip install ctxzip[langchain]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import Document
    from langchain_core.documents.compressor import BaseDocumentCompressor
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ctxzip.rag.langchain needs langchain-core: pip install 'ctxzip[langchain]'"
    ) from e
from pydantic import ConfigDict, Field

from ctxzip.rag._adapt import compress_for_framework

__all__ = ["CtxzipDocumentCompressor"]


class CtxzipDocumentCompressor(BaseDocumentCompressor):
    """LangChain document compressor running a ctxzip compressor over retrieved documents.

    Args:
        compressor: a ctxzip compressor (default: ``ExtractiveCompressor()`` with MiniLM).
        budget: a ``Budget``, a rate (``0.2``), a count (``200``) or a string (``"5x"``).
        keep_empty: keep documents from which nothing was selected (with empty text).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    compressor: Any = Field(default=None)
    budget: Any = 0.2
    keep_empty: bool = False

    def model_post_init(self, __context: Any) -> None:
        if self.compressor is None:
            from ctxzip.prompt import ExtractiveCompressor

            self.compressor = ExtractiveCompressor()

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        docs = list(documents)
        out = compress_for_framework(
            self.compressor, [d.page_content for d in docs], [dict(d.metadata) for d in docs],
            query, self.budget, keep_empty=self.keep_empty,
        )
        result = []
        for idx, text, extra in out:
            if idx is None:
                result.append(Document(page_content=text, metadata=extra))
            else:
                src = docs[idx]
                result.append(Document(page_content=text, metadata={**src.metadata, **extra},
                                       id=getattr(src, "id", None)))
        return result
