"""ctxzip: compress what LLM pipelines read.

Prompts, code context, retrieved documents, KV caches, visual tokens and pretraining corpora,
behind one token-budget abstraction (:class:`Budget`). Subpackages are imported lazily so
``import ctxzip`` stays cheap.
"""

from ctxzip.budget import Budget, allocate, knapsack, topk_indices, topk_mask
from ctxzip.compressor import CompressionResult, TextCompressor

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "allocate",
    "knapsack",
    "topk_indices",
    "topk_mask",
    "CompressionResult",
    "TextCompressor",
    "__version__",
]
