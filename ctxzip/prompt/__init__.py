"""Text-level compressors: baselines, token classifier (LLMLingua-2), perplexity (LLMLingua-1 /
LongLLMLingua), code (LongCodeZip), retrieved documents (RECOMP)."""

from ctxzip.prompt.baselines import RandomDropCompressor, TruncationCompressor
from ctxzip.prompt.code import CodeCompressor

__all__ = ["CodeCompressor", "RandomDropCompressor", "TruncationCompressor"]
