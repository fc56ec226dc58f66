"""Retrieval pipeline (faiss), RECOMP training, LangChain/LlamaIndex adapters, HTTP service.

The adapters (:mod:`ctxzip.rag.langchain`, :mod:`ctxzip.rag.llamaindex`) and the service
(:mod:`ctxzip.rag.service`) import their optional dependencies and are not imported here.
"""

from ctxzip.rag.index import Hit, Passage, PassageIndex, chunk_words, index_documents
from ctxzip.rag.pipeline import DEFAULT_TEMPLATE, RAGOutput, RAGPipeline, compress_documents

__all__ = [
    "Hit",
    "Passage",
    "PassageIndex",
    "chunk_words",
    "index_documents",
    "RAGPipeline",
    "RAGOutput",
    "DEFAULT_TEMPLATE",
    "compress_documents",
]
