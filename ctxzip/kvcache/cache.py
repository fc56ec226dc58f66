"""Compressed cache layers for the transformers 5 cache-layers API, and byte accounting.

A press replaces one model layer's ``DynamicLayer`` by one of these after prefill:

* :class:`EvictedLayer` - the kept tokens of every head, rectangular ``[B, H, S, d]``. It
  remembers the *logical* length (tokens the model has seen), so ``get_seq_length()`` - which
  transformers uses for the next ``position_ids`` - continues from the original length while
  ``get_mask_sizes()`` reports the ``S`` stored entries. Kept tokens stay in position order, so a
  left-padded batch keeps working with the usual 2D attention mask of the full length (padding is
  evicted first and any kept padding stays at the front, exactly where the 2D mask marks it).
* :class:`RaggedLayer` - head-wise budgets: head ``h`` keeps ``S_h`` tokens, stored as one flat
  ``[B, sum_h S_h, d]`` tensor with per-head offsets (no padding to the longest head, so the
  memory is the real sum). For attention it is expanded transiently to ``[B, H, max S_h + q, d]``
  and the unused slots are masked by the ``"ctxzip_ragged"`` attention (SDPA plus a per-head key mask),
  which the press context installs on the model.
* ``ctxzip.kvcache.gear.GEARLayer`` and ``ctxzip.kvcache.lowrank.LowRankLayer`` store quantized /
  projected forms; they live next to their press.

:func:`cache_nbytes` sums the bytes the cache really holds (every tensor attribute of every
layer, counted once), so eviction, quantization and low rank compare on one axis.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

__all__ = [
    "BatchMappedLayer",
    "EvictedLayer",
    "RaggedLayer",
    "cache_nbytes",
    "dense_cache_nbytes",
    "layer_nbytes",
    "install_ctxzip_attention",
    "CTXZIP_ATTENTION",
]

# Not "ctxzip": that name belongs to ctxzip.kernels (blocked attention + per-key score
# recording); registering a second function under it would silently replace one with the other.
CTXZIP_ATTENTION = "ctxzip_ragged"


# when set (inside ``cache_nbytes(..., float_bytes=2)``), floating-point tensors are counted at
# this many bytes per element: "the cache as it would be stored in bf16/fp16"
_FLOAT_BYTES: int | None = None


def _tensor_nbytes(t: Any, seen: set[int]) -> int:
    if isinstance(t, torch.Tensor):
        if t.numel() == 0:
            return 0
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            return 0
        seen.add(key)
        n = t.untyped_storage().nbytes()
        if _FLOAT_BYTES is not None and t.is_floating_point():
            n = n // t.element_size() * _FLOAT_BYTES
        return n
    if isinstance(t, (list, tuple)):
        return sum(_tensor_nbytes(x, seen) for x in t)
    if isinstance(t, dict):
        return sum(_tensor_nbytes(x, seen) for x in t.values())
    return 0


def layer_nbytes(layer: Any, _seen: set[int] | None = None) -> int:
    """Bytes held by one cache layer: every tensor attribute (keys, values, quantized codes,
    scales, projections, buffers), each storage counted once."""
    if hasattr(layer, "nbytes") and callable(layer.nbytes):
        return int(layer.nbytes())
    seen = _seen if _seen is not None else set()
    return sum(
        _tensor_nbytes(v, seen)
        for k, v in vars(layer).items()
        if not k.startswith("_sliding_window_tensor")
    )


def cache_nbytes(cache: Cache, *, float_bytes: int | None = None) -> int:
    """Actual bytes stored in ``cache`` (all layers), as held in memory right now.

    ``float_bytes=2`` counts floating-point tensors at 2 bytes per element (the cache stored
    in bf16/fp16) - for comparisons "relative to a bf16 cache" while the model runs in fp32.
    Integer codes, indices and fp16 scales are counted as stored.
    """
    global _FLOAT_BYTES
    if not isinstance(cache, Cache):
        raise TypeError(f"cache_nbytes expects a transformers Cache, got {type(cache).__name__}")
    if float_bytes is not None and float_bytes not in (1, 2, 4, 8):
        raise ValueError("float_bytes must be 1, 2, 4 or 8")
    prev, _FLOAT_BYTES = _FLOAT_BYTES, float_bytes
    try:
        return sum(layer_nbytes(layer) for layer in cache.layers)
    finally:
        _FLOAT_BYTES = prev


def dense_cache_nbytes(
    model: Any, n_tokens: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16
) -> int:
    """Bytes of an uncompressed K+V cache of ``n_tokens`` in ``dtype`` for ``model`` (the
    reference that "bytes relative to a bf16 cache" divides by). Sliding-window layers hold at
    most ``sliding_window - 1`` tokens, as transformers stores them."""
    cfg = model.config.get_text_config(decoder=True)
    n_layers = cfg.num_hidden_layers
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
    win = getattr(cfg, "sliding_window", None)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for lt in layer_types[:n_layers]:
        t = n_tokens
        if lt == "sliding_attention" and win:
            t = min(n_tokens, win - 1)
        total += 2 * batch_size * hkv * t * hd * itemsize
    return total


class EvictedLayer(DynamicLayer):
    """A full-attention layer after eviction: ``keys``/``values`` hold the kept entries
    ``[B, H, S, d]`` (position order); ``logical_length`` counts every token seen.

    New tokens are appended as in ``DynamicLayer``. ``get_seq_length()`` returns the logical
    length (so positions continue from the original one); ``get_mask_sizes()`` returns the stored
    length with ``kv_offset = logical - stored`` so the causal/padding mask lines up.
    """

    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, logical_length: int):
        super().__init__()
        if keys.shape != values.shape[:-1] + (keys.shape[-1],) or keys.shape[:3] != values.shape[:3]:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree")
        if logical_length < keys.shape[-2]:
            raise ValueError("logical_length cannot be smaller than the stored length")
        self.lazy_initialization(keys, values)
        self.keys = keys.contiguous()
        self.values = values.contiguous()
        self.logical_length = int(logical_length)

    def update(self, key_states, value_states, *args, **kwargs):
        self.logical_length += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def stored_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.logical_length - stored

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache layer cannot be cropped")

    def reset(self) -> None:
        super().reset()
        self.logical_length = 0


# ---------------------------------------------------------------- ragged (head-wise) layer
# Ragged layers hand a per-head key mask to the "ctxzip_ragged" attention through this table, keyed by
# the identity of the key tensor they return from ``update`` (the attention function receives
# exactly that tensor). Entries die with the tensor.
_KEY_MASKS: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _register_key_mask(key: torch.Tensor, mask: torch.Tensor) -> None:
    kid = id(key)

    def _drop(_ref: Any, kid: int = kid) -> None:
        _KEY_MASKS.pop(kid, None)

    _KEY_MASKS[kid] = (weakref.ref(key, _drop), mask)


def _lookup_key_mask(key: torch.Tensor) -> torch.Tensor | None:
    entry = _KEY_MASKS.get(id(key))
    if entry is None or entry[0]() is not key:
        return None
    return entry[1]


class BatchMappedLayer(DynamicLayer):
    """A compressed cache layer whose batch operations (beam reorder, batch select/repeat) apply
    one tensor function to every per-batch tensor it stores: subclasses implement
    :meth:`_map_batch` once instead of the three methods."""

    def _map_batch(self, fn: Any) -> None:
        raise NotImplementedError

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))


class RaggedLayer(BatchMappedLayer):
    """Head-wise evicted layer stored without padding.

    ``flat_keys``/``flat_values``: ``[B, sum_h S_h, d]``; head ``h`` owns rows
    ``offsets[h]:offsets[h+1]`` (position order). Tokens decoded later are appended to every head
    in a dense ``[B, H, n_new, d]`` tail. Memory: ``sum_h S_h`` entries, not ``H * max S_h``.

    For attention the layer returns ``[B, H, max_h S_h + n_new, d]`` with head ``h``'s kept
    entries right-aligned (unused slots at the front, masked through the ``"ctxzip_ragged"``
    attention). Using it with another attention implementation raises.
    """

    is_croppable = False

    def __init__(
        self,
        flat_keys: torch.Tensor,
        flat_values: torch.Tensor,
        lengths: list[int],
        logical_length: int,
        extra: dict[str, torch.Tensor] | None = None,
        pad_to: int | None = None,
    ):
        super().__init__()
        # every ragged layer of a model must expose the same stored length, because
        # transformers builds one attention mask for all full-attention layers: presses pass the
        # largest head budget any layer can get (the same for all layers)
        if flat_keys.shape[:2] != flat_values.shape[:2] or flat_keys.shape[1] != sum(lengths):
            raise ValueError("flat keys/values do not match the per-head lengths")
        self.lazy_initialization(flat_keys, flat_values)
        self.flat_keys = flat_keys.contiguous()
        self.flat_values = flat_values.contiguous()
        self.lengths = [int(x) for x in lengths]
        self.logical_length = int(logical_length)
        self.extra = extra or {}
        self.pad_to = max(int(pad_to or 0), max(self.lengths, default=0))
        b, _, d = flat_keys.shape
        dv = flat_values.shape[-1]
        h = len(self.lengths)
        self.tail_keys = flat_keys.new_zeros((b, h, 0, d))
        self.tail_values = flat_values.new_zeros((b, h, 0, dv))
        self.keys = self.values = None  # expanded views are transient
        self.is_initialized = True

    @classmethod
    def from_padded(
        cls, keys: torch.Tensor, values: torch.Tensor, lengths: list[int], logical_length: int,
        pad_to: int | None = None,
    ) -> RaggedLayer:
        """Build from ``[B, H, S_max, d]`` tensors whose head ``h`` holds its ``lengths[h]`` kept
        entries in the first slots (position order)."""
        fk = torch.cat([keys[:, h, : lengths[h]] for h in range(keys.shape[1])], dim=1)
        fv = torch.cat([values[:, h, : lengths[h]] for h in range(values.shape[1])], dim=1)
        return cls(fk, fv, lengths, logical_length, pad_to=pad_to)

    @property
    def num_heads(self) -> int:
        return len(self.lengths)

    def stored_length(self) -> int:
        return self.pad_to + self.tail_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.logical_length - stored

    def head_kv(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head ``h``'s stored keys and values ``[B, S_h + n_new, d]``."""
        o = sum(self.lengths[:h])
        k = torch.cat([self.flat_keys[:, o : o + self.lengths[h]], self.tail_keys[:, h]], dim=1)
        v = torch.cat([self.flat_values[:, o : o + self.lengths[h]], self.tail_values[:, h]], dim=1)
        return k, v

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``keys, values [B, H, S_max, d]`` (right-aligned per head) and ``valid [H, S_max]``."""
        b, _, d = self.flat_keys.shape
        dv = self.flat_values.shape[-1]
        smax = self.pad_to
        h = self.num_heads
        k = self.flat_keys.new_zeros((b, h, smax, d))
        v = self.flat_values.new_zeros((b, h, smax, dv))
        valid = torch.zeros((h, smax), dtype=torch.bool, device=self.flat_keys.device)
        o = 0
        for i, n in enumerate(self.lengths):
            if n:
                k[:, i, smax - n :] = self.flat_keys[:, o : o + n]
                v[:, i, smax - n :] = self.flat_values[:, o : o + n]
                valid[i, smax - n :] = True
            o += n
        return k, v, valid

    def update(self, key_states, value_states, *args, **kwargs):
        self.logical_length += key_states.shape[-2]
        self.tail_keys = torch.cat([self.tail_keys, key_states], dim=-2)
        self.tail_values = torch.cat([self.tail_values, value_states], dim=-2)
        k, v, valid = self.padded()
        k = torch.cat([k, self.tail_keys], dim=-2)
        v = torch.cat([v, self.tail_values], dim=-2)
        tail_valid = torch.ones(
            (self.num_heads, self.tail_keys.shape[-2]), dtype=torch.bool, device=valid.device
        )
        mask = torch.cat([valid, tail_valid], dim=-1)
        if not bool(mask.all()):
            _register_key_mask(k, mask)
        return k, v

    def nbytes(self) -> int:
        seen: set[int] = set()
        return sum(
            _tensor_nbytes(t, seen)
            for t in (self.flat_keys, self.flat_values, self.tail_keys, self.tail_values, self.extra)
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache layer cannot be cropped")

    def _map_batch(self, fn: Any) -> None:
        for name in ("flat_keys", "flat_values", "tail_keys", "tail_values"):
            setattr(self, name, fn(getattr(self, name)))


# ---------------------------------------------------------------- the "ctxzip_ragged" attention
#: ``id(attention module) -> request``: set by a press (see ``BasePress._apply``) right before an
#: attention layer runs a prefill whose attention mass it needs; the attention below then stores
#: the per-query-head mass ``[B, Hq, T]`` under ``"mass"`` (``"query_weights"``: ``[B, T]`` or None).
MASS_REQUESTS: dict[int, dict[str, Any]] = {}


def _ctxzip_attention(
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
    """SDPA attention plus the per-head key mask of a :class:`RaggedLayer` (if any)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    head_mask = _lookup_key_mask(key)
    req = MASS_REQUESTS.get(id(module))
    if (
        req is not None
        and head_mask is None
        and query.shape[2] == key.shape[2]
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
        and (dropout == 0.0 or not module.training)
    ):
        # a press wants this prefill's attention mass: one pass gives output and mass
        from .fused import attention_with_mass

        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out, req["mass"] = attention_with_mass(
            query, key, value, scale=scale, attention_mask=attention_mask,
            query_weights=req.get("query_weights"),
        )
        return out.transpose(1, 2).contiguous(), None
    if head_mask is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("the ctxzip attention does not support softcap")
    b, hq, q_len, _ = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    groups = hq // hkv
    # a boolean [H, kv] mask (True = stored entry) or an additive float [B|1, H, kv] bias
    # (-inf = empty slot; e.g. a compensation token's log-weight, see kvcache.razor)
    additive = head_mask.is_floating_point()
    if additive and head_mask.dim() == 2:
        head_mask = head_mask[None]
    head_dim = 1 if additive else 0
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        head_mask = head_mask.repeat_interleave(groups, dim=head_dim)
    mask = head_mask[:, :, None, :] if additive else head_mask[None, :, None, :]  # [B|1, Hq, 1, kv]
    allowed = None
    if attention_mask is None:
        # a plain causal pattern aligned to the end of the keys
        qi = torch.arange(q_len, device=key.device)[:, None] + (kv_len - q_len)
        ki = torch.arange(kv_len, device=key.device)[None, :]
        allowed = (ki <= qi)[None, None]
    elif attention_mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention mask covers {attention_mask.shape[-1]} keys but the ragged layer holds "
            f"{kv_len}: all ragged layers of a model must share one padded length (pad_to)"
        )
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    if additive:
        mask = mask.to(query.dtype)
        if allowed is not None:
            mask = mask.masked_fill(~allowed, float("-inf"))
        else:
            mask = mask + attention_mask.to(query.dtype)
    elif allowed is not None:
        mask = mask & allowed
    else:
        mask = torch.where(mask, attention_mask, torch.finfo(attention_mask.dtype).min)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


_INSTALLED = False


def install_ctxzip_attention() -> str:
    """Register the ``"ctxzip_ragged"`` attention (SDPA + ragged per-head key masks) with transformers'
    attention and mask interfaces; returns its name. Idempotent."""
    global _INSTALLED
    if not _INSTALLED:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(CTXZIP_ATTENTION, _ctxzip_attention)
        AttentionMaskInterface.register(CTXZIP_ATTENTION, sdpa_mask)
        _INSTALLED = True
    return CTXZIP_ATTENTION


def is_sliding_layer(layer: Any) -> bool:
    return isinstance(layer, DynamicSlidingWindowLayer) or bool(getattr(layer, "is_sliding", False))
