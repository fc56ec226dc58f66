"""GEAR: quantization backbone + low-rank residual + sparse outliers, as a compressed cache
layer (Kang et al., 2024, arXiv 2403.05527; HaoKang-Timmy/GEAR
``GEARLM/Simulated/compress_function.py``, ``cuda_supported_gear``).

Each cached ``X`` (post-RoPE keys, values; per KV head, ``T x d``) is stored as
``X ≈ Q̂(X - S) + L + S``:

1. **S - sparse outliers**: the ``k`` largest and ``k`` smallest entries of each row are kept
   exactly (fp16 values + int32 flat indices) and replaced by the row mean before quantizing.
   Values: a row is one token (``k = round(s * d / 2)``); keys: a row is one channel over the
   tokens of the chunk (``k = round(s * T / 2)``). The reference code scales the key count by
   ``H * d`` instead of ``T`` (PAPERS.md pitfall (a)); we keep the fraction ``s`` for both.
2. **Q̂ - b-bit group quantization** in the shared KIVI layout of
   :mod:`ctxzip.kernels.quant` (keys per channel over ``group_size`` tokens, values per token
   over ``group_size`` channels of one head - GEAR groups values over the flattened ``H*d``
   vector; per head is the layout the decode kernels read).
3. **L - low-rank residual**: ``R = X - (Q̂ + S)`` per (batch, head), rank ``r`` by power
   iteration (``loops`` passes, QR on the last one, seeded - the reference is unseeded),
   stored as the ``lr_a``/``lr_b`` factors of the quantized tensor.
4. **Streaming buffer**: tokens that do not fill a chunk of ``buffer`` tokens (a multiple of
   ``group_size``) stay in full precision; each time the buffer fills it is compressed as a new
   chunk with the decode rank (the prefill uses ``prefill_rank``), never re-compressing what
   was already compressed (avoids pitfall (c)).

Nothing is evicted; :meth:`GEARLayer.nbytes` counts codes, scales, zeros, low-rank factors,
outlier values and indices and the fp buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kernels.quant import QuantizedTensor, dequantize, quantize
from .base import BasePress, LayerContext
from .cache import BatchMappedLayer, _tensor_nbytes

__all__ = ["GEARPress", "GEARLayer", "GEARChunk", "gear_compress", "gear_decompress"]


@dataclass
class GEARChunk:
    """One compressed block of ``T_c`` tokens for K and V."""

    kq: QuantizedTensor
    vq: QuantizedTensor
    k_out_idx: torch.Tensor | None  # int32 [B, H, n_k] flat indices into T_c*d
    k_out_val: torch.Tensor | None  # fp16 [B, H, n_k]
    v_out_idx: torch.Tensor | None
    v_out_val: torch.Tensor | None

    def nbytes(self) -> int:
        seen: set[int] = set()
        extra = sum(
            _tensor_nbytes(t, seen)
            for t in (self.k_out_idx, self.k_out_val, self.v_out_idx, self.v_out_val)
        )
        return self.kq.nbytes() + self.vq.nbytes() + extra


def _outliers(x: torch.Tensor, k: int, row_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k and bottom-k entries of each row (rows run along ``row_dim`` of ``[B, H, T, d]``).
    Returns (x with outliers replaced by the row mean, flat indices int32, values fp16)."""
    b, h, t, d = x.shape
    xr = x.transpose(-1, -2) if row_dim == 2 else x  # rows along last axis
    k = min(k, xr.shape[-1] // 2)
    if k <= 0:
        return x, None, None
    top = xr.topk(k, dim=-1).indices
    bot = (-xr).topk(k, dim=-1).indices
    idx = torch.cat([top, bot], -1)  # [B, H, rows, 2k]
    vals = xr.gather(-1, idx)
    mean = xr.mean(-1, keepdim=True).expand_as(vals)
    filled = xr.scatter(-1, idx, mean)
    if row_dim == 2:  # rows = channels: idx are token indices within channel c
        c = torch.arange(d, device=x.device)[None, None, :, None]
        flat = idx * d + c
        filled = filled.transpose(-1, -2)
    else:  # rows = tokens: idx are channel indices within token t
        tt = torch.arange(t, device=x.device)[None, None, :, None]
        flat = tt * d + idx
    return filled, flat.reshape(b, h, -1).to(torch.int32), vals.reshape(b, h, -1).to(torch.float16)


def _power_iteration(r: torch.Tensor, rank: int, loops: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """GEAR's ``fake_poweriteration_group`` on ``R`` ``[B, H, T, d]`` -> (A ``[B,H,T,r]``,
    B ``[B,H,r,d]``) with ``R ≈ A @ B``."""
    b, h, t, d = r.shape
    rank = min(rank, t, d)
    p = torch.rand((b, h, d, rank), generator=gen, dtype=torch.float32).to(r.device)
    q = None
    for i in range(loops):
        last = i == loops - 1
        if last:
            p = torch.linalg.qr(p).Q
        q = r @ p
        if last:
            q = torch.linalg.qr(q).Q
        p = r.transpose(-1, -2) @ q
    return q, p.transpose(-1, -2)


def gear_compress(
    k: torch.Tensor, v: torch.Tensor, *, bits: int, group_size: int, rank: int, outlier: float,
    loops: int, seed: int = 0, factor_dtype: torch.dtype = torch.float16,
    value_group_size: int | None = None,
) -> GEARChunk:
    """Compress one chunk ``[B, H, T_c, d]`` of keys and values (``T_c`` a multiple of
    ``group_size``; values are grouped over ``value_group_size`` channels, default
    ``min(group_size, d)``)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for x, axis, row_dim in ((k.float(), "channel", 2), (v.float(), "token", 3)):
        t, d = x.shape[-2], x.shape[-1]
        n_row = t if row_dim == 2 else d
        n_out = int(round(outlier * n_row / 2))
        xf, oidx, oval = _outliers(x, n_out, row_dim)
        g = group_size if axis == "channel" else min(value_group_size or group_size, d)
        while axis == "token" and d % g:
            g //= 2
        qt = quantize(xf.contiguous(), bits=bits, group_size=g, axis=axis)
        xhat = dequantize(qt)
        if oidx is not None:
            xhat = _scatter_flat(xhat, oidx, oval)
        if rank > 0:
            a, bm = _power_iteration(x - xhat, rank, loops, gen)
            qt = qt.with_low_rank(a.to(factor_dtype), bm.to(factor_dtype))
        parts.append((qt, oidx, oval))
    (kq, ki, kv), (vq, vi, vv) = parts
    return GEARChunk(kq, vq, ki, kv, vi, vv)


def _scatter_flat(x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    flat = x.reshape(b, h, t * d).scatter(-1, idx.long(), val.to(x.dtype))
    return flat.view(b, h, t, d)


def gear_decompress(chunk: GEARChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q̂ + L`` with the outliers written back: fp32 ``[B, H, T_c, d]`` keys and values."""
    k = dequantize(chunk.kq)
    v = dequantize(chunk.vq)
    if chunk.k_out_idx is not None:
        k = _scatter_flat(k, chunk.k_out_idx, chunk.k_out_val)
    if chunk.v_out_idx is not None:
        v = _scatter_flat(v, chunk.v_out_idx, chunk.v_out_val)
    return k, v


class GEARLayer(BatchMappedLayer):
    """A cache layer holding GEAR-compressed chunks + a full-precision streaming buffer
    (``keys``/``values``). ``update`` appends to the buffer, compresses it when it reaches
    ``buffer`` tokens, and returns the dequantized cache (transient) for attention."""

    is_croppable = False

    def __init__(
        self, press: GEARPress, keys: torch.Tensor, values: torch.Tensor, layer_idx: int,
        logical_length: int | None = None,
    ):
        super().__init__()
        n = keys.shape[-2]
        # tokens evicted before quantization (evict-then-quantize): positions keep counting
        self.evicted = 0 if logical_length is None else int(logical_length) - n
        self.lazy_initialization(keys, values)
        self.press = press
        self.layer_idx = layer_idx
        self.chunks: list[GEARChunk] = []
        # attention sinks: the first `sink` stored tokens stay in full precision
        s = min(int(press.sink), n)
        self.sink_keys = keys[:, :, :s].clone()
        self.sink_values = values[:, :, :s].clone()
        keys, values = keys[:, :, s:], values[:, :, s:]
        self.keys = keys[:, :, :0]
        self.values = values[:, :, :0]
        self._deq: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n_compressed = 0
        self._append(keys, values, prefill=True)

    def _append(self, k: torch.Tensor, v: torch.Tensor, prefill: bool = False) -> None:
        p = self.press
        self.keys = torch.cat([self.keys, k], -2)
        self.values = torch.cat([self.values, v], -2)
        n = self.keys.shape[-2]
        # keep at least `buffer` recent tokens in full precision after prefill (GEAR CUDA:
        # residual 64), compress whole chunks of `buffer` tokens
        n_full = (n - p.buffer) // p.buffer * p.buffer if prefill else (n // p.buffer) * p.buffer
        if n_full <= 0:
            return
        rank = p.prefill_rank if prefill else p.rank
        for s in range(0, n_full, p.chunk if prefill else p.buffer):
            e = min(n_full, s + (p.chunk if prefill else p.buffer))
            self.chunks.append(
                gear_compress(
                    self.keys[:, :, s:e], self.values[:, :, s:e], bits=p.bits,
                    group_size=p.group_size, rank=rank, outlier=p.outlier, loops=p.loops,
                    seed=p.seed + self.layer_idx * 7919 + len(self.chunks),
                    value_group_size=p.value_group_size,
                )
            )
        self.n_compressed += n_full
        self.keys = self.keys[:, :, n_full:].clone()
        self.values = self.values[:, :, n_full:].clone()
        self._deq = None

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._deq is None:
            if self.chunks:
                ks, vs = zip(*(gear_decompress(c) for c in self.chunks))
                self._deq = (
                    torch.cat(ks, -2).to(self.keys.dtype), torch.cat(vs, -2).to(self.values.dtype)
                )
            else:
                self._deq = (self.keys[:, :, :0], self.values[:, :, :0])
        return self._deq

    def update(self, key_states, value_states, *args, **kwargs):
        self._append(key_states, value_states)
        k, v = self._dequantized()
        out = (
            torch.cat([self.sink_keys, k, self.keys], -2),
            torch.cat([self.sink_values, v, self.values], -2),
        )
        if not self.press.cache_dequantized:
            self._deq = None
        return out

    def stored_length(self) -> int:
        return self.sink_keys.shape[-2] + self.n_compressed + self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.evicted + self.stored_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored_length() + query_length, self.evicted

    def nbytes(self) -> int:
        seen: set[int] = set()
        return sum(c.nbytes() for c in self.chunks) + _tensor_nbytes(
            [self.sink_keys, self.sink_values, self.keys, self.values], seen
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache layer cannot be cropped")

    def _map_batch(self, fn: Any) -> None:
        def qt(q: QuantizedTensor) -> QuantizedTensor:
            lr_a = None if q.lr_a is None else fn(q.lr_a)
            lr_b = None if q.lr_b is None else fn(q.lr_b)
            codes = fn(q.codes)
            shape = (codes.shape[0],) + tuple(q.shape[1:])
            return QuantizedTensor(
                codes, fn(q.scale), fn(q.zero), q.bits, q.group_size, q.axis, shape, lr_a, lr_b
            )

        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        self.chunks = [
            GEARChunk(qt(c.kq), qt(c.vq), opt(c.k_out_idx), opt(c.k_out_val), opt(c.v_out_idx),
                      opt(c.v_out_val))
            for c in self.chunks
        ]
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self._deq = None


@dataclass
class GEARPress(BasePress):
    """GEAR compressed cache (quantization + low-rank + sparse outliers), nothing evicted.

    ``budget`` is ignored for the number of tokens (GEAR keeps every token); memory is set by
    ``bits``, ``rank``, ``outlier`` and ``buffer``. Combine with an eviction press through
    :class:`~ctxzip.kvcache.combo.EvictThenQuantizePress` to reach lower byte budgets.

    Args:
        bits: backbone bits (2 = GEAR-KIVI setting, 4 = GEAR-KCVT).
        group_size: quantization group (GEAR: 64).
        rank: low-rank rank for decode-time chunks (GEAR: 2).
        prefill_rank: low-rank rank for the prefill (GEAR: 4), per chunk of ``chunk`` tokens.
        outlier: fraction ``s`` of entries kept exactly per row (GEAR: 0.02; 0 = GEARL).
        loops: power-iteration passes (GEAR: 3).
        buffer: full-precision streaming buffer / decode chunk in tokens (GEAR: 64); a multiple
            of ``group_size``.
        chunk: prefill chunk length for the low-rank fit (one (P, Q) pair per chunk, as the
            CUDA version's per-block factors); a multiple of ``group_size``.
        seed: power-iteration seed.
        value_group_size: channels per value quantization group (``None``: ``group_size``
            capped at the head dim, as GEAR).
        sink: first stored tokens kept in full precision (attention sinks; 0 = GEAR as
            published). The sink token's keys/values are outliers whose quantization error
            every later query sees (IntactKV, Liu et al., 2024, arXiv 2403.01241; SKVQ).
        cache_dequantized: keep the dequantized copy between steps (faster decode, but the
            process then holds the fp tensors too; ``False`` measures the compressed form only).
    """

    bits: int = 2
    group_size: int = 64
    rank: int = 2
    prefill_rank: int = 4
    outlier: float = 0.02
    loops: int = 3
    buffer: int = 64
    chunk: int = 256
    seed: int = 0
    cache_dequantized: bool = False
    value_group_size: int | None = None
    sink: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (2, 4, 8):
            raise ValueError("bits must be 2, 4 or 8")
        for name in ("group_size", "buffer", "chunk", "loops"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.buffer % self.group_size or self.chunk % self.group_size:
            raise ValueError("buffer and chunk must be multiples of group_size")
        if self.rank < 0 or self.prefill_rank < 0:
            raise ValueError("ranks must be >= 0")
        if not 0.0 <= self.outlier < 1.0:
            raise ValueError("outlier must be in [0, 1)")
        if self.value_group_size is not None and self.value_group_size < 1:
            raise ValueError("value_group_size must be >= 1")
        if self.sink < 0:
            raise ValueError("sink must be >= 0")

    def compress_layer(self, ctx: LayerContext) -> Any:
        return GEARLayer(self, ctx.keys, ctx.values, ctx.layer_idx)
