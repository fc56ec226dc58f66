"""Hugging Face integration: ``attn_implementation="ctxzip"`` and per-key attention scores.

Importing :mod:`ctxzip.kernels` registers

* an attention function under the name ``"ctxzip"`` in transformers' ``AttentionInterface``
  (``ctxzip_attention_forward``; it runs :func:`ctxzip.kernels.attention` — Triton on CUDA,
  the blocked torch reference elsewhere), and
* the same name in ``AttentionMaskInterface`` with transformers' SDPA mask builder, so the
  masks it receives are exactly what ``"sdpa"`` receives (boolean ``[B, 1, Tq, Tk]`` or
  ``None`` when plain causal/no padding suffices).

so ``AutoModelForCausalLM.from_config(cfg, attn_implementation="ctxzip")`` (or
``model.set_attn_implementation("ctxzip")``) works for any model written against the
attention interface (Llama, Qwen2/3, Mistral, Gemma3, Phi3, CLIP, ...), with outputs matching
SDPA.

:func:`record_attention` is how presses and visual pruners get attention scores without eager
attention: inside ``with record_attention(model, window=32) as rec: model(...)`` every
attention call of the selected layers also computes :func:`ctxzip.kernels.attention_mass`
(column sums of the softmax over the chosen queries, reusing the forward's log-sum-exp) and
stores it in ``rec.scores[layer]`` — or hands it to a callback. Models that do not run on
``"ctxzip"`` are switched to it for the duration of the block and switched back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .dispatch import attention, attention_and_mass, attention_mass

__all__ = [
    "ATTN_NAME",
    "ctxzip_attention_forward",
    "register",
    "record_attention",
    "AttentionRecorder",
    "attention_modules",
]

ATTN_NAME = "ctxzip"
_ACTIVE: list[AttentionRecorder] = []


def ctxzip_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` function (same contract as ``sdpa_attention_forward``).

    ``query`` ``[B, Hq, Tq, d]``, ``key``/``value`` ``[B, Hkv, Tk, d]`` (GQA handled without
    repeating K/V), ``attention_mask`` the 4-D boolean/additive mask built by transformers (or
    ``None``), ``scaling`` the softmax scale. Returns ``([B, Tq, Hq, d], None)``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("ctxzip attention does not support logit soft-capping (softcap); use 'eager'")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("ctxzip attention does not support attention sinks (s_aux); use 'eager'")
    if kwargs.get("position_bias") is not None:
        raise ValueError("ctxzip attention does not support an additive position_bias; use 'eager'")
    if dropout and module.training:
        raise ValueError("ctxzip attention is inference-only: attention dropout > 0 in training mode")
    Tq, Tk = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is not None:
        if mask.dim() != 4:
            raise ValueError(f"expected a 4-D attention mask from transformers, got {tuple(mask.shape)}")
        mask = mask[:, :, :, :Tk]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # transformers gives an explicit mask whenever causality is not "the last Tq of Tk keys"
    causal = bool(causal) and mask is None and Tq > 1
    recorders = [r for r in _ACTIVE if r._wants(module)]
    if len(recorders) == 1 and recorders[0].queries is None:
        # one pass computes the output and the mass (torch), or forward + mass kernels (Triton)
        rec = recorders[0]
        out, _, mass = attention_and_mass(
            query, key, value, window=rec.window, causal=causal, scale=scaling, gqa=rec.gqa,
            attention_mask=mask,
        )
        rec._store(module, mass, query, key, mask)
    elif recorders:
        out, lse = attention(
            query, key, value, causal=causal, scale=scaling, attention_mask=mask, return_lse=True
        )
        for rec in recorders:
            rec._record(module, query, key, lse, causal, scaling, mask)
    else:
        out = attention(query, key, value, causal=causal, scale=scaling, attention_mask=mask)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"ctxzip"`` with transformers (idempotent; done on ``import ctxzip.kernels``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, ctxzip_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Attention modules of ``model`` in forward order: ``(qualified name, module)``.

    A module counts if its class name ends in ``Attention`` and it owns query/key projections
    (``q_proj``/``k_proj``, fused ``qkv_proj``/``query_key_value``/``c_attn``), i.e. the modules
    that call the attention interface. Their position in this list is the ``layer`` index used
    by :func:`record_attention`.
    """
    found = []
    for name, mod in model.named_modules():
        if not type(mod).__name__.endswith("Attention"):
            continue
        if any(hasattr(mod, a) for a in ("q_proj", "qkv_proj", "query_key_value", "c_attn", "k_proj")):
            found.append((name, mod))
    return found


@dataclass
class AttentionRecorder:
    """Collects per-key attention mass from the ``"ctxzip"`` attention function.

    Built by :func:`record_attention`; read ``scores`` after the forward pass.

    ``scores[layer]``: fp32 ``[B, Hkv, Tk]`` (``gqa="sum"``/``"mean"``) or ``[B, Hq, Tk]``
    (``"per_head"``) from the layer's **last** call (with ``accumulate=True`` the element-wise
    sum over calls of equal key length, e.g. several forward chunks; a call with a different key
    length replaces the entry). ``calls[layer]`` counts calls.
    """

    layers: dict[int, torch.nn.Module]
    names: dict[int, str]
    window: int | None = None
    queries: Any = None
    gqa: str = "sum"
    accumulate: bool = False
    callback: Callable[..., Any] | None = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {id(m): i for i, m in self.layers.items()}

    def _wants(self, module: torch.nn.Module) -> bool:
        return id(module) in self._index

    def clear(self) -> None:
        self.scores.clear()
        self.calls.clear()

    def _record(self, module, query, key, lse, causal, scaling, mask) -> None:
        Tq, Tk = query.shape[2], key.shape[2]
        with torch.no_grad():
            if self.queries is None:
                mass = attention_mass(
                    query, key, window=self.window, causal=causal, scale=scaling, lse=lse,
                    gqa=self.gqa, attention_mask=mask,
                )
            else:
                idx = torch.arange(Tq, device=query.device)[self.queries]
                idx = idx.reshape(-1)
                allowed = None
                if causal:  # explicit mask for the selected rows (queries aligned to the keys' end)
                    kpos = torch.arange(Tk, device=query.device)
                    allowed = (kpos[None, :] <= (idx[:, None] + Tk - Tq))[None, None]
                if mask is not None:
                    sel = mask[:, :, idx]
                    if sel.dtype == torch.bool:
                        allowed = sel if allowed is None else (sel & allowed)
                    else:
                        if allowed is not None:
                            sel = sel.masked_fill(~allowed, float("-inf"))
                        allowed = sel
                mass = attention_mass(
                    query[:, :, idx], key, causal=False, scale=scaling, lse=lse[:, :, idx],
                    gqa=self.gqa, attention_mask=allowed,
                )
        self._store(module, mass, query, key, mask)

    def _store(self, module, mass, query, key, mask) -> None:
        layer = self._index[id(module)]
        prev = self.scores.get(layer)
        if self.accumulate and prev is not None and prev.shape == mass.shape:
            mass = prev + mass
        self.scores[layer] = mass
        self.calls[layer] = self.calls.get(layer, 0) + 1
        if self.callback is not None:
            self.callback(
                layer=layer, module=module, scores=mass, query=query, key=key, attention_mask=mask
            )


def _configs(model: torch.nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def record_attention(
    model: torch.nn.Module,
    *,
    window: int | None = None,
    queries: Any = None,
    layers: Iterable[int] | None = None,
    gqa: str = "sum",
    accumulate: bool = False,
    callback: Callable[..., Any] | None = None,
) -> Iterator[AttentionRecorder]:
    """Record per-key attention mass of ``model``'s attention layers during forward passes.

    ``window``: sum over the last ``window`` queries of each call (SnapKV's observation window;
    ``1`` = the last token, as FastV; ``None`` = all queries, as H2O). ``queries``: instead of
    a window, an index/slice of query rows (e.g. ``0`` or ``slice(0, 1)`` for CLIP's CLS token,
    as VisionZip). ``layers``: indices into :func:`attention_modules` (negative allowed;
    default all). ``gqa``: ``"sum"``/``"mean"`` over each GQA group, or ``"per_head"``.
    ``callback(layer=, module=, scores=, query=, key=, attention_mask=)`` is called after each
    recorded call (query/key are post-RoPE, ``[B, H, T, d]``).

    The model's configs are switched to ``attn_implementation="ctxzip"`` inside the block (same
    outputs as SDPA) and restored afterwards.
    """
    if gqa not in ("sum", "mean", "per_head"):
        raise ValueError(f"gqa must be one of ('sum', 'mean', 'per_head'), got {gqa!r}")
    if window is not None and queries is not None:
        raise ValueError("give either window= or queries=, not both")
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 0):
        raise ValueError(f"window must be a non-negative int or None, got {window!r}")
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules that ctxzip can record")
    n = len(mods)
    chosen = range(n) if layers is None else list(layers)
    sel: dict[int, torch.nn.Module] = {}
    names: dict[int, str] = {}
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"layer index {i!r} out of range for {n} attention layers")
        j = i % n
        sel[j] = mods[j][1]
        names[j] = mods[j][0]
    rec = AttentionRecorder(
        layers=sel, names=names, window=window, queries=queries, gqa=gqa,
        accumulate=accumulate, callback=callback,
    )
    register()
    configs = _configs(model)
    previous = [(c, c._attn_implementation_internal) for c in configs]
    for c in configs:
        c._attn_implementation_internal = ATTN_NAME
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)
        for c, impl in previous:
            c._attn_implementation_internal = impl
