"""LLaVA-PruMerge (Shang et al., 2024, arXiv 2403.15388; code 42Shawn/LLaVA-PruMerge,
``llava/model/multimodal_encoder/clip_encoder.py: token_prune_merge_advanced``).

* Score: [CLS] attention of CLIP layer 23 of 24 (``layers[-2]``), computed as *one* head over the
  full ``q_proj`` / ``k_proj`` outputs: ``softmax(q_cls k^T / sqrt(C))`` (C = vision width).
* Adaptive count: the patches whose score is an IQR outlier (``> Q3 + 1.5 IQR``) are kept.
* Merge: every kept token ``i`` takes its ``neighbors`` (32) most key-similar tokens among all
  other patches (cosine of the full keys) and becomes ``x_i + sum_j a_j x_j`` (weights = the [CLS]
  attention, not normalised, as in the code).
* One extra token: the attention-weighted sum of the pruned tokens.
* Output order: kept tokens in score order, then the extra token.

Budget: with ``adaptive=None`` (default) the count is adaptive when ``prune`` gets no budget and
fixed (``budget - 1`` kept + 1 extra token) when it gets one; ``adaptive=True`` uses the IQR count
capped by the budget. Deviation: the reference computes the IQR over the whole batch's scores at
once (so the count depends on the batch); here it is per image view, as the paper describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctxzip.budget import Budget, topk_indices

from .base import (
    ImageTokens,
    ViewResult,
    ViewTokens,
    VisualTokenMethod,
    keep_all,
    masked_scores,
    register_method,
)

__all__ = ["PruMerge", "iqr_outlier_count"]


def iqr_outlier_count(scores: torch.Tensor) -> int:
    """Number of values above ``Q3 + 1.5 * IQR`` (linear-interpolated quartiles, as numpy)."""
    s = scores.float().flatten()
    if s.numel() == 0:
        return 0
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device))
    return int((s > q3 + 1.5 * (q3 - q1)).sum())


@register_method
@dataclass
class PruMerge(VisualTokenMethod):
    """LLaVA-PruMerge: adaptive IQR selection + key-similarity merging.

    Args:
        adaptive: ``None`` = adaptive count only when no budget is given; ``True`` = IQR count
            (capped by the budget if one is given); ``False`` = the budget sets the count.
        neighbors: tokens merged into each kept token (32 in ``token_prune_merge_advanced``).
        extra_token: append the attention-weighted sum of the pruned tokens (the code does);
            it counts toward the budget.
        layer: CLIP layer scored (``-2``: layer 23 of CLIP-L/336).
    """

    adaptive: bool | None = None
    neighbors: int = 32
    extra_token: bool = True
    layer: int = -2

    name = "prumerge"
    score_kind = "single"
    key_kind = "full"

    def __post_init__(self) -> None:
        if int(self.neighbors) < 0:
            raise ValueError(f"neighbors must be >= 0, got {self.neighbors!r}")

    @property
    def score_layer(self) -> int:
        return self.layer

    def compress_image(self, image: ImageTokens, budget: Budget | None) -> list[ViewResult] | None:
        adaptive = self.adaptive if self.adaptive is not None else budget is None
        n = image.n_valid
        if not adaptive:
            if budget is None:
                raise ValueError("prumerge with adaptive=False needs a budget")
            return super().compress_image(image, budget)
        cap = n if budget is None else budget.resolve(n)
        counts = []
        for v in image.views:
            c = iqr_outlier_count(v.scores[v.valid_mask()]) + (1 if self.extra_token else 0)
            counts.append(min(c, v.n_valid))
        if sum(counts) > cap:  # share the cap in proportion to the adaptive counts
            from ctxzip.budget import allocate

            counts = allocate(cap, counts, method="proportional").tolist()
        if sum(counts) >= n:
            return None
        return [keep_all(v) if c >= v.n_valid else self.compress_view(v, int(c)) for v, c in zip(image.views, counts)]

    def compress_view(self, view: ViewTokens, k: int) -> ViewResult:
        device = view.feats.device
        valid = torch.nonzero(view.valid_mask(), as_tuple=False).flatten()
        n_keep = max(k - (1 if self.extra_token else 0), 0)
        s = masked_scores(view)
        keep = topk_indices(s, n_keep, sort_by_position=False)  # score order, as torch.topk
        attn = view.scores.float()
        x = view.feats
        out = x[keep]
        if n_keep and self.neighbors > 0 and valid.numel() > 1:
            kn = F.normalize(view.keys.float(), dim=-1)
            sim = kn[keep] @ kn.T  # [n_keep, N]
            sim[torch.arange(n_keep, device=device), keep] = float("-inf")  # not itself
            if view.valid is not None:
                sim[:, ~view.valid] = float("-inf")
            nb = min(int(self.neighbors), valid.numel() - 1)
            nbr = sim.topk(nb, dim=-1).indices  # [n_keep, nb]
            w = attn[nbr].to(x.dtype)[..., None]
            out = out + (x[nbr] * w).sum(dim=1)
        src = keep
        if self.extra_token and k >= 1:
            pruned = torch.ones(view.n, dtype=torch.bool, device=device)
            pruned[keep] = False
            pruned &= view.valid_mask()
            extra = (x[pruned] * attn[pruned].to(x.dtype)[:, None]).sum(0, keepdim=True)
            out = torch.cat([out, extra], 0)
            src = torch.cat([src, torch.full((1,), -1, dtype=torch.long, device=device)])
        return ViewResult(out, src)
