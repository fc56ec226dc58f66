"""Decoding-time compression: re-compress the cache every ``interval`` generated tokens back to
a target size, with any score-based press (kvpress's ``DecodingPress`` idea; H2O's online
eviction is the special case ``interval=1`` with accumulated scores)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .._hf_compat import cache_from_kwargs
from .base import BasePress, LayerContext, ScorerPress, evict
from .cache import EvictedLayer, is_sliding_layer
from .snapkv import SnapKVPress

__all__ = ["DecodingPress"]


@dataclass
class DecodingPress(BasePress):
    """Keep a long generation within ``budget`` tokens per layer.

    Prefill: the context is compressed by ``press`` (its own budget) when ``compress_prefill``,
    else kept whole. Decoding: the layer input hidden states of the last ``interval`` tokens are
    buffered; every ``interval`` new tokens, if the layer holds more than ``budget`` entries,
    ``press`` scores the cache with those buffered tokens as the observation window (queries
    recomputed from them) and the layer is cut back to the budget. Positions keep counting from
    the true length.

    Args:
        budget: ``Budget(tokens=N)`` - entries per layer after each re-compression (a ``rate``
            is applied to the prefill length).
        press: the scoring press (uniform head budget), e.g. SnapKV, H2O, KNorm.
        interval: re-compress every this many generated tokens.
        compress_prefill: also compress the prefill with ``press``.
    """

    press: ScorerPress = field(default_factory=SnapKVPress)
    interval: int = 32
    compress_prefill: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interval < 1:
            raise ValueError("interval must be >= 1")
        if not isinstance(self.press, ScorerPress) or self.press.head_budget != "uniform":
            raise ValueError("press must be a ScorerPress with head_budget='uniform'")
        self._buf: dict[int, dict[str, Any]] = {}
        self._target: dict[int, int] = {}

    def uses_prefill_mass(self) -> bool:
        return self.compress_prefill and self.press.uses_prefill_mass()

    def wants_prefill_mass(self, seq_len: int) -> bool:
        return self.compress_prefill and self.press.wants_prefill_mass(seq_len)

    def compress_layer(self, ctx: LayerContext) -> Any:
        self._target[ctx.layer_idx] = self.budget.resolve(ctx.seq_len) if self.budget.rate else int(
            self.budget.tokens
        )
        self._buf[ctx.layer_idx] = {"h": None, "cos": None, "sin": None, "steps": 0}
        if self.compress_prefill:
            return self.press.compress_layer(ctx)
        return EvictedLayer(ctx.keys, ctx.values, ctx.seq_len)

    def _on_attention(self, module, n_layers, args, kwargs, state) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache = cache_from_kwargs(kwargs)
        if hidden is None or not isinstance(cache, Cache) or module.layer_idx >= len(cache.layers):
            return
        idx = module.layer_idx
        layer = cache.layers[idx]
        if (
            type(layer) is DynamicLayer
            and not is_sliding_layer(layer)
            and layer.keys is not None
            and layer.keys.shape[-2] == hidden.shape[1]
        ):
            return super()._on_attention(module, n_layers, args, kwargs, state)
        if not isinstance(layer, EvictedLayer) or idx not in self._buf:
            return
        kp = state.get("key_padding")
        if kp is not None and not bool(kp.all()):
            raise ValueError("DecodingPress does not support padded batches during decoding")
        buf = self._buf[idx]
        cos, sin = kwargs["position_embeddings"]
        if buf["h"] is None:
            buf["h"], buf["cos"], buf["sin"] = hidden, cos, sin
        else:
            buf["h"] = torch.cat([buf["h"], hidden], 1)[:, -self.interval :]
            buf["cos"] = torch.cat([buf["cos"], cos], -2)[..., -self.interval :, :]
            buf["sin"] = torch.cat([buf["sin"], sin], -2)[..., -self.interval :, :]
        buf["steps"] += hidden.shape[1]
        if buf["steps"] < self.interval:
            return
        buf["steps"] = 0
        target = self._target[idx]
        if layer.stored_length() <= target:
            return
        ctx = LayerContext(
            module=module, layer_idx=idx, n_layers=n_layers, hidden_states=buf["h"],
            position_embeddings=(buf["cos"], buf["sin"]), keys=layer.keys, values=layer.values,
            key_padding=None, cache=cache,
        )
        with torch.no_grad():
            scores = self.press.score(ctx).float()
            forced = self.press.forced(ctx, target)
            if forced is not None:
                scores = torch.where(forced, torch.full_like(scores, float("inf")), scores)
            new = evict(ctx, scores, target)
        new.logical_length = layer.logical_length
        cache.layers[idx] = new


