"""Evict, then quantize what is kept: an eviction press (SnapKV, EMS, ...) chooses the tokens,
GEAR stores them. Bytes multiply: keep rate x (GEAR bytes / fp bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import BasePress, LayerContext, ScorerPress
from .cache import EvictedLayer
from .gear import GEARLayer, GEARPress
from .snapkv import SnapKVPress

__all__ = ["EvictThenQuantizePress"]


@dataclass
class EvictThenQuantizePress(BasePress):
    """Run ``evict`` (a uniform-budget :class:`~ctxzip.kvcache.base.ScorerPress`) on the layer,
    then store the kept tokens with ``quant`` (:class:`~ctxzip.kvcache.gear.GEARPress`).
    Positions keep counting from the original length.

    Args:
        evict: the eviction press (its own ``budget`` sets the keep rate; ``budget`` of this
            wrapper is ignored).
        quant: the GEAR settings used for the kept tokens.
    """

    evict: ScorerPress = field(default_factory=SnapKVPress)
    quant: GEARPress = field(default_factory=GEARPress)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.evict, ScorerPress) or self.evict.head_budget != "uniform":
            raise ValueError("evict must be a ScorerPress with head_budget='uniform'")
        if not isinstance(self.quant, GEARPress):
            raise ValueError("quant must be a GEARPress")

    def compress_layer(self, ctx: LayerContext) -> Any:
        layer = self.evict.compress_layer(ctx)
        if not isinstance(layer, EvictedLayer):
            return layer
        return GEARLayer(self.quant, layer.keys, layer.values, ctx.layer_idx, layer.logical_length)
