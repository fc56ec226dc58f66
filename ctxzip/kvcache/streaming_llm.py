"""StreamingLLM: attention sinks + a recent window (Xiao et al., 2023, arXiv 2309.17453;
mit-han-lab/streaming-llm ``kv_cache.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerContext, ScorerPress

__all__ = ["StreamingLLMPress"]


@dataclass
class StreamingLLMPress(ScorerPress):
    """Keep the first ``n_sink`` tokens (attention sinks) and the most recent ones.

    No scoring: with a per-layer budget of ``K`` tokens the cache keeps tokens ``0..n_sink-1`` and
    the last ``K - n_sink``. The paper caches keys *before* RoPE and re-rotates them to positions
    inside the cache (position shift) so the model can run beyond its training length. Here the
    context is shorter than the training length, so kept keys keep their original rotation and
    decoding continues at the original positions (as kvpress does without its key-rerotation
    wrapper); this is the faithful choice for compression within the trained context.

    Args:
        budget: tokens kept per layer (see :class:`~ctxzip.kvcache.base.BasePress`).
        n_sink: number of initial tokens always kept (paper: 4).
    """

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError("n_sink must be >= 0")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        b, h, t = ctx.keys.shape[:3]
        pos = torch.arange(t, device=ctx.keys.device, dtype=torch.float32)
        s = pos.clone()  # recent tokens score higher
        if ctx.key_padding is not None:
            # sinks are the first *real* tokens of each row
            first = (~ctx.key_padding).sum(-1, keepdim=True).float()  # [B, 1]
            rel = pos[None] - first
            s = torch.where((rel >= 0) & (rel < self.n_sink), torch.full_like(rel, 1e9), pos[None].expand(b, t))
            return s[:, None, :].expand(b, h, t)
        s[: self.n_sink] = 1e9
        return s[None, None].expand(b, h, t)
