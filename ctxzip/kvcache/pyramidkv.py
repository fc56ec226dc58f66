"""PyramidKV: layer-wise budgets shaped like a pyramid (Cai et al., 2024, "PyramidKV: Dynamic
KV Cache Compression based on Pyramidal Information Funneling", arXiv 2406.02069;
Zefan-Cai/KVCache-Factory ``pyramidkv_utils.py``).

Attention is spread wide in lower layers and concentrates in upper ones, so lower layers get
more of the cache. With ``L`` layers and an average of ``k`` tokens per layer, the paper sets the
top layer's budget to ``k / beta`` and the bottom one's to ``2k - k / beta`` and interpolates
linearly (an arithmetic sequence, so the total stays ``L * k``); inside each layer tokens are
chosen as in SnapKV (observation-window votes, pooled, window kept).

The layer budgets go through :func:`ctxzip.budget.allocate` (``method="score"`` with the
pyramid as weights, capped at the context length so a capped layer's surplus is handed to the
others). Layers of different lengths are stored ragged (:class:`~ctxzip.kvcache.cache.RaggedLayer`,
no padding in memory) and share one padded length for transformers' single attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..budget import allocate
from .base import LayerContext, evict_headwise
from .cache import EvictedLayer, is_sliding_layer
from .snapkv import SnapKVPress

__all__ = ["PyramidKVPress", "pyramid_budgets"]


def pyramid_budgets(per_layer: int, n_layers: int, seq_len: int, beta: float) -> list[int]:
    """Budgets of ``n_layers`` layers (bottom first) averaging ``per_layer`` tokens: linear from
    ``2k - k/beta`` down to ``k/beta``, each at most ``seq_len``."""
    if n_layers <= 1:
        return [min(per_layer, seq_len)] * n_layers
    k = float(per_layer)
    top, bottom = k / beta, 2 * k - k / beta
    weights = [bottom - (bottom - top) * i / (n_layers - 1) for i in range(n_layers)]
    counts = allocate(per_layer * n_layers, [seq_len] * n_layers, weights, method="score")
    return [int(c) for c in counts]


@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV selection with pyramid-shaped layer budgets.

    Args:
        budget: average tokens kept per layer (the total over layers equals a uniform press's).
        beta: steepness; the top layer keeps ``k / beta`` tokens (paper: 20).
        window / kernel / pooling: SnapKV's observation window and vote pooling (the paper's
            code uses window 8 with max pooling of kernel 7 for LongBench; SnapKV code: 32, avg, 5).
        head_budget: ``"uniform"`` or ``"adaptive"`` (Ada-KV head-wise split inside each layer).
    """

    beta: float = 20.0
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta >= 1.0:
            raise ValueError("beta must be >= 1")
        self.needs_ctxzip_attention = True  # layers of different lengths are stored ragged

    def layer_budgets(self, seq_len: int, n_layers: int) -> list[int]:
        key = (seq_len, n_layers)
        if key not in self._cache:
            self._cache[key] = pyramid_budgets(self.budget.resolve(seq_len), n_layers, seq_len, self.beta)
        return self._cache[key]

    def compress_layer(self, ctx: LayerContext):
        t = ctx.seq_len
        if self.budget.resolve(t) >= t:
            return EvictedLayer(ctx.keys, ctx.values, t)
        # the pyramid spans the full-attention layers only (Gemma 3's sliding layers stay as they are)
        full = [i for i, layer in enumerate(ctx.cache.layers) if not is_sliding_layer(layer)]
        budgets = self.layer_budgets(t, len(full))
        keep = budgets[full.index(ctx.layer_idx)]
        h = ctx.keys.shape[1]
        scores = self.score(ctx).float()
        forced = self.forced(ctx, keep)
        if forced is not None:
            scores = torch.where(forced.to(scores.device), torch.full_like(scores, float("inf")), scores)
        if ctx.key_padding is not None:
            scores = scores.masked_fill(~ctx.key_padding[:, None, :], float("-inf"))
        kmax = max(budgets)
        if self.head_budget == "uniform":
            return evict_headwise(ctx, scores, [keep] * h, pad_to=kmax)
        return evict_headwise(
            ctx, scores, self.head_counts(scores, keep), pad_to=self.max_head_count(ctx, kmax)
        )
