"""Baselines every compressor must beat: random token drop and head/tail truncation.

Both work on the counting tokenizer's tokens (default: the target LM's), so the budget is hit
exactly and the achieved rate is comparable with every other method.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from ctxzip.budget import Budget
from ctxzip.compressor import CompressionResult, TextCompressor

__all__ = ["RandomDropCompressor", "TruncationCompressor"]


class RandomDropCompressor(TextCompressor):
    """Keep a uniformly random subset of tokens, in their original order.

    Args:
        seed: random seed; the same text, budget and seed give the same output.
        tokenizer: counting tokenizer (default: the target LM's).
    """

    name = "random"

    def __init__(self, seed: int = 0, tokenizer: Any = None) -> None:
        super().__init__(tokenizer)
        self.seed = int(seed)

    def _compress(
        self, text: str, *, budget: Budget, n_tokens: int, query: str | None, **_: Any
    ) -> CompressionResult:
        ids = self.counter.encode(text)
        k = budget.resolve(len(ids))
        rng = np.random.default_rng(self.seed)
        kept = np.zeros(len(ids), dtype=bool)
        kept[rng.choice(len(ids), size=k, replace=False)] = True
        out = self.counter.tokenizer.decode(np.asarray(ids)[kept].tolist())
        return CompressionResult(out, n_tokens, k, kept=kept)


class TruncationCompressor(TextCompressor):
    """Keep the first (``side="head"``) or last (``side="tail"``) tokens.

    Keep-the-tail is a strong baseline for continuation targets (it keeps the most recent
    text); keep-the-head keeps the beginning of a document.

    Args:
        side: ``"tail"`` (default) or ``"head"``.
        tokenizer: counting tokenizer (default: the target LM's).
    """

    def __init__(self, side: Literal["head", "tail"] = "tail", tokenizer: Any = None) -> None:
        if side not in ("head", "tail"):
            raise ValueError(f"side must be 'head' or 'tail', got {side!r}")
        super().__init__(tokenizer)
        self.side = side
        self.name = f"truncate-{side}"

    def _compress(
        self, text: str, *, budget: Budget, n_tokens: int, query: str | None, **_: Any
    ) -> CompressionResult:
        ids = self.counter.encode(text)
        k = budget.resolve(len(ids))
        kept = np.zeros(len(ids), dtype=bool)
        if k:
            if self.side == "head":
                kept[:k] = True
            else:
                kept[-k:] = True
        out = self.counter.tokenizer.decode(np.asarray(ids)[kept].tolist())
        return CompressionResult(out, n_tokens, k, kept=kept)

    def __repr__(self) -> str:
        return f"TruncationCompressor(side={self.side!r})"
