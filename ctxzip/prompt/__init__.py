"""Text-level compressors: baselines, token classifier (LLMLingua-2), perplexity (LLMLingua-1 /
LongLLMLingua), code (LongCodeZip), retrieved documents (RECOMP)."""

from ctxzip.prompt.abstractive import AbstractiveCompressor
from ctxzip.prompt.baselines import RandomDropCompressor, TruncationCompressor
from ctxzip.prompt.extractive import ExtractiveCompressor

__all__ = [
    "AbstractiveCompressor",
    "ExtractiveCompressor",
    "RandomDropCompressor",
    "TruncationCompressor",
]
