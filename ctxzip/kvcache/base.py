"""The press framework: apply a KV-cache compression method to any HF causal LM.

A press is a small dataclass. ``with press(model): model(ids, past_key_values=cache)`` runs the
prefill as usual (so the prefill's own outputs are exact) and, right after each attention layer
has written its keys/values, replaces that cache layer by a compressed one (see
:mod:`ctxzip.kvcache.cache`). Decoding then continues from the compressed cache, with positions
counting from the original length. Works with SDPA: a press that needs attention scores
of a few queries (SnapKV's window, TOVA's last query) recomputes them from the layer's input
hidden states (as kvpress does) and asks :func:`ctxzip.kernels.attention_mass` for per-key
attention mass without the N x N matrix. A press that needs the mass of *all* prefill queries
(H2O, observed attention, EMS: :meth:`BasePress.wants_prefill_mass`) gets it from the prefill's
own attention instead: inside the block the model runs the ``"ctxzip_ragged"`` attention, which
for the requested layers computes output and mass in one pass
(:func:`ctxzip.kvcache.fused.attention_with_mass`), so no second ``Q Kᵀ`` pass is needed.

Subclasses implement :meth:`BasePress.compress_layer` (or, for score-then-evict methods,
:class:`ScorerPress.score`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .._hf_compat import cache_from_kwargs
from ..budget import Budget, allocate, topk_indices
from .cache import (
    MASS_REQUESTS,
    EvictedLayer,
    RaggedLayer,
    install_ctxzip_attention,
    is_sliding_layer,
)

__all__ = [
    "BasePress",
    "ScorerPress",
    "LayerContext",
    "attention_modules",
    "window_queries",
    "layer_keep_counts",
]


# ------------------------------------------------------------------ model introspection
def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder-only HF model, in layer order."""
    mods = []
    for m in model.modules():
        name = type(m).__name__
        if (
            name.endswith("Attention")
            and hasattr(m, "layer_idx")
            and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))
        ):
            mods.append(m)
    if not mods:
        raise ValueError(
            f"{type(model).__name__} has no recognisable self-attention modules (expected modules "
            "named *Attention with layer_idx and q_proj/qkv_proj, as in Llama, Qwen, Mistral, "
            "Gemma, Phi-3)"
        )
    mods.sort(key=lambda m: m.layer_idx)
    return mods


def _head_counts(module: torch.nn.Module) -> tuple[int, int, int]:
    cfg = module.config
    hd = module.head_dim
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    return hq, hkv, hd


def window_queries(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    n: int | None = None,
) -> torch.Tensor:
    """Recompute the (post-norm, post-RoPE) queries of the last ``n`` tokens (all when ``None``)
    from the attention layer's input hidden states: ``[B, Hq, n, d]``.

    Handles separate ``q_proj`` and fused ``qkv_proj`` (Phi-3), per-head ``q_norm`` (Qwen3,
    Gemma3) and partial rotary via the model's own ``apply_rotary_pos_emb``.
    """
    hq, _, hd = _head_counts(module)
    h = hidden_states if n is None else hidden_states[:, -n:]
    b, t, _ = h.shape
    if hasattr(module, "q_proj"):
        q = module.q_proj(h)
    else:
        q = module.qkv_proj(h)[..., : hq * hd]
    q = q.view(b, t, -1, hd)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos[..., -t:, :], sin[..., -t:, :]
    apply_rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if apply_rope is None:
        raise ValueError(f"cannot find apply_rotary_pos_emb for {type(module).__name__}")
    q, _ = apply_rope(q, q, cos, sin)
    return q


# ------------------------------------------------------------------ per-layer context
@dataclass
class LayerContext:
    """What a press sees when it compresses one layer after prefill."""

    module: torch.nn.Module
    layer_idx: int
    n_layers: int
    hidden_states: torch.Tensor  # [B, T, D] input of the attention layer
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    keys: torch.Tensor  # [B, Hkv, T, d] post-RoPE
    values: torch.Tensor  # [B, Hkv, T, dv]
    key_padding: torch.Tensor | None  # [B, T] bool, True = real token (None: no padding)
    cache: Cache
    #: fp32 ``[B, Hq, T]`` attention mass of all prefill queries, captured from the prefill's own
    #: attention when the press asked for it (:meth:`BasePress.wants_prefill_mass`), else None
    prefill_mass: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return self.keys.shape[-2]

    @property
    def scale(self) -> float:
        return float(getattr(self.module, "scaling", self.keys.shape[-1] ** -0.5))

    def queries(self, n: int | None = None) -> torch.Tensor:
        return window_queries(self.module, self.hidden_states, self.position_embeddings, n)

    def attention_mass(
        self, window: int | None, gqa: str = "mean", queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-key attention mass ``[B, Hkv, T]`` (``[B, Hq, T]`` for ``gqa="per_head"``) of the
        last ``window`` queries (all when ``None``): taken from :attr:`prefill_mass` when it was
        captured and all queries are asked for, otherwise computed by
        :func:`ctxzip.kernels.attention_mass` from recomputed queries."""
        from ..kernels import attention_mass

        n = self.seq_len if window is None else min(int(window), self.seq_len)
        if self.prefill_mass is not None and queries is None and n == self.seq_len:
            if gqa not in ("sum", "mean", "per_head"):
                raise ValueError(f"gqa must be 'sum', 'mean' or 'per_head', got {gqa!r}")
            m = self.prefill_mass
            if gqa == "per_head":
                return m
            b, hq, t = m.shape
            m = m.view(b, self.keys.shape[1], hq // self.keys.shape[1], t)
            return m.sum(2) if gqa == "sum" else m.mean(2)
        q = queries if queries is not None else self.queries(n)
        mask = None if self.key_padding is None else self.key_padding
        return attention_mass(
            q.to(self.keys.dtype), self.keys, window=None, causal=True, scale=self.scale,
            gqa=gqa, attention_mask=mask,
        )


def layer_keep_counts(budget: Budget, seq_len: int) -> int:
    """Entries each head keeps in a layer of ``seq_len`` tokens under ``budget``."""
    return budget.resolve(seq_len)


# ------------------------------------------------------------------ base press
@dataclass
class BasePress:
    """Base class of every press.

    Args:
        budget: how much of the context each full-attention layer keeps, as a shared
            :class:`ctxzip.budget.Budget` (``rate`` = fraction of tokens kept, or ``tokens`` =
            absolute number per layer and head). Sliding-window layers (Gemma 3) already hold at
            most ``window - 1`` tokens and are left as they are.
    """

    budget: Budget = field(default_factory=lambda: Budget(rate=0.5))

    def __post_init__(self) -> None:
        if not isinstance(self.budget, Budget):
            raise TypeError(
                f"budget must be a ctxzip.budget.Budget (e.g. Budget(rate=0.25)), got "
                f"{type(self.budget).__name__}"
            )

    # -- to implement -------------------------------------------------------------------
    def compress_layer(self, ctx: LayerContext) -> Any:
        """Return the cache layer that replaces this layer's ``DynamicLayer`` (or ``None`` to
        leave it as is)."""
        raise NotImplementedError

    #: set by presses whose layers need the "ctxzip_ragged" attention (ragged head-wise storage)
    needs_ctxzip_attention: bool = field(default=False, init=False, repr=False)

    def uses_prefill_mass(self) -> bool:
        """Whether this press scores keys by the attention mass of *all* prefill queries
        (H2O, observed attention, EMS); then the prefill's own attention computes it."""
        return False

    def wants_prefill_mass(self, seq_len: int) -> bool:
        """Whether a prefill of ``seq_len`` tokens needs that mass (not when nothing is evicted)."""
        return self.uses_prefill_mass() and self.budget.resolve(seq_len) < seq_len

    # -- the context manager ------------------------------------------------------------
    def __call__(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return self._apply(model)

    @contextlib.contextmanager
    def _apply(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        mods = attention_modules(model)
        state: dict[str, Any] = {"key_padding": None}
        handles = []

        def pre_hook(_m: Any, args: tuple, kwargs: dict) -> None:
            am = kwargs.get("attention_mask")
            if am is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
                am = args[1]
            state["key_padding"] = am.bool() if isinstance(am, torch.Tensor) and am.dim() == 2 else None

        def make_hook(module: torch.nn.Module) -> Any:
            def hook(_m: Any, args: tuple, kwargs: dict, output: Any) -> Any:
                req = MASS_REQUESTS.pop(id(module), None)
                state["prefill_mass"] = None if req is None else req.get("mass")
                self._on_attention(module, len(mods), args, kwargs, state)
                state["prefill_mass"] = None
                return output

            return hook

        def make_mass_request(module: torch.nn.Module) -> Any:
            def pre(_m: Any, args: tuple, kwargs: dict) -> None:
                MASS_REQUESTS.pop(id(module), None)
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                cache = cache_from_kwargs(kwargs)
                if hidden is None or not isinstance(cache, Cache) or hidden.shape[1] < 1:
                    return
                idx = module.layer_idx
                if idx < len(cache.layers):
                    layer = cache.layers[idx]
                    # a prefill from an empty cache into a plain full-attention layer only
                    if type(layer) is not DynamicLayer or is_sliding_layer(layer):
                        return
                    if layer.keys is not None and layer.keys.shape[-2] > 0:
                        return
                q_len = hidden.shape[1]
                if not self.wants_prefill_mass(q_len):
                    return
                kp = state["key_padding"]
                qw = None
                if kp is not None:
                    kp = kp[:, -q_len:]
                    qw = None if bool(kp.all()) else kp
                MASS_REQUESTS[id(module)] = {"query_weights": qw}

            return pre

        handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for m in mods:
            handles.append(m.register_forward_hook(make_hook(m), with_kwargs=True))
        previous_impl = model.config._attn_implementation
        if self.needs_ctxzip_attention or self.uses_prefill_mass():
            # Ragged (head-wise) layers need the "ctxzip_ragged" attention for every later step
            # on this cache, so the model keeps it after the block; it is plain SDPA whenever no
            # ragged layer and no mass request is involved. Presses that need the prefill's
            # attention mass use it for the block only.
            name = install_ctxzip_attention()
            if previous_impl != name:
                model.set_attn_implementation(name)
            for m in mods:
                handles.append(m.register_forward_pre_hook(make_mass_request(m), with_kwargs=True))
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
            for m in mods:
                MASS_REQUESTS.pop(id(m), None)
            if (
                not self.needs_ctxzip_attention
                and model.config._attn_implementation != previous_impl
            ):
                model.set_attn_implementation(previous_impl)

    def _on_attention(
        self, module: torch.nn.Module, n_layers: int, args: tuple, kwargs: dict, state: dict
    ) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache = cache_from_kwargs(kwargs)
        if hidden is None or not isinstance(cache, Cache):
            return
        idx = module.layer_idx
        if idx >= len(cache.layers):
            return
        layer = cache.layers[idx]
        q_len = hidden.shape[1]
        # prefill from an empty cache only: a plain dynamic full-attention layer whose content is
        # exactly this forward's tokens
        if type(layer) is not DynamicLayer or is_sliding_layer(layer):
            return
        if layer.keys is None or layer.keys.shape[-2] != q_len or q_len < 1:
            return
        kp = state["key_padding"]
        if kp is not None:
            kp = kp[:, -q_len:]
            if bool(kp.all()):
                kp = None
        ctx = LayerContext(
            module=module,
            layer_idx=idx,
            n_layers=n_layers,
            hidden_states=hidden,
            position_embeddings=kwargs["position_embeddings"],
            keys=layer.keys,
            values=layer.values,
            key_padding=kp,
            cache=cache,
            prefill_mass=state.get("prefill_mass"),
        )
        with torch.no_grad():
            new_layer = self.compress_layer(ctx)
        if new_layer is not None:
            cache.layers[idx] = new_layer


# ------------------------------------------------------------------ score-then-evict presses
@dataclass
class ScorerPress(BasePress):
    """A press that scores every cached token per KV head and keeps the top ones.

    Subclasses implement :meth:`score` (higher = keep). Padding tokens are evicted first.

    Args:
        budget: see :class:`BasePress`.
        head_budget: ``"uniform"`` - every KV head keeps the same number of tokens (a
            rectangular cache); ``"adaptive"`` - the layer's budget (``heads x per-head``) is
            split over heads from their score distributions (Ada-KV-style: a head whose mass
            is concentrated needs fewer tokens), via :func:`ctxzip.budget.allocate`, and stored
            ragged without padding (:class:`~ctxzip.kvcache.cache.RaggedLayer`).
        min_head_fraction: with ``"adaptive"``, floor of each head's share as a fraction of the
            uniform per-head budget.
    """

    head_budget: str = "uniform"
    min_head_fraction: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_budget not in ("uniform", "adaptive"):
            raise ValueError(f"head_budget must be 'uniform' or 'adaptive', got {self.head_budget!r}")
        if not 0.0 <= self.min_head_fraction <= 1.0:
            raise ValueError("min_head_fraction must be in [0, 1]")
        self.needs_ctxzip_attention = self.head_budget == "adaptive"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """Scores ``[B, Hkv, T]`` (higher = more important)."""
        raise NotImplementedError

    def forced(self, ctx: LayerContext, keep: int) -> torch.Tensor | None:
        """Optional ``[T]`` bool mask of positions that must be kept (e.g. an observation window)."""
        return None

    def compress_layer(self, ctx: LayerContext) -> Any:
        t = ctx.seq_len
        keep = layer_keep_counts(self.budget, t)
        if keep >= t:
            return EvictedLayer(ctx.keys, ctx.values, t)
        scores = self.score(ctx).float()
        forced = self.forced(ctx, keep)
        if forced is not None:
            scores = torch.where(forced.to(scores.device), torch.full_like(scores, float("inf")), scores)
        if ctx.key_padding is not None:
            scores = scores.masked_fill(~ctx.key_padding[:, None, :], float("-inf"))
        if self.head_budget == "uniform":
            return evict(ctx, scores, keep)
        return evict_headwise(ctx, scores, self.head_counts(scores, keep), self.max_head_count(ctx, keep))

    def max_head_count(self, ctx: LayerContext, keep: int) -> int:
        """Largest count any head can get (the same in every layer): the padded length all
        ragged layers share so transformers' single attention mask fits each of them."""
        h = ctx.keys.shape[1]
        floor = int(self.min_head_fraction * keep)
        return min(ctx.seq_len, keep * h - (h - 1) * floor)

    def head_counts(self, scores: torch.Tensor, keep: int) -> list[int]:
        """Split ``keep * Hkv`` entries over the heads: each head's weight is how many of the
        layer's top ``keep * Hkv`` (per-head normalised) scores it holds, then
        :func:`ctxzip.budget.allocate` (``method="score"``) with a floor per head."""
        b, h, t = scores.shape
        finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
        big = torch.isposinf(scores)
        # per-head probability-like normalisation so heads compare on one scale
        s = finite.clamp_min(0)
        s = s / s.sum(-1, keepdim=True).clamp_min(1e-12)
        s = torch.where(big, torch.full_like(s, 2.0), s)  # forced entries first
        s = s.mean(0)  # heads share one budget across the batch
        flat_top = topk_indices(s.reshape(-1), keep * h, sort_by_position=False)
        weights = torch.bincount(flat_top // t, minlength=h).cpu().numpy()
        floor = int(self.min_head_fraction * keep)
        counts = allocate(keep * h, [t] * h, weights, method="score", floors=floor)
        return [int(c) for c in counts]


def evict(ctx: LayerContext, scores: torch.Tensor, keep: int) -> EvictedLayer:
    """Keep the top ``keep`` tokens per (batch, KV head) in position order."""
    idx = topk_indices(scores, keep, dim=-1)  # [B, H, keep] sorted by position
    gi = idx.unsqueeze(-1)
    k = ctx.keys.gather(2, gi.expand(-1, -1, -1, ctx.keys.shape[-1]))
    v = ctx.values.gather(2, gi.expand(-1, -1, -1, ctx.values.shape[-1]))
    return EvictedLayer(k, v, ctx.seq_len)


def evict_headwise(
    ctx: LayerContext, scores: torch.Tensor, counts: list[int], pad_to: int | None = None
) -> RaggedLayer:
    """Head ``h`` keeps its top ``counts[h]`` tokens (per batch row), stored ragged."""
    ks, vs = [], []
    for h, c in enumerate(counts):
        idx = topk_indices(scores[:, h], int(c), dim=-1)  # [B, c]
        ks.append(ctx.keys[:, h].gather(1, idx[..., None].expand(-1, -1, ctx.keys.shape[-1])))
        vs.append(ctx.values[:, h].gather(1, idx[..., None].expand(-1, -1, ctx.values.shape[-1])))
    return RaggedLayer(torch.cat(ks, 1), torch.cat(vs, 1), list(counts), ctx.seq_len, pad_to=pad_to)
