"""ToMe bipartite soft matching (Bolya et al., ICLR 2023, arXiv 2210.09461; facebookresearch/ToMe).

One ToMe step (``tome/merge.py: bipartite_soft_matching`` + ``merge_wavg``): split the tokens
alternately into sets A (even) and B (odd), connect every A token to its most similar B token by
cosine similarity of the keys (averaged over heads), merge the ``r`` most similar edges into
their B token with a size-weighted average, and keep the token sizes for the next step
(``r <= |A|``, at most half the tokens per step).

Deviation (documented in ``docs/vision.md``): ToMe merges ``r`` tokens inside every ViT block
with proportional attention. Here the steps run on the CLIP feature-layer output, repeated
until the image has the budgeted number of tokens, so the vision tower itself is unchanged (as
ToMe is used as a visual-token reduction baseline for LLaVA). Merged keys are size-weighted
averages too, so later steps match on the merged tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ViewResult, ViewTokens, VisualTokenMethod, register_method

__all__ = ["ToMe", "bipartite_merge_step"]


def bipartite_merge_step(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, anchor: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bipartite soft matching step on ``x`` [T, D] with ``metric`` [T, Dk], token ``size``
    [T] and ``anchor`` [T] (original patch each token stands at). Removes ``r`` tokens.

    Returns the new (x, metric, size, anchor); merged tokens keep their B token's anchor.
    """
    T = x.shape[0]
    r = min(int(r), T // 2)
    if r <= 0:
        return x, metric, size, anchor
    m = F.normalize(metric.float(), dim=-1)
    a_idx = torch.arange(0, T, 2, device=x.device)
    b_idx = torch.arange(1, T, 2, device=x.device)
    scores = m[a_idx] @ m[b_idx].T  # [Ta, Tb]
    node_max, node_idx = scores.max(dim=-1)
    edge = torch.argsort(node_max, descending=True, stable=True)
    src, unm = edge[:r], edge[r:]
    dst = node_idx[src]

    def wavg(v: torch.Tensor) -> torch.Tensor:
        w = size.to(v.dtype)[:, None]
        va, vb = (v * w)[a_idx], (v * w)[b_idx]
        vb = vb.index_add(0, dst, va[src])
        return torch.cat([va[unm], vb], 0)

    new_size = torch.cat([size[a_idx][unm], size[b_idx].index_add(0, dst, size[a_idx][src])])
    x_new = wavg(x) / new_size.to(x.dtype)[:, None]
    metric_new = wavg(metric) / new_size.to(metric.dtype)[:, None]
    anchor_new = torch.cat([anchor[a_idx][unm], anchor[b_idx]])
    return x_new, metric_new, new_size, anchor_new


@register_method
@dataclass
class ToMe(VisualTokenMethod):
    """ToMe token merging down to the budget.

    Args:
        layer: CLIP layer whose keys are the similarity metric (``-2``, LLaVA's feature layer).
        spatial_order: emit merged tokens in the order of their anchor patches (``True``) or in
            ToMe's own order (unmerged A tokens, then B tokens).
    """

    layer: int = -2
    spatial_order: bool = True

    name = "tome"

    @property
    def score_layer(self) -> int:
        return self.layer

    def compress_view(self, view: ViewTokens, k: int) -> ViewResult:
        idx = torch.nonzero(view.valid_mask(), as_tuple=False).flatten()
        x, metric = view.feats[idx], view.keys[idx].float()
        size = torch.ones(idx.numel(), device=x.device, dtype=torch.float32)
        anchor = idx
        if k <= 0:
            return ViewResult(x[:0], anchor[:0])
        while x.shape[0] > k:
            x, metric, size, anchor = bipartite_merge_step(x, metric, size, anchor, x.shape[0] - k)
        if self.spatial_order:
            order = torch.argsort(anchor)
            x, anchor = x[order], anchor[order]
        return ViewResult(x, anchor)
