"""Token-level Correlation-guided Compression (Zhang et al., 2024, arXiv 2407.14439).

**UNVERIFIED reconstruction.** The authors' code (JiuTian-VL/TokenCorrCompressor) is not
released; only the abstract is verified (see PAPERS.md §8):

1. patch-patch correlation measures pattern repetitiveness; the redundant tokens give every
   sub-image (crop) an information density that sets its compression ratio;
2. token-level sampling by [CLS]-patch correlation keeps the most informative tokens.

What is reconstructed here (third-party summaries, not checked against the paper body):
the correlation is the cosine similarity of the ViT layer's keys (averaged over heads); a token
is *redundant* when some other token of its view has similarity ``>= threshold``; density =
1 - redundant fraction. With no budget the view keeps ``ceil(density * N)`` tokens (the
parameter-free mode); with a budget, the image budget is split over views in proportion to
``density * N`` (:func:`ctxzip.budget.allocate`). Within a view the top tokens by [CLS]
attention are kept (deterministic top-k; the paper's sampling rule is unknown).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ctxzip.budget import Budget, allocate, topk_indices

from .base import (
    ImageTokens,
    ViewResult,
    ViewTokens,
    VisualTokenMethod,
    keep_all,
    masked_scores,
    register_method,
)

__all__ = ["CorrelationGuided", "information_density"]


def information_density(view: ViewTokens, threshold: float) -> float:
    """1 - fraction of valid tokens with another valid token of key cosine >= ``threshold``."""
    idx = torch.nonzero(view.valid_mask(), as_tuple=False).flatten()
    if idx.numel() <= 1:
        return 1.0
    kn = F.normalize(view.keys[idx].float(), dim=-1)
    sim = kn @ kn.T
    sim.fill_diagonal_(float("-inf"))
    redundant = (sim >= threshold).any(dim=-1).float().mean().item()
    return 1.0 - redundant


@register_method
@dataclass
class CorrelationGuided(VisualTokenMethod):
    """Correlation-guided per-view density allocation + [CLS]-attention top-k (UNVERIFIED).

    Args:
        threshold: key cosine similarity at or above which two tokens count as repeating
            patterns (not given in the abstract; 0.9 is this reconstruction's choice).
        min_density: floor on a view's density so no view is dropped entirely.
        layer: ViT layer whose keys and [CLS] attention are used (``-2``).
    """

    threshold: float = 0.9
    min_density: float = 0.05
    layer: int = -2

    name = "correlation"

    def __post_init__(self) -> None:
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold!r}")
        if not 0.0 <= float(self.min_density) <= 1.0:
            raise ValueError(f"min_density must be in [0, 1], got {self.min_density!r}")

    @property
    def score_layer(self) -> int:
        return self.layer

    def densities(self, image: ImageTokens) -> np.ndarray:
        return np.array([max(information_density(v, self.threshold), self.min_density) for v in image.views])

    def compress_image(self, image: ImageTokens, budget: Budget | None) -> list[ViewResult] | None:
        n = image.n_valid
        sizes = np.array([v.n_valid for v in image.views])
        dens = self.densities(image)
        if budget is None:
            ks = np.minimum(np.ceil(dens * sizes - 1e-9).astype(np.int64), sizes)
        else:
            total = budget.resolve(n)
            if total >= n:
                return None
            ks = allocate(total, sizes, scores=dens * sizes, method="score")
        if int(ks.sum()) >= n:
            return None
        return [keep_all(v) if int(k) >= v.n_valid else self.compress_view(v, int(k)) for v, k in zip(image.views, ks)]

    def compress_view(self, view: ViewTokens, k: int) -> ViewResult:
        keep = topk_indices(masked_scores(view), k)
        return ViewResult(view.feats[keep], keep)


