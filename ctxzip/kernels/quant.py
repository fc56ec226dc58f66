"""The one group-quantized K/V layout of ctxzip (KIVI / GEAR), shared by kernels and caches.

KIVI (Liu et al., 2024, arXiv 2402.02750) quantizes **keys per channel** (each channel is
grouped over ``group_size`` consecutive tokens, because key outliers live in fixed channels)
and **values per token** (each token's vector is grouped over ``group_size`` consecutive
channels). GEAR (Kang et al., 2024, arXiv 2403.05527) uses the same backbone with ``b = 2`` or
``4`` and adds a low-rank fit ``A @ B`` of the quantization residual (and sparse outliers,
which the cache keeps on its own). Tokens that do not fill a whole key group stay in full
precision as a *tail* (KIVI's residual / GEAR's streaming buffer) and are passed next to the
quantized part to the decode kernel.

Layout of a :class:`QuantizedTensor` standing for ``X`` of shape ``[B, H, T, D]``
--------------------------------------------------------------------------------
* ``codes``: ``uint8`` ``[B, H, T, D * bits // 8]``. Codes are packed **along the channel
  (last) axis**, little end first: channel ``c`` lives in byte ``c // (8 // bits)`` at bit
  offset ``(c % (8 // bits)) * bits``. ``bits`` is 2, 4 or 8; ``D`` a multiple of
  ``8 // bits``.
* Asymmetric uniform quantization with min/max per group:
  ``scale = (max - min) / (2**bits - 1)``, ``code = clamp(round((x - min) / scale))``,
  ``x_hat = code * scale + min`` (``scale = 0`` groups dequantize to ``min``).
* ``axis="channel"`` (keys): one group = ``group_size`` consecutive tokens of one channel;
  ``scale``/``zero`` (``zero`` holds ``min``) are ``[B, H, T // group_size, D]``; ``T`` must be
  a multiple of ``group_size``. Token ``t`` uses row ``t // group_size``.
* ``axis="token"`` (values): one group = ``group_size`` consecutive channels of one token;
  ``scale``/``zero`` are ``[B, H, T, D // group_size]``; channel ``c`` uses column
  ``c // group_size``.
* ``scale``/``zero`` are stored in ``scale_dtype`` (fp16 by default, as KIVI and GEAR do).
* Optional low-rank correction ``lr_a`` ``[B, H, T, r]`` and ``lr_b`` ``[B, H, r, D]``:
  ``X ≈ x_hat + lr_a @ lr_b`` (GEAR's ``L``). The decode kernel never materialises it:
  keys add ``(q · lr_bᵀ) · lr_aᵀ`` to the logits, values add ``(p · lr_a) · lr_b`` to the
  output — two skinny products, as GEAR's CUDA path does.

``nbytes()`` counts every stored byte (codes, scales, zeros, low-rank factors), which is what
KV-cache memory reports should use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "pack_codes",
    "unpack_codes",
    "SUPPORTED_BITS",
    "orthogonal_rotation",
]

SUPPORTED_BITS = (2, 4, 8)
_AXES = ("channel", "token")


@dataclass
class QuantizedTensor:
    """A group-quantized ``[B, H, T, D]`` tensor in the ctxzip/KIVI layout (see module doc)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: str
    shape: tuple[int, int, int, int]
    lr_a: torch.Tensor | None = None
    lr_b: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.axis not in _AXES:
            raise ValueError(f"axis must be one of {_AXES}, got {self.axis!r}")
        B, H, T, D = self.shape
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != (B, H, T, D * self.bits // 8):
            raise ValueError(
                f"codes must be uint8 [B, H, T, D*bits/8]=({B}, {H}, {T}, {D * self.bits // 8}), "
                f"got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        want = (B, H, T // self.group_size, D) if self.axis == "channel" else (B, H, T, D // self.group_size)
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must be {want} for axis={self.axis!r}, got {tuple(t.shape)}")
        if (self.lr_a is None) != (self.lr_b is None):
            raise ValueError("lr_a and lr_b must be given together")
        if self.lr_a is not None:
            r = self.lr_a.shape[-1]
            if tuple(self.lr_a.shape) != (B, H, T, r) or tuple(self.lr_b.shape) != (B, H, r, D):
                raise ValueError(
                    f"low-rank factors must be [B,H,T,r] and [B,H,r,D]; got "
                    f"{tuple(self.lr_a.shape)} and {tuple(self.lr_b.shape)}"
                )

    @property
    def rank(self) -> int:
        return 0 if self.lr_a is None else int(self.lr_a.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        """Bytes actually stored (codes + scales + zeros + low-rank factors)."""
        parts = [self.codes, self.scale, self.zero, self.lr_a, self.lr_b]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def with_low_rank(self, lr_a: torch.Tensor, lr_b: torch.Tensor) -> QuantizedTensor:
        """A copy carrying the low-rank correction ``lr_a @ lr_b``."""
        return QuantizedTensor(
            self.codes, self.scale, self.zero, self.bits, self.group_size, self.axis, self.shape,
            lr_a, lr_b,
        )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into ``uint8`` (little end first)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    per = 8 // bits
    D = codes.shape[-1]
    if D % per:
        raise ValueError(f"last dimension ({D}) must be a multiple of {per} for {bits}-bit packing")
    c = codes.to(torch.uint8).view(*codes.shape[:-1], D // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., D*bits/8]`` -> ``uint8 [..., D]``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    c = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1)


def quantize(
    x: torch.Tensor,
    *,
    bits: int = 2,
    group_size: int = 32,
    axis: str = "channel",
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Group-quantize ``x`` ``[B, H, T, D]`` into the shared layout.

    ``axis="channel"`` for keys (KIVI: per-channel over ``group_size`` tokens; ``T`` must be a
    multiple of ``group_size`` — keep the remainder as a full-precision tail), ``axis="token"``
    for values (per-token over ``group_size`` channels; ``D`` must be a multiple).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("x must be a floating [B, H, T, D] tensor")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if axis not in _AXES:
        raise ValueError(f"axis must be one of {_AXES}, got {axis!r}")
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    B, H, T, D = x.shape
    xf = x.float()
    if axis == "channel":
        if T % group_size:
            raise ValueError(
                f"keys are grouped over tokens: T ({T}) must be a multiple of group_size ({group_size}); "
                "keep the remaining tokens in full precision"
            )
        g = xf.view(B, H, T // group_size, group_size, D)
        lo, hi = g.amin(dim=3, keepdim=True), g.amax(dim=3, keepdim=True)
    else:
        if D % group_size:
            raise ValueError(f"values are grouped over channels: D ({D}) must be a multiple of {group_size}")
        g = xf.view(B, H, T, D // group_size, group_size)
        lo, hi = g.amin(dim=4, keepdim=True), g.amax(dim=4, keepdim=True)
    levels = (1 << bits) - 1
    # round the stored statistics first so that codes are computed against what is dequantized
    lo = lo.to(scale_dtype).float()
    scale = ((hi - lo) / levels).to(scale_dtype).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round((g - lo) / safe), 0, levels)
    codes = torch.where(scale > 0, codes, torch.zeros_like(codes)).view(B, H, T, D)
    sq = scale.squeeze(3 if axis == "channel" else 4).to(scale_dtype)
    zq = lo.squeeze(3 if axis == "channel" else 4).to(scale_dtype)
    return QuantizedTensor(pack_codes(codes, bits), sq, zq, bits, int(group_size), axis, (B, H, T, D))


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Full ``[B, H, T, D]`` reconstruction (including the low-rank term when present)."""
    B, H, T, D = qt.shape
    codes = unpack_codes(qt.codes, qt.bits).float()
    gs = qt.group_size
    if qt.axis == "channel":
        scale = qt.scale.float().repeat_interleave(gs, dim=2)
        zero = qt.zero.float().repeat_interleave(gs, dim=2)
    else:
        scale = qt.scale.float().repeat_interleave(gs, dim=3)
        zero = qt.zero.float().repeat_interleave(gs, dim=3)
    x = codes * scale + zero
    if qt.lr_a is not None:
        x = x + qt.lr_a.float() @ qt.lr_b.float()
    return x.to(dtype)


_ROTATIONS: dict[tuple[int, str], torch.Tensor] = {}


def orthogonal_rotation(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fixed ``[d, d]`` orthonormal matrix that spreads outlier channels before per-token
    quantization (QuaRot, Ashkboos et al., 2024, arXiv 2404.00456): the normalised Sylvester
    Hadamard matrix when ``d`` is a power of two, else a seeded random orthogonal matrix.
    ``x @ R`` is quantized; ``dequantize(...) @ R.T`` undoes it. A model constant (cached)."""
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    key = (int(d), str(device))
    if key not in _ROTATIONS:
        if d & (d - 1) == 0:
            h = torch.ones(1, 1)
            while h.shape[0] < d:
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
            r = h / d**0.5
        else:
            g = torch.Generator().manual_seed(d)
            r, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        _ROTATIONS[key] = r.to(device)
    return _ROTATIONS[key]
