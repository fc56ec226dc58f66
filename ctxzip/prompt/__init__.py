"""Text-level compressors: baselines, token classifier (LLMLingua-2), perplexity (LLMLingua-1 /
LongLLMLingua), code (LongCodeZip), retrieved documents (RECOMP)."""

from ctxzip.prompt.abstractive import AbstractiveCompressor
from ctxzip.prompt.baselines import RandomDropCompressor, TruncationCompressor
from ctxzip.prompt.code import CodeCompressor
from ctxzip.prompt.distill import DistillConfig, load_default_classifier
from ctxzip.prompt.extractive import ExtractiveCompressor
from ctxzip.prompt.perplexity import PerplexityCompressor
from ctxzip.prompt.token_classifier import TokenClassifierCompressor

__all__ = [
    "RandomDropCompressor",
    "TruncationCompressor",
    "TokenClassifierCompressor",
    "PerplexityCompressor",
    "DistillConfig",
    "load_default_classifier",
    "CodeCompressor",
    "ExtractiveCompressor",
    "AbstractiveCompressor",
]
