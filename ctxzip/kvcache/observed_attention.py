"""Observed attention: each key's attention averaged over the queries that can see it
(H2O's accumulated-attention score, Zhang et al., 2023, arXiv 2306.14048, normalised for the
causal mask as in kvpress's ``ObservedAttentionPress`` and the "global" part of EMS's score).

kvpress computes this score from the eager attention matrix; here it comes from
:func:`ctxzip.kernels.attention_mass` (blockwise, no ``N x N`` matrix), so SDPA models work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerContext, ScorerPress

__all__ = ["ObservedAttentionPress", "observed_attention_score"]


def observed_attention_score(ctx: LayerContext, gqa: str = "mean", normalize: bool = True) -> torch.Tensor:
    """``[B, Hkv, T]``: attention each key receives from all prefill queries (column sums of the
    causal softmax matrix), divided by the number of real queries that can attend to it when
    ``normalize`` (otherwise H2O's raw sum, biased towards early tokens)."""
    mass = ctx.attention_mass(window=None, gqa=gqa)
    if not normalize:
        return mass
    t = ctx.seq_len
    if ctx.key_padding is None:
        n_seen = torch.arange(t, 0, -1, device=mass.device, dtype=torch.float32)
    else:
        real = ctx.key_padding.float()
        n_seen = real.flip(-1).cumsum(-1).flip(-1).clamp_min(1.0)[:, None, :]
    return mass / n_seen


@dataclass
class ObservedAttentionPress(ScorerPress):
    """Keep the keys with the largest average attention over every prefill query.

    Args:
        budget: tokens kept per layer (see :class:`~ctxzip.kvcache.base.BasePress`).
        gqa: how the query heads of a GQA group vote for their shared KV head: ``"mean"``
            (kvpress) or ``"sum"`` (H2O; same ranking per head, different scale for
            ``head_budget="adaptive"``).
        normalize: divide by the number of queries that can see each key (kvpress's
            ObservedAttention). ``False`` is H2O's raw accumulated score.
        head_budget / min_head_fraction: uniform or Ada-KV-style head-wise budgets (see
            :class:`~ctxzip.kvcache.base.ScorerPress`).
    """

    gqa: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gqa not in ("mean", "sum"):
            raise ValueError("gqa must be 'mean' or 'sum'")

    def uses_prefill_mass(self) -> bool:
        return True

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return observed_attention_score(ctx, self.gqa, self.normalize)
