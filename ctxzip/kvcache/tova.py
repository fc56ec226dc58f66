"""TOVA: Token Omission Via Attention (Oren et al., 2024, "Transformers are Multi-State RNNs",
arXiv 2401.06104; schwartz-lab-NLP/TOVA).

TOVA evicts the token with the lowest attention from the *current* (last) query, averaged over
the heads of the layer, so every head of a layer keeps the same tokens. Applied once after the
prefill, as here (and in kvpress's ``TOVAPress``), that is one top-k over the last query's
attention. The paper runs it at every decoding step; for the prefill-compression setting of
this module the one-shot form is the faithful one (see :class:`~ctxzip.kvcache.DecodingPress`
to re-compress while decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerContext, ScorerPress

__all__ = ["TOVAPress"]


@dataclass
class TOVAPress(ScorerPress):
    """Score = attention of the last ``window`` queries (paper: 1) averaged over all query heads
    of the layer (``head_average=True``, the paper's layer-wise policy) or per KV head.

    Args:
        budget: tokens kept per layer (see :class:`~ctxzip.kvcache.base.BasePress`).
        window: number of final queries whose attention is averaged (the paper uses the single
            current query).
        head_average: one shared ranking for the whole layer (paper) instead of one per KV head.
        keep_last: always keep the last token (kvpress does, so the next step sees it).
    """

    window: int = 1
    head_average: bool = True
    keep_last: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError("window must be >= 1")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        w = min(self.window, ctx.seq_len)
        mass = ctx.attention_mass(window=w, gqa="mean") / w  # [B, Hkv, T]
        if self.head_average:
            mass = mass.mean(1, keepdim=True).expand_as(mass)
        return mass

    def forced(self, ctx: LayerContext, keep: int) -> torch.Tensor | None:
        if not self.keep_last or keep < 1:
            return None
        m = torch.zeros(ctx.seq_len, dtype=torch.bool, device=ctx.keys.device)
        m[-1] = True
        return m
