"""KIVI-style low-bit KV cache with KVQuant's pre-RoPE per-channel keys.

KIVI (Liu et al., 2024, arXiv 2402.02750; ``jy-yuan/KIVI``) stores **keys per channel** (each
channel grouped over ``key_group`` consecutive tokens, because key outliers live in fixed
channels) and **values per token** (grouped over ``value_group`` channels), asymmetric
min/max quantization with fp16 scale and zero, and keeps the most recent tokens in full
precision (its residual). This is :mod:`ctxzip.kernels.quant`'s shared layout.

Two additions, both measured on SmolLM2-135M (``benchmarks/kvcache_memory.py``):

* **Pre-RoPE keys** (KVQuant, Hooper et al., 2024, arXiv 2401.18079, section 3.2): RoPE
  rotates each channel pair by a position-dependent angle, so a post-RoPE channel swings
  between ``-|k|`` and ``|k|`` within a group and per-channel ranges blow up. The keys are
  un-rotated (the model's own ``cos``/``sin`` with ``-sin``), quantized per channel, and
  rotated again when attention reads them. Here 4-bit post-RoPE keys retained ~0.93 of the
  continuation benefit, 4-bit pre-RoPE keys ~1.0.
* **Attention sinks in full precision** (IntactKV, Liu et al., 2024, arXiv 2403.01241): the
  first ``sink`` tokens' keys/values are outliers every query attends to.

Storage counted by :meth:`KIVILayer.nbytes`: codes, fp16 scales and zeros, the full-precision
sink and recent window, tokens decoded later (kept in full precision: the cache update API
carries no ``cos``/``sin`` to un-rotate them, as CSKV's bi-branch cache keeps new tokens), and,
with pre-RoPE keys, one int16 position per stored token and KV head (needed to re-rotate
after eviction; not stored when the quantized tokens are consecutive, i.e. nothing was
evicted). The ``cos``/``sin`` table of the prefill positions is a recomputable model constant
shared by all layers (:meth:`KIVILayer.shared_nbytes`), like the RoPE frequencies (and the
value rotation matrix, with ``rotate_values``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kernels.quant import (
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize,
    orthogonal_rotation,
    quantize,
)
from .base import BasePress, LayerContext
from .cache import BatchMappedLayer, _tensor_nbytes

__all__ = ["KIVIPress", "KIVILayer", "rotate_keys"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Apply (``inverse=False``) or undo RoPE on ``k`` ``[B, H, T, d]`` with ``cos``/``sin``
    broadcastable to ``[B, H, T, d_rot]`` (rotate-half convention of Llama, Qwen, Mistral,
    Gemma, Phi-3; partial rotary when ``d_rot < d``: the first ``d_rot`` channels rotate)."""
    dr = cos.shape[-1]
    s = -sin if inverse else sin
    kr, kp = k[..., :dr], k[..., dr:]
    out = kr * cos + _rotate_half(kr) * s
    return out if kp.shape[-1] == 0 else torch.cat([out, kp], dim=-1)


def _value_group(d: int, g: int) -> int:
    g = min(g, d)
    while d % g:
        g //= 2
    return max(g, 1)


class KIVILayer(BatchMappedLayer):
    """A cache layer: full-precision sinks + quantized middle + full-precision tail.

    ``kq``: key chunks (:class:`QuantizedTensor`, pre-RoPE when ``positions`` is set), ``vq``:
    the values of the same tokens; ``keys``/``values``: the full-precision recent window and
    every token decoded later. ``logical_length`` counts every token seen (evicted ones too).
    """

    is_croppable = False

    def __init__(
        self,
        sink_keys: torch.Tensor,
        sink_values: torch.Tensor,
        kq: list[QuantizedTensor],
        vq: QuantizedTensor | None,
        positions: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        tail_keys: torch.Tensor,
        tail_values: torch.Tensor,
        logical_length: int,
        pos_start: int = 0,
        value_rotation: torch.Tensor | None = None,
    ):
        super().__init__()
        self.lazy_initialization(tail_keys, tail_values)
        self.sink_keys, self.sink_values = sink_keys, sink_values
        self.kq, self.vq = kq, vq
        self.positions = positions  # int16/int32 [B, H, M], or None: post-RoPE codes or implicit
        self.rope = rope  # (cos, sin) [Bc, T, d_rot] shared model constant, or None (post-RoPE)
        self.pos_start = int(pos_start)  # with rope and no positions: token i sat at pos_start + i
        self.value_rotation = value_rotation  # [dv, dv] orthonormal model constant, or None
        self.keys, self.values = tail_keys, tail_values
        self.logical_length = int(logical_length)

    @property
    def n_quantized(self) -> int:
        return 0 if self.vq is None else self.vq.shape[2]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (post-RoPE) and values of the quantized part, ``[B, H, M, d]``."""
        if self.vq is None:
            return self.keys[:, :, :0], self.values[:, :, :0]
        k = torch.cat([dequantize(q) for q in self.kq], dim=2)
        if self.rope is not None:
            cos, sin = self.rope
            b, h, m = k.shape[:3]
            if self.positions is None:  # every token from pos_start on: positions are implicit
                pos = torch.arange(self.pos_start, self.pos_start + m, device=k.device).expand(b, h, m)
            else:
                pos = self.positions.long()
            if cos.shape[0] != b:
                cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
            idx = pos.reshape(b, h * m, 1).expand(-1, -1, cos.shape[-1])
            c = cos.float().gather(1, idx).view(b, h, m, -1)
            s = sin.float().gather(1, idx).view(b, h, m, -1)
            k = rotate_keys(k, c, s)
        v = dequantize(self.vq)
        if self.value_rotation is not None:
            v = v @ self.value_rotation.T.float()
        return k.to(self.keys.dtype), v.to(self.values.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        self.logical_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        k, v = self.dequantized()
        return (
            torch.cat([self.sink_keys, k, self.keys], dim=-2),
            torch.cat([self.sink_values, v, self.values], dim=-2),
        )

    def stored_length(self) -> int:
        return self.sink_keys.shape[-2] + self.n_quantized + self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        s = self.stored_length()
        return s + query_length, self.logical_length - s

    def nbytes(self) -> int:
        seen: set[int] = set()
        q = sum(x.nbytes() for x in self.kq) + (0 if self.vq is None else self.vq.nbytes())
        return q + _tensor_nbytes(
            [self.sink_keys, self.sink_values, self.positions, self.keys, self.values], seen
        )

    def shared_nbytes(self) -> int:
        """Bytes of the RoPE table and value rotation this layer references (model constants
        shared by all layers, recomputable)."""
        return _tensor_nbytes([t for t in (*(self.rope or ()), self.value_rotation) if t is not None], set())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache layer cannot be cropped")

    def _map_batch(self, fn: Any) -> None:
        def qt(q: QuantizedTensor) -> QuantizedTensor:
            codes = fn(q.codes)
            shape = (codes.shape[0],) + tuple(q.shape[1:])
            return QuantizedTensor(codes, fn(q.scale), fn(q.zero), q.bits, q.group_size, q.axis, shape)

        self.kq = [qt(q) for q in self.kq]
        self.vq = None if self.vq is None else qt(self.vq)
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.rope is not None:
            cos, sin = self.rope
            if cos.shape[0] > 1:
                self.rope = (fn(cos), fn(sin))
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.keys, self.values = fn(self.keys), fn(self.values)


@dataclass
class KIVIPress(BasePress):
    """Quantize the whole prefill cache (nothing evicted): KIVI layout, pre-RoPE keys.

    ``budget`` is ignored (every token is kept); bytes are set by the bit widths, group sizes,
    ``sink`` and ``window``. Combine with eviction through
    :class:`~ctxzip.kvcache.combo.EvictThenQuantizePress` (keep rate x bits) to reach ~10% of a
    bf16 cache.

    Args:
        key_bits: bits per key entry (KIVI: 2; 4 is lossless here, 2 is not - see the module doc).
        value_bits: bits per value entry (2 retained ~1.0 here).
        key_group: tokens per key-channel group (KIVI: 32-128). A last partial group of the
            prefill is quantized with its own (smaller) group instead of staying in fp.
        value_group: channels per value group (capped at / dividing the head dim).
        sink: first stored tokens kept in full precision (attention sinks).
        window: most recent prefill tokens kept in full precision (KIVI's residual; 32-128 in
            the paper - it costs 16 bits per entry, so small windows suit 10%-bytes budgets).
        pre_rope: quantize keys before RoPE (KVQuant) and store one position per token to
            rotate them back; ``False`` quantizes post-RoPE keys (KIVI as published).
        rotate_values: multiply values by a fixed orthonormal (Hadamard) matrix before their
            per-token quantization and by its transpose after (QuaRot's rotation, here on the
            cache only): outlier channels are spread over the group, so 2-bit values lose less.
    """

    key_bits: int = 4
    value_bits: int = 2
    key_group: int = 64
    value_group: int = 64
    sink: int = 4
    window: int = 16
    pre_rope: bool = True
    rotate_values: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {getattr(self, name)}")
        for name in ("key_group", "value_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.sink < 0 or self.window < 0:
            raise ValueError("sink and window must be >= 0")

    def compress_layer(self, ctx: LayerContext) -> Any:
        t = ctx.seq_len
        pos = torch.arange(t, device=ctx.keys.device).expand(*ctx.keys.shape[:2], t)
        return self.build_layer(ctx, ctx.keys, ctx.values, pos, t)

    def build_layer(
        self, ctx: LayerContext, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
        logical_length: int,
    ) -> KIVILayer:
        """Store ``keys``/``values`` ``[B, H, N, d]`` (post-RoPE, position order) whose token
        ``i`` of head ``h`` sat at prefill position ``positions[b, h, i]``."""
        n = keys.shape[-2]
        s = min(self.sink, n)
        m = max(0, n - s - self.window)
        e = s + m
        # clone, not contiguous(): a slice that is already contiguous (one head, or an empty
        # tail) would stay a view and keep the whole full-precision input alive
        sink_k, sink_v = keys[:, :, :s].clone(), values[:, :, :s].clone()
        tail_k, tail_v = keys[:, :, e:].clone(), values[:, :, e:].clone()
        if m == 0:
            return KIVILayer(sink_k, sink_v, [], None, None, None, tail_k, tail_v, logical_length)
        k = keys[:, :, s:e].float()
        v = values[:, :, s:e].float()
        rope, pos = None, None
        if self.pre_rope:
            cos, sin = ctx.position_embeddings
            p = positions[:, :, s:e].long()
            b, h, _ = p.shape
            cb = cos if cos.shape[0] == b else cos.expand(b, -1, -1)
            sb = sin if sin.shape[0] == b else sin.expand(b, -1, -1)
            idx = p.reshape(b, h * m, 1).expand(-1, -1, cos.shape[-1])
            c = cb.float().gather(1, idx).view(b, h, m, -1)
            sn = sb.float().gather(1, idx).view(b, h, m, -1)
            k = rotate_keys(k, c, sn, inverse=True)
            rope = (cos, sin)
            if bool((p == torch.arange(s, e, device=p.device)).all()):
                pos = None  # consecutive positions (nothing evicted): not stored
            else:
                pos = p.to(torch.int16 if ctx.seq_len < 2**15 else torch.int32)
        kq = []
        n_full = m // self.key_group * self.key_group
        if n_full:
            kq.append(quantize(k[:, :, :n_full].contiguous(), bits=self.key_bits,
                               group_size=self.key_group, axis="channel"))
        if m - n_full:
            kq.append(quantize(k[:, :, n_full:].contiguous(), bits=self.key_bits,
                               group_size=m - n_full, axis="channel"))
        rot = orthogonal_rotation(v.shape[-1], v.device) if self.rotate_values else None
        if rot is not None:
            v = v @ rot
        vq = quantize(v.contiguous(), bits=self.value_bits,
                      group_size=_value_group(v.shape[-1], self.value_group), axis="token")
        return KIVILayer(sink_k, sink_v, kq, vq, pos, rope, tail_k, tail_v, logical_length, pos_start=s,
                         value_rotation=rot)
