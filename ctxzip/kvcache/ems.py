"""EMS: head-wise Evict-then-Merge with a Global-Local score (Li et al., 2024,
"EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on
Global-Local Importance", arXiv 2412.08521).

**UNVERIFIED reconstruction.** Neither the paper body nor official code could be read here (only
the abstract; see PAPERS.md section 1). What the abstract states and this file follows:
a Global-Local (GL) score combining accumulated attention from global and local query tokens,
motivated by the causal-mask bias of accumulated scores and the positional bias of window
scores; head-wise compression that evicts where a head is sparse and merges where it is
redundant; a zero-class mechanism that turns eviction into merging into an all-zero centre so
all heads run the same operation. Everything marked UNVERIFIED below is our best guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import topk_indices
from .base import LayerContext, ScorerPress
from .cache import EvictedLayer, RaggedLayer

__all__ = ["EMSPress", "global_local_score"]


def global_local_score(
    ctx: LayerContext, window: int, alpha: float, combine: str = "sum"
) -> torch.Tensor:
    """GL score ``[B, Hkv, T]`` (UNVERIFIED operator).

    * global: attention accumulated over all queries divided by the number of queries that can
      see each token (``T - i`` under the causal mask), which removes the causal-mask bias of
      H2O-style sums;
    * local: attention mass from the last ``window`` queries (SnapKV-style);
    each normalised to sum 1 per head, then ``alpha * global + (1 - alpha) * local``
    (``combine="sum"``) or their maximum (``"max"``).
    """
    t = ctx.seq_len
    acc = ctx.attention_mass(window=None, gqa="mean")
    w = min(window, t)
    local = ctx.attention_mass(window=w, gqa="mean")
    n_seen = torch.arange(t, 0, -1, device=acc.device, dtype=torch.float32)
    if ctx.key_padding is not None:
        # only real queries count: real tokens at or after i
        real = ctx.key_padding.float()
        n_seen = real.flip(-1).cumsum(-1).flip(-1).clamp_min(1.0)[:, None, :]
    glob = acc / n_seen
    glob = glob / glob.sum(-1, keepdim=True).clamp_min(1e-12)
    local = local / local.sum(-1, keepdim=True).clamp_min(1e-12)
    if combine == "max":
        return torch.maximum(glob, local)
    return alpha * glob + (1.0 - alpha) * local


@dataclass
class EMSPress(ScorerPress):
    """Head-wise evict-then-merge with the Global-Local score (UNVERIFIED reconstruction).

    Per layer: GL scores; head budgets from the shared allocator (``head_budget="adaptive"``,
    stored ragged - no padding to the longest head); per KV head the top ``B_h`` tokens by GL
    are kept as class centres (the last ``window`` tokens always among them); every other token
    joins the centre whose key is most cosine-similar if that similarity is at least
    ``merge_threshold`` and is otherwise assigned to the all-zero class (evicted). Centres
    absorb their members as a GL-score-weighted average of keys and values (UNVERIFIED rule).

    Args:
        budget: tokens kept per layer and head on average (see
            :class:`~ctxzip.kvcache.base.BasePress`).
        window: local window (queries for the local score, always-kept recent tokens). UNVERIFIED.
        alpha: weight of the global score in ``"sum"`` mode. UNVERIFIED.
        combine: ``"sum"`` or ``"max"``. UNVERIFIED.
        merge_threshold: minimum key cosine similarity to merge into a centre; ``>= 1`` turns
            merging off (pure eviction with the GL score). UNVERIFIED value.
        head_budget: ``"adaptive"`` (head-wise, the paper's setting) or ``"uniform"``.
    """

    window: int = 32
    alpha: float = 0.5
    combine: str = "sum"
    merge_threshold: float = 0.9
    head_budget: str = "adaptive"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if self.combine not in ("sum", "max"):
            raise ValueError("combine must be 'sum' or 'max'")
        if self.merge_threshold < -1.0:
            raise ValueError("merge_threshold must be >= -1")

    def uses_prefill_mass(self) -> bool:
        return True

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return global_local_score(ctx, self.window, self.alpha, self.combine)

    def forced(self, ctx: LayerContext, keep: int) -> torch.Tensor:
        t = ctx.seq_len
        w = min(self.window, keep, t)
        m = torch.zeros(t, dtype=torch.bool, device=ctx.keys.device)
        if w:
            m[t - w :] = True
        return m

    def compress_layer(self, ctx: LayerContext):
        t = ctx.seq_len
        keep = self.budget.resolve(t)
        if keep >= t:
            return EvictedLayer(ctx.keys, ctx.values, t)
        gl = self.score(ctx).float()
        scores = gl.clone()
        forced = self.forced(ctx, keep)
        scores = torch.where(forced, torch.full_like(scores, float("inf")), scores)
        if ctx.key_padding is not None:
            scores = scores.masked_fill(~ctx.key_padding[:, None, :], float("-inf"))
        h = scores.shape[1]
        counts = self.head_counts(scores, keep) if self.head_budget == "adaptive" else [keep] * h
        ks, vs = [], []
        for i, c in enumerate(counts):
            k, v = self._evict_then_merge(ctx, i, scores[:, i], gl[:, i], int(c))
            ks.append(k)
            vs.append(v)
        if self.head_budget == "uniform":
            return EvictedLayer(torch.stack(ks, 1), torch.stack(vs, 1), t)
        return RaggedLayer(
            torch.cat(ks, 1), torch.cat(vs, 1), counts, t, pad_to=self.max_head_count(ctx, keep)
        )

    def _evict_then_merge(
        self, ctx: LayerContext, h: int, scores: torch.Tensor, gl: torch.Tensor, c: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = ctx.keys[:, h].float(), ctx.values[:, h].float()  # [B, T, d]
        b, t, d = keys.shape
        idx = topk_indices(scores, c, dim=-1)  # [B, c] position order
        ck = keys.gather(1, idx[..., None].expand(-1, -1, d))
        cv = values.gather(1, idx[..., None].expand(-1, -1, values.shape[-1]))
        if c == 0 or self.merge_threshold >= 1.0:
            return ck.to(ctx.keys.dtype), cv.to(ctx.values.dtype)
        kept = torch.zeros((b, t), dtype=torch.bool, device=keys.device)
        kept.scatter_(1, idx, True)
        kn = torch.nn.functional.normalize(keys, dim=-1)
        cn = torch.nn.functional.normalize(ck, dim=-1)
        sim = kn @ cn.transpose(1, 2)  # [B, T, c]
        best, assign = sim.max(-1)
        member = (~kept) & (best >= self.merge_threshold)
        if ctx.key_padding is not None:
            member &= ctx.key_padding
        w = gl.clamp_min(0) * member  # zero class: weight 0
        w_c = gl.gather(1, idx).clamp_min(1e-12)  # centres weigh themselves by their own score
        num_k = ck * w_c[..., None]
        num_v = cv * w_c[..., None]
        den = w_c.clone()
        num_k = num_k.scatter_add(1, assign[..., None].expand(-1, -1, d), keys * w[..., None])
        num_v = num_v.scatter_add(
            1, assign[..., None].expand(-1, -1, values.shape[-1]), values * w[..., None]
        )
        den = den.scatter_add(1, assign, w)
        mk = num_k / den[..., None]
        mv = num_v / den[..., None]
        return mk.to(ctx.keys.dtype), mv.to(ctx.values.dtype)
