"""KNorm: keep the keys with the smallest L2 norm (Devoto et al., 2024, "A Simple and
Effective L2 Norm-Based Strategy for KV Cache Compression", arXiv 2406.11430; kvpress
``knorm_press.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerContext, ScorerPress

__all__ = ["KNormPress"]


@dataclass
class KNormPress(ScorerPress):
    """Score = ``-||k||_2`` per KV head: low-norm keys attract attention, so they are kept.

    Needs no queries and no attention, so it adds almost nothing to prefill.

    Args:
        budget: tokens kept per layer (see :class:`~ctxzip.kvcache.base.BasePress`).
    """

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)
