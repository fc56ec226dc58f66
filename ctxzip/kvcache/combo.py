"""Evict, then quantize what is kept: an eviction press (SnapKV, H2O, ...) chooses the tokens,
GEAR or KIVI stores them. Bytes multiply: keep rate x (quantized bytes / fp bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..budget import topk_indices
from .base import BasePress, LayerContext, ScorerPress, layer_keep_counts
from .cache import EvictedLayer
from .gear import GEARLayer, GEARPress
from .kivi import KIVIPress
from .snapkv import SnapKVPress

__all__ = ["EvictThenQuantizePress"]


@dataclass
class EvictThenQuantizePress(BasePress):
    """Run ``evict`` (a uniform-budget :class:`~ctxzip.kvcache.base.ScorerPress`) on the layer,
    then store the kept tokens with ``quant`` (:class:`~ctxzip.kvcache.gear.GEARPress` or
    :class:`~ctxzip.kvcache.kivi.KIVIPress`). Positions keep counting from the original length.

    Args:
        evict: the eviction press (its own ``budget`` sets the keep rate; ``budget`` of this
            wrapper is ignored).
        quant: the quantized storage of the kept tokens.
    """

    evict: ScorerPress = field(default_factory=SnapKVPress)
    quant: GEARPress | KIVIPress = field(default_factory=GEARPress)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.evict, ScorerPress) or self.evict.head_budget != "uniform":
            raise ValueError("evict must be a ScorerPress with head_budget='uniform'")
        if not isinstance(self.quant, (GEARPress, KIVIPress)):
            raise ValueError("quant must be a GEARPress or a KIVIPress")

    def uses_prefill_mass(self) -> bool:
        return self.evict.uses_prefill_mass()

    def wants_prefill_mass(self, seq_len: int) -> bool:
        return self.evict.wants_prefill_mass(seq_len)

    def kept_indices(self, ctx: LayerContext) -> torch.Tensor:
        """``[B, Hkv, keep]`` positions the eviction press keeps (position order): its scores,
        forced positions and padding handled as in :meth:`ScorerPress.compress_layer`."""
        t = ctx.seq_len
        keep = layer_keep_counts(self.evict.budget, t)
        b, h = ctx.keys.shape[:2]
        if keep >= t:
            return torch.arange(t, device=ctx.keys.device).expand(b, h, t)
        scores = self.evict.score(ctx).float()
        forced = self.evict.forced(ctx, keep)
        if forced is not None:
            scores = torch.where(forced.to(scores.device), torch.full_like(scores, float("inf")), scores)
        if ctx.key_padding is not None:
            scores = scores.masked_fill(~ctx.key_padding[:, None, :], float("-inf"))
        return topk_indices(scores, keep, dim=-1)

    def compress_layer(self, ctx: LayerContext) -> Any:
        if isinstance(self.quant, KIVIPress):
            idx = self.kept_indices(ctx)
            gi = idx.unsqueeze(-1)
            k = ctx.keys.gather(2, gi.expand(-1, -1, -1, ctx.keys.shape[-1]))
            v = ctx.values.gather(2, gi.expand(-1, -1, -1, ctx.values.shape[-1]))
            return self.quant.build_layer(ctx, k, v, idx, ctx.seq_len)
        layer = self.evict.compress_layer(ctx)
        if not isinstance(layer, EvictedLayer):
            return layer
        return GEARLayer(self.quant, layer.keys, layer.values, ctx.layer_idx, layer.logical_length)
