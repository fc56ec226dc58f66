"""LlamaIndex integration: a ``BaseNodePostprocessor`` backed by any ctxzip compressor.

Use it where LlamaIndex's ``LongLLMLinguaPostprocessor`` goes::

    from ctxzip.prompt import ExtractiveCompressor
    from ctxzip.rag.llamaindex import CtxzipNodePostprocessor

    post = CtxzipNodePostprocessor(compressor=ExtractiveCompressor(), budget=0.2)
    query_engine = index.as_query_engine(node_postprocessors=[post])

Each output node keeps its source node's ``metadata``, id-derived relationships and score (plus
``metadata["ctxzip"]`` with the compression stats). Needs the ``llamaindex`` extra.
"""

from __future__ import annotations

from typing import Any

try:
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import (
        MetadataMode,
        NodeRelationship,
        NodeWithScore,
        QueryBundle,
        TextNode,
    )
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ctxzip.rag.llamaindex needs llama-index-core: pip install 'ctxzip[llamaindex]'"
    ) from e
from pydantic import Field

from ctxzip.rag._adapt import compress_for_framework

__all__ = ["CtxzipNodePostprocessor"]


class CtxzipNodePostprocessor(BaseNodePostprocessor):
    """LlamaIndex node postprocessor running a ctxzip compressor over retrieved nodes.

    Args:
        compressor: a ctxzip compressor (default: ``ExtractiveCompressor()`` with MiniLM).
        budget: a ``Budget``, a rate (``0.2``), a count (``200``) or a string (``"5x"``).
        keep_empty: keep nodes from which nothing was selected (with empty text).
    """

    compressor: Any = Field(default=None, exclude=True)
    budget: Any = 0.2
    keep_empty: bool = False

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        if self.compressor is None:
            from ctxzip.prompt import ExtractiveCompressor

            self.compressor = ExtractiveCompressor()

    @classmethod
    def class_name(cls) -> str:
        return "CtxzipNodePostprocessor"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("CtxzipNodePostprocessor needs the query (query_bundle/query_str)")
        texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        metas = [dict(n.node.metadata) for n in nodes]
        out = compress_for_framework(self.compressor, texts, metas, query_bundle.query_str,
                                     self.budget, keep_empty=self.keep_empty)
        result = []
        for idx, text, extra in out:
            if idx is None:
                node = TextNode(text=text, metadata=extra)
                result.append(NodeWithScore(node=node, score=None))
                continue
            src = nodes[idx]
            node = TextNode(
                text=text, metadata={**src.node.metadata, **extra},
                excluded_embed_metadata_keys=list(src.node.excluded_embed_metadata_keys),
                excluded_llm_metadata_keys=[*src.node.excluded_llm_metadata_keys, "ctxzip"],
                relationships={NodeRelationship.SOURCE: src.node.as_related_node_info()},
            )
            result.append(NodeWithScore(node=node, score=src.score))
        return result
