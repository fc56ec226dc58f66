"""VisionZip (Yang et al., 2024, arXiv 2412.04467; code dvlab-research/VisionZip).

Dominant tokens: the patches with the highest [CLS] attention (summed over heads) at the CLIP
feature layer, plus the [CLS] token itself (``dominant`` counts the [CLS] token, as in
``visionzip/clip_encoder.py``). Contextual tokens: the remaining tokens' keys (that layer's keys
averaged over heads, l2-normalised) are split into ``contextual`` targets picked uniformly by
stride and the rest, each of which joins its most cosine-similar target; a contextual token is
``h_target + mean(h of the tokens assigned to it)`` (target *plus* mean, as in the code).
Output order: [CLS, dominant patches in spatial order, contextual tokens].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctxzip.budget import topk_indices

from .base import ViewResult, ViewTokens, VisualTokenMethod, masked_scores, register_method

__all__ = ["VisionZip"]


@register_method
@dataclass
class VisionZip(VisualTokenMethod):
    """VisionZip dominant + contextual token selection.

    Args:
        contextual_ratio: share of the kept tokens that are contextual (merged) tokens. The
            released settings are 54+10 (64), 108+20 (128), 162+30 (192), i.e. 10/64; the
            number of contextual tokens is ``round(k * contextual_ratio)``.
        layer: CLIP layer (python index into the encoder's layers) whose [CLS] attention and
            keys are used; ``-2`` is LLaVA's feature layer, the one VisionZip uses.
    """

    contextual_ratio: float = 10 / 64
    layer: int = -2

    name = "visionzip"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.contextual_ratio) < 1.0:
            raise ValueError(f"contextual_ratio must be in [0, 1), got {self.contextual_ratio!r}")

    @property
    def score_layer(self) -> int:
        return self.layer

    def compress_view(self, view: ViewTokens, k: int) -> ViewResult:
        device = view.feats.device
        valid = view.valid_mask()
        n_ctx = int(round(k * self.contextual_ratio))
        n_dom = k - n_ctx
        has_cls = view.cls_feat is not None and n_dom >= 1
        n_dom_patch = n_dom - 1 if has_cls else n_dom
        dom = topk_indices(masked_scores(view), n_dom_patch)  # increasing position = spatial order
        rest_mask = valid.clone()
        rest_mask[dom] = False
        rest = torch.nonzero(rest_mask, as_tuple=False).flatten()
        n_ctx = min(n_ctx, int(rest.numel()))
        feats = [view.feats[dom]]
        src = [dom]
        if has_cls:
            feats.insert(0, view.cls_feat[None])
            src.insert(0, torch.full((1,), -1, dtype=torch.long, device=device))
        if n_ctx > 0:
            metric = F.normalize(view.keys[rest].float(), dim=-1)
            step = max(1, rest.numel() // n_ctx)
            tgt_local = torch.arange(0, rest.numel(), step, device=device)[:n_ctx]
            is_tgt = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
            is_tgt[tgt_local] = True
            others = torch.nonzero(~is_tgt, as_tuple=False).flatten()
            h = view.feats[rest]
            ctx = h[tgt_local].clone()
            if others.numel():
                sim = metric[others] @ metric[tgt_local].T  # [n_other, n_ctx]
                assign = sim.argmax(dim=-1)
                sums = torch.zeros_like(ctx).index_add_(0, assign, h[others])
                counts = torch.bincount(assign, minlength=n_ctx).clamp_min(1).to(ctx.dtype)
                ctx = ctx + sums / counts[:, None]
            feats.append(ctx)
            src.append(rest[tgt_local])
        return ViewResult(torch.cat(feats, 0), torch.cat(src, 0))
