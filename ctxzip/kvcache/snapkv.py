"""SnapKV: observation-window voting with pooling (Li et al., 2024, arXiv 2404.14469;
FasterDecoding/SnapKV ``snapkv_utils.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LayerContext, ScorerPress

__all__ = ["SnapKVPress"]


@dataclass
class SnapKVPress(ScorerPress):
    """Keep the prefix tokens the last ``window`` queries attend to most, plus the window.

    Vote: ``v_i = sum over window queries of softmax(q K^T / sqrt(d))[:, i]`` (full-row softmax,
    causal inside the window), averaged over each GQA group of query heads so the selection is
    per KV head and GQA memory savings survive (the original code repeats KV heads first and
    selects per query head). The votes are smoothed by a 1-D pool over positions (``kernel``,
    stride 1) and the top ``K - window`` prefix tokens are kept with the ``window`` tokens.
    Queries are recomputed from the layer input, so SDPA works (no eager attention).

    Args:
        budget: tokens kept per layer (see :class:`~ctxzip.kvcache.base.BasePress`).
        window: observation window (paper code default 32; kvpress uses 64).
        kernel: pooling kernel size (paper code 5; LongBench configs 7).
        pooling: ``"avg"`` (code default) or ``"max"`` (LongBench configs).
        head_budget: ``"uniform"`` (paper) or ``"adaptive"`` (Ada-KV head-wise budgets, ragged).
        gqa: how the query heads sharing a KV head vote: ``"mean"`` (kvpress), ``"sum"`` (same
            ranking, other scale for adaptive budgets) or ``"max"`` (a token is kept if any
            query head of the group needs it - closest to the paper's per-query-head selection
            while keeping one selection per KV head).
    """

    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    gqa: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError("kernel must be a positive odd integer")
        if self.pooling not in ("avg", "max"):
            raise ValueError("pooling must be 'avg' or 'max'")
        if self.gqa not in ("mean", "sum", "max"):
            raise ValueError("gqa must be 'mean', 'sum' or 'max'")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        w = min(self.window, ctx.seq_len)
        if self.gqa == "max":
            per_q = ctx.attention_mass(window=w, gqa="per_head") / w  # [B, Hq, T]
            hkv = ctx.keys.shape[1]
            mass = per_q.view(per_q.shape[0], hkv, -1, per_q.shape[-1]).amax(2)
        else:
            mass = ctx.attention_mass(window=w, gqa=self.gqa) / w  # [B, Hkv, T]
        b, h, t = mass.shape
        if self.kernel > 1:
            x = mass.reshape(b * h, 1, t)
            pad = self.kernel // 2
            if self.pooling == "avg":
                x = F.avg_pool1d(x, self.kernel, stride=1, padding=pad, count_include_pad=False)
                if ctx.key_padding is not None:
                    # average over real tokens only, so a left-padded row scores as it would alone
                    real = ctx.key_padding.float()[:, None, None, :].expand(b, h, 1, t)
                    real = real.reshape(b * h, 1, t)
                    frac = F.avg_pool1d(real, self.kernel, stride=1, padding=pad, count_include_pad=False)
                    x = x / frac.clamp_min(1e-6)
            else:
                x = F.max_pool1d(x, self.kernel, stride=1, padding=pad)
            mass = x.reshape(b, h, t)
        return mass

    def forced(self, ctx: LayerContext, keep: int) -> torch.Tensor:
        t = ctx.seq_len
        w = min(self.window, keep, t)
        m = torch.zeros(t, dtype=torch.bool, device=ctx.keys.device)
        if w:
            m[t - w :] = True
        return m
