"""Attention kernels that expose what compressors need: LSE, per-key attention mass, decode
over ragged and quantized caches. Triton on CUDA, torch reference elsewhere.

``attention`` / ``attention_mass`` / ``decode_ragged`` / ``decode_quantized`` dispatch on the
tensors' device (override with ``CTXZIP_KERNELS=torch|triton``); the ``*_ref`` functions in
:mod:`ctxzip.kernels.reference` are the torch ground truth. See ``docs/kernels.md``.
"""

from .dispatch import (
    attention,
    attention_and_mass,
    attention_mass,
    backend_for,
    decode_quantized,
    decode_ragged,
    triton_available,
)
from .hf import AttentionRecorder, attention_modules, ctxzip_attention_forward, record_attention
from .hf import register as register_hf_attention
from .quant import QuantizedTensor, dequantize, quantize
from .reference import (
    attention_and_mass_ref,
    attention_mass_ref,
    attention_ref,
    decode_quantized_ref,
    decode_ragged_ref,
)

# make attn_implementation="ctxzip" available as soon as ctxzip.kernels is imported
register_hf_attention()

__all__ = [
    "attention",
    "attention_mass",
    "attention_and_mass",
    "decode_ragged",
    "decode_quantized",
    "backend_for",
    "triton_available",
    "attention_ref",
    "attention_mass_ref",
    "attention_and_mass_ref",
    "decode_ragged_ref",
    "decode_quantized_ref",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "record_attention",
    "AttentionRecorder",
    "attention_modules",
    "ctxzip_attention_forward",
    "register_hf_attention",
]
