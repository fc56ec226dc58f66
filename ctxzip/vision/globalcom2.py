"""GlobalCom² (Liu et al., 2025, arXiv 2501.05179; code xuyang-liu16/GlobalCom2,
``llava/model/llava_arch.py``): thumbnail-guided compression of AnyRes (LLaVA-NeXT) crops.

* Scores: [CLS]->patch attention of the **last** CLIP layer, averaged over heads, for the
  thumbnail and for every crop.
* Thumbnail: keep its top ``floor(R * N)`` tokens by its own [CLS] attention.
* Crop retention: the thumbnail's score map is split evenly into the crop grid; ``s_c`` = the
  attention mass in region ``c``; ``sigma = softmax((s - max s) / tau)``; ``r_c = min(1, R * (1 +
  sigma_c - mean(sigma)))``.
* Crop token score: ``l2norm(crop's own [CLS] attention) + l2norm(thumbnail map bilinearly
  resized to the unpadded crop canvas)``; keep the top ``r_c * N_c`` valid tokens of each crop.
* Tokens stay in spatial order and ``image_newline`` tokens are kept (the wrapper does that).

``R`` is the image's budget rate (``budget.resolve(n) / n``). The per-crop counts ``r_c * N_c``
are turned into an allocation that meets the budget exactly with
:func:`ctxzip.budget.allocate` (``method="score"``, crop sizes as ceilings). On single-view
images (LLaVA-1.5, Qwen2-VL) only the thumbnail rule applies.
Deviation: the reference emits thumbnail tokens in score order; they stay in spatial order here.
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

__all__ = ["GlobalCom2"]


@register_method
@dataclass
class GlobalCom2(VisualTokenMethod):
    """GlobalCom² thumbnail-guided per-crop retention.

    Args:
        tau: softmax temperature of the crop allocation (10 in the code; with region sums <= 1
            the allocation is then nearly flat - see PAPERS.md).
        layer: CLIP layer scored (``-1``: the last layer, as the code).
    """

    tau: float = 10.0
    layer: int = -1

    name = "globalcom2"
    head_reduce = "mean"  # attn_maps averaged over heads, so region sums are <= 1

    def __post_init__(self) -> None:
        if not float(self.tau) > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")

    @property
    def score_layer(self) -> int:
        return self.layer

    def compress_view(self, view: ViewTokens, k: int) -> ViewResult:
        keep = topk_indices(masked_scores(view), k)
        return ViewResult(view.feats[keep], keep)

    def crop_rates(self, thumb: ViewTokens, crop_grid: tuple[int, int], R: float) -> np.ndarray:
        """``r_c`` for every crop (raster order) from the thumbnail's attention map."""
        nh, nw = crop_grid
        h, w = thumb.grid
        amap = thumb.scores.float().view(h, w)
        rows = np.array_split(np.arange(h), nh)
        cols = np.array_split(np.arange(w), nw)
        s = torch.stack([amap[r[0]: r[-1] + 1, c[0]: c[-1] + 1].sum() for r in rows for c in cols])
        sigma = torch.softmax((s - s.max()) / self.tau, dim=0)
        return torch.clamp(R * (1 + sigma - sigma.mean()), max=1.0).cpu().numpy()

    def compress_image(self, image: ImageTokens, budget: Budget | None) -> list[ViewResult] | None:
        if budget is None:
            raise ValueError("globalcom2 needs a budget")
        n = image.n_valid
        total = budget.resolve(n)
        if total >= n:
            return None
        if image.base is None or not image.crop_views:
            return super().compress_image(image, budget)
        R = total / n
        thumb = image.views[image.base]
        crops = [image.views[i] for i in image.crop_views]
        k_thumb = min(int(np.floor(R * thumb.n_valid)), total)
        rates = self.crop_rates(thumb, image.crop_grid, R)
        sizes = [c.n_valid for c in crops]
        k_crops = allocate(total - k_thumb, sizes, scores=rates * np.array(sizes), method="score")
        canvas_scores = self._canvas_guidance(thumb, crops, image.crop_grid)
        out: list[ViewResult | None] = [None] * len(image.views)
        out[image.base] = self.compress_view(thumb, k_thumb)
        for vi, view, kc, guide in zip(image.crop_views, crops, k_crops, canvas_scores):
            if int(kc) >= view.n_valid:
                out[vi] = keep_all(view)
                continue
            local = F.normalize(view.scores.float(), dim=0) + F.normalize(guide, dim=0)
            if view.valid is not None:
                local = local.masked_fill(~view.valid, float("-inf"))
            keep = topk_indices(local, int(kc))
            out[vi] = ViewResult(view.feats[keep], keep)
        for i, v in enumerate(out):  # views that are neither thumbnail nor crop: unchanged
            if v is None:
                out[i] = keep_all(image.views[i])
        return out  # type: ignore[return-value]

    @staticmethod
    def _canvas_guidance(thumb: ViewTokens, crops: list[ViewTokens], crop_grid: tuple[int, int]) -> list[torch.Tensor]:
        """Thumbnail attention resized (bilinear) to the unpadded crop canvas, split per crop."""
        nh, nw = crop_grid
        h, w = crops[0].grid
        valid = torch.zeros(nh * h, nw * w, dtype=torch.bool)
        for ci, c in enumerate(crops):
            r, cc = divmod(ci, nw)
            valid[r * h:(r + 1) * h, cc * w:(cc + 1) * w] = c.valid_mask().view(h, w).cpu()
        rows = torch.nonzero(valid.any(1)).flatten()
        cols = torch.nonzero(valid.any(0)).flatten()
        canvas = torch.zeros(nh * h, nw * w, dtype=torch.float32)
        if rows.numel() and cols.numel():
            r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            tmap = thumb.scores.float().cpu().view(1, 1, *thumb.grid)
            canvas[r0:r1, c0:c1] = F.interpolate(tmap, size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False)[0, 0]
        out = []
        for ci, c in enumerate(crops):
            r, cc = divmod(ci, nw)
            out.append(canvas[r * h:(r + 1) * h, cc * w:(cc + 1) * w].reshape(-1).to(c.feats.device))
        return out
