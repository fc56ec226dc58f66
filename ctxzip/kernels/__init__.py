"""Attention kernels that expose what compressors need: LSE, per-key attention mass, decode
over ragged and quantized caches. Triton on CUDA, torch reference elsewhere.

``attention`` / ``attention_mass`` / ``decode_ragged`` / ``decode_quantized`` dispatch on the
tensors' device (override with ``CTXZIP_KERNELS=torch|triton``); the ``*_ref`` functions in
:mod:`ctxzip.kernels.reference` are the torch ground truth. See ``docs/kernels.md``.
"""

from .dispatch import (
    attention,
    attention_mass,
    backend_for,
    decode_quantized,
    decode_ragged,
    triton_available,
)
from .reference import attention_mass_ref, attention_ref, decode_quantized_ref, decode_ragged_ref

__all__ = [
    "attention",
    "attention_mass",
    "decode_ragged",
    "decode_quantized",
    "backend_for",
    "triton_available",
    "attention_ref",
    "attention_mass_ref",
    "decode_ragged_ref",
    "decode_quantized_ref",
]
