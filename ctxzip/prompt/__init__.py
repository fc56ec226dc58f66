"""Text-level compressors: baselines, token classifier (LLMLingua-2), perplexity (LLMLingua-1 /
LongLLMLingua), code (LongCodeZip), retrieved documents (RECOMP)."""

from ctxzip.prompt.baselines import RandomDropCompressor, TruncationCompressor

__all__ = ["RandomDropCompressor", "TruncationCompressor"]
