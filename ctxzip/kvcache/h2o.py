"""H2O: heavy hitters by accumulated attention + a recent window (Zhang et al., 2023,
arXiv 2306.14048; FMInference/H2O ``H2OKVCache_LayerWise``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerContext, ScorerPress

__all__ = ["H2OPress"]


@dataclass
class H2OPress(ScorerPress):
    """Score = attention accumulated over *all* prefill queries (column sums of the softmax
    matrix, computed blockwise by :func:`ctxzip.kernels.attention_mass`, no N x N matrix);
    the budget is split between ``recent`` tokens and heavy hitters.

    The paper's setting keeps heavy ratio 0.1 + recent ratio 0.1 (20 %), i.e. an even split:
    ``recent_fraction=0.5``. GQA: scores are summed over each group of query heads (H2O sums
    over batch and heads of a KV head). The accumulated score is biased towards early tokens
    (causal mask): that is the method, kept as is; see EMS for a corrected score.

    Args:
        budget: tokens kept per layer (see :class:`~ctxzip.kvcache.base.BasePress`).
        recent_fraction: share of the budget given to the most recent tokens.
    """

    recent_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError("recent_fraction must be in [0, 1]")

    def uses_prefill_mass(self) -> bool:
        return True

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.attention_mass(window=None, gqa="sum")

    def forced(self, ctx: LayerContext, keep: int) -> torch.Tensor:
        t = ctx.seq_len
        r = min(int(round(self.recent_fraction * keep)), t)
        m = torch.zeros(t, dtype=torch.bool, device=ctx.keys.device)
        if r:
            m[t - r :] = True
        return m
