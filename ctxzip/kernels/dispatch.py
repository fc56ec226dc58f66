"""Public entry points of :mod:`ctxzip.kernels` and the torch/Triton dispatch.

Backend choice, per call:

* ``CTXZIP_KERNELS=torch`` — always the torch reference (:mod:`ctxzip.kernels.reference`).
* ``CTXZIP_KERNELS=triton`` — always Triton. On CPU tensors this needs the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first imported); otherwise a
  clear error is raised.
* unset / ``auto`` — Triton for CUDA tensors when ``triton`` imports, torch elsewhere.

Triton is imported lazily, on the first call that needs it, so ``import ctxzip.kernels`` stays
cheap and never fixes the interpreter mode behind the caller's back.
"""

from __future__ import annotations

import functools
import os

import torch

from . import reference as ref

__all__ = [
    "attention",
    "attention_mass",
    "attention_and_mass",
    "decode_ragged",
    "decode_quantized",
    "backend_for",
    "triton_available",
]

_BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def _import_triton():
    try:
        import triton  # noqa: F401

        return True, ""
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"{type(exc).__name__}: {exc}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether Triton kernels can run for tensors on ``device`` (CUDA, or CPU under the interpreter)."""
    ok, _ = _import_triton()
    if not ok:
        return False
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cuda":
        return torch.cuda.is_available() or _interpreting()
    return dev.type == "cpu" and _interpreting()


def backend_for(device: torch.device | str, override: str | None = None) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device`` (see module docstring)."""
    choice = (override or os.environ.get("CTXZIP_KERNELS") or "auto").strip().lower()
    if choice not in _BACKENDS:
        raise ValueError(f"CTXZIP_KERNELS must be one of {_BACKENDS}, got {choice!r}")
    dev = torch.device(device)
    if choice == "torch":
        return "torch"
    if choice == "triton":
        ok, why = _import_triton()
        if not ok:
            raise RuntimeError(f"CTXZIP_KERNELS=triton but triton does not import ({why})")
        if dev.type == "cpu" and not _interpreting():
            raise RuntimeError(
                "CTXZIP_KERNELS=triton on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported"
            )
        if dev.type not in ("cpu", "cuda"):
            raise RuntimeError(f"Triton kernels do not run on {dev.type} tensors")
        return "triton"
    if dev.type == "cuda" and _import_triton()[0]:
        return "triton"
    return "torch"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``softmax(q kᵀ * scale + mask) v`` with fp32 accumulation.

    ``q`` ``[B, Hq, Tq, d]``, ``k``/``v`` ``[B, Hkv, Tk, d]`` (GQA when ``Hq > Hkv``). With
    ``causal=True`` the queries are the **last** ``Tq`` positions of the ``Tk`` keys (decoding
    with a cache; needs ``Tq <= Tk``). ``attention_mask``: ``[B, Tk]`` key padding (true = real
    token), or a 4-D ``[B|1, Hq|1, Tq, Tk]`` boolean (true = attend) / float additive mask.
    Returns ``out`` ``[B, Hq, Tq, dv]`` in ``q.dtype`` and, with ``return_lse=True``, the fp32
    row log-sum-exp ``[B, Hq, Tq]`` (``-inf`` for rows that see no key; their output is 0).
    """
    if backend_for(q.device, backend) == "triton":
        from .triton_attention import attention_triton

        return attention_triton(
            q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, return_lse=return_lse
        )
    return ref.attention_ref(
        q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, return_lse=return_lse
    )


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    gqa: str = "sum",
    attention_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention mass each key receives, without materialising the ``Tq x Tk`` matrix.

    Column sums over queries of the softmax probabilities (what H2O accumulates, what SnapKV
    votes with over its observation window, what FastV ranks image tokens by), over all
    queries (``window=None``) or the last ``window`` queries. Returns fp32 ``[B, Hkv, Tk]``
    summed (``gqa="sum"``) or averaged (``"mean"``) over each GQA group, or ``[B, Hq, Tk]``
    (``"per_head"``). Pass ``lse`` from :func:`attention` (``return_lse=True``) to reuse the
    row normalisers. Masks as in :func:`attention`.
    """
    if backend_for(q.device, backend) == "triton":
        from .triton_attention import attention_mass_triton

        return attention_mass_triton(
            q, k, window=window, causal=causal, scale=scale, lse=lse, gqa=gqa,
            attention_mask=attention_mask,
        )
    return ref.attention_mass_ref(
        q, k, window=window, causal=causal, scale=scale, lse=lse, gqa=gqa,
        attention_mask=attention_mask,
    )


def attention_and_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    gqa: str = "sum",
    attention_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, mass)``: :func:`attention` and :func:`attention_mass` together.

    The torch path does both in one blocked pass (the probabilities of each query block are
    used for the output and summed into the mass); the Triton path runs the fused forward and
    then the mass kernel on its LSE.
    """
    if backend_for(q.device, backend) == "triton":
        from .triton_attention import attention_mass_triton, attention_triton

        out, lse = attention_triton(
            q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, return_lse=True
        )
        mass = attention_mass_triton(
            q, k, window=window, causal=causal, scale=scale, lse=lse, gqa=gqa,
            attention_mask=attention_mask,
        )
        return out, lse, mass
    return ref.attention_and_mass_ref(
        q, k, v, window=window, causal=causal, scale=scale, gqa=gqa, attention_mask=attention_mask
    )


def decode_ragged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decode step over a ragged per-KV-head cache (see :func:`reference.decode_ragged_ref`)."""
    if backend_for(q.device, backend) == "triton":
        from .triton_decode import decode_ragged_triton

        return decode_ragged_triton(q, k, v, lengths, scale=scale, return_lse=return_lse)
    return ref.decode_ragged_ref(q, k, v, lengths, scale=scale, return_lse=return_lse)


def decode_quantized(
    q: torch.Tensor,
    kq,
    vq,
    *,
    k_tail: torch.Tensor | None = None,
    v_tail: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decode step over a group-quantized K/V cache (see :mod:`ctxzip.kernels.quant`)."""
    if backend_for(q.device, backend) == "triton":
        from .triton_decode import decode_quantized_triton

        return decode_quantized_triton(
            q, kq, vq, k_tail=k_tail, v_tail=v_tail, scale=scale, return_lse=return_lse
        )
    return ref.decode_quantized_ref(
        q, kq, vq, k_tail=k_tail, v_tail=v_tail, scale=scale, return_lse=return_lse
    )
