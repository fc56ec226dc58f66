"""Torch reference implementations of the ctxzip attention kernels.

These run everywhere (CPU, CUDA, MPS), are the ground truth the Triton kernels are tested
against, and are what :mod:`ctxzip.kernels` dispatches to off-GPU. They never build the full
``Tq x Tk`` probability matrix for long inputs: queries are processed in blocks whose score
tile is bounded by ``max_block_elems`` (default 2**22 fp32 values, 16 MB), so peak extra memory
is ``O(block * Tk)`` instead of ``O(Tq * Tk)``.

Conventions shared by every function here
-----------------------------------------
* ``q``: ``[B, Hq, Tq, d]``; ``k``/``v``: ``[B, Hkv, Tk, d]``; ``Hq`` a multiple of ``Hkv``
  (grouped-query attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``).
* ``causal=True`` aligns the queries to the **end** of the keys, as in decoding with a cache:
  query ``i`` sits at absolute position ``Tk - Tq + i`` and sees keys ``0 .. Tk - Tq + i``.
* ``attention_mask`` may be

  - ``[B, Tk]`` key-padding mask (bool or 0/1 ints; true/1 = real token, e.g. left padding),
  - ``[B or 1, Hq or 1, Tq, Tk]`` boolean mask (``True`` = may attend), or
  - ``[B or 1, Hq or 1, Tq, Tk]`` float additive mask (0 = attend, large negative/-inf = not);

  it is combined with ``causal``.
* Accumulation in fp32. A query row that can see no key at all gets output 0 and
  log-sum-exp ``-inf`` (never NaN).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention_ref",
    "attention_mass_ref",
    "attention_and_mass_ref",
    "decode_ragged_ref",
    "decode_quantized_ref",
    "DEFAULT_MAX_BLOCK_ELEMS",
]

DEFAULT_MAX_BLOCK_ELEMS = 1 << 22
_GQA_MODES = ("sum", "mean", "per_head")


# ----------------------------------------------------------------------------- validation


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> tuple[int, ...]:
    """Validate shapes and return ``(B, Hq, Hkv, Tq, Tk, d)``."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError("q and k must be torch tensors")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q must be [B, Hq, Tq, d] and k [B, Hkv, Tk, d]; got q{tuple(q.shape)} k{tuple(k.shape)}"
        )
    B, Hq, Tq, d = q.shape
    Bk, Hkv, Tk, dk = k.shape
    if Bk != B or dk != d:
        raise ValueError(f"batch/head_dim mismatch: q{tuple(q.shape)} vs k{tuple(k.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a positive multiple of KV heads ({Hkv})")
    if v is not None and (v.dim() != 4 or v.shape[:3] != k.shape[:3]):
        raise ValueError(f"v must be [B, Hkv, Tk, dv] matching k; got v{tuple(v.shape)}")
    if not q.is_floating_point() or not k.is_floating_point():
        raise TypeError(f"q/k must be floating point, got {q.dtype}/{k.dtype}")
    if q.device != k.device or (v is not None and v.device != k.device):
        raise ValueError("q, k and v must be on the same device")
    return B, Hq, Hkv, Tq, Tk, d


def _resolve_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


class _Mask:
    """An attention mask normalised to slices broadcastable to ``[B, Hkv, G, bq, Tk]``."""

    def __init__(self, mask: torch.Tensor | None, B: int, Hq: int, Hkv: int, Tq: int, Tk: int):
        self.kind = "none"
        self.mask = None
        self.G = Hq // Hkv
        self.Hkv = Hkv
        if mask is None:
            return
        if not isinstance(mask, torch.Tensor):
            raise TypeError("attention_mask must be a torch tensor or None")
        if mask.dim() == 2:
            if tuple(mask.shape) != (B, Tk):
                raise ValueError(f"2-D attention_mask must be [B, Tk]=({B}, {Tk}), got {tuple(mask.shape)}")
            self.kind = "keys"
            self.mask = mask.bool().view(B, 1, 1, 1, Tk)
        elif mask.dim() == 4:
            mb, mh, mq, mk = mask.shape
            if mb not in (1, B) or mh not in (1, Hq) or mq != Tq or mk != Tk:
                raise ValueError(
                    f"4-D attention_mask must be [B|1, Hq|1, Tq, Tk]=({B}, {Hq}, {Tq}, {Tk}), "
                    f"got {tuple(mask.shape)}"
                )
            self.kind = "bool" if mask.dtype == torch.bool else "additive"
            if self.kind == "additive" and not mask.is_floating_point():
                raise TypeError("a non-boolean 4-D attention_mask must be a float additive mask")
            if mh == Hq and Hq > 1:
                self.mask = mask.view(mb, Hkv, self.G, Tq, Tk)
            else:
                self.mask = mask.view(mb, 1, 1, Tq, Tk)
        else:
            raise ValueError(
                f"attention_mask must be [B, Tk] or [B|1, H|1, Tq, Tk], got {tuple(mask.shape)}"
            )

    def apply(self, s: torch.Tensor, q0: int, q1: int) -> torch.Tensor:
        """Mask a ``[B, Hkv, G, q1-q0, n]`` fp32 score block (keys ``0..n-1``) in place."""
        if self.kind == "none":
            return s
        n = s.shape[-1]
        if self.kind == "keys":
            return s.masked_fill_(~self.mask[..., :n], float("-inf"))
        m = self.mask[..., q0:q1, :n]
        if self.kind == "bool":
            return s.masked_fill_(~m, float("-inf"))
        return s.add_(m.float())


def _block_size(B: int, Hq: int, Tq: int, Tk: int, max_block_elems: int | None) -> int:
    cap = DEFAULT_MAX_BLOCK_ELEMS if max_block_elems is None else int(max_block_elems)
    if cap <= 0:
        raise ValueError("max_block_elems must be positive")
    return max(1, min(max(Tq, 1), cap // max(1, B * Hq * max(Tk, 1))))


def _check_window(window: int | None) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or int(window) != window or window < 0:
        raise ValueError(f"window must be a non-negative int or None, got {window!r}")
    return int(window)


def _blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    *,
    causal: bool,
    scale: float | None,
    attention_mask: torch.Tensor | None,
    lse_in: torch.Tensor | None,
    want_out: bool,
    mass_start: int | None,
    max_block_elems: int | None,
):
    """One blocked pass over queries computing any of: output, row LSE, per-key mass.

    Under ``causal`` a query block only reads the key prefix it can see. ``mass_start``: first
    query row whose probabilities are summed into the mass (``None``: no mass). Returns
    ``(out [B,Hkv,G,Tq,dv] | None, lse [B,Hkv,G,Tq], mass [B,Hkv,G,Tk] | None)``.
    """
    B, Hq, Hkv, Tq, Tk, d = check_qkv(q, k, v)
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries aligned to the end); got {Tq} > {Tk}")
    scale = _resolve_scale(scale, d)
    G = Hq // Hkv
    mask = _Mask(attention_mask, B, Hq, Hkv, Tq, Tk)
    dv = v.shape[-1] if v is not None else 0
    out = torch.zeros(B, Hkv, G, Tq, dv, dtype=q.dtype, device=q.device) if want_out else None
    lse = torch.full((B, Hkv, G, Tq), float("-inf"), dtype=torch.float32, device=q.device)
    mass = (
        torch.zeros(B, Hkv, G, Tk, dtype=torch.float32, device=q.device) if mass_start is not None else None
    )
    first = 0 if want_out or mass_start is None else mass_start
    if Tk == 0 or first >= Tq:
        return out, lse, mass
    qg = q.view(B, Hkv, G, Tq, d)
    kT = k.float().transpose(-1, -2)
    vf = v.float() if want_out else None
    lg = None if lse_in is None else lse_in.float().view(B, Hkv, G, Tq)
    tiny = torch.finfo(torch.float32).tiny
    bq = _block_size(B, Hq, Tq - first, Tk, max_block_elems)
    if causal and max_block_elems is None:
        # smaller query blocks skip more of the masked upper triangle (a block reads only the
        # key prefix it can see): ~8 blocks over long causal passes
        bq = min(bq, max(128, -(-(Tq - first) // 8)))
    for q0 in range(first, Tq, bq):
        q1 = min(Tq, q0 + bq)
        n = min(Tk, Tk - Tq + q1) if causal else Tk  # keys this block can see
        if n <= 0:
            continue
        qb = qg[:, :, :, q0:q1].float().reshape(B, Hkv, G * (q1 - q0), d)
        s = torch.matmul(qb, kT[..., :n]).mul_(scale).view(B, Hkv, G, q1 - q0, n)
        if causal:
            # only the last (q1 - q0) keys of the block can lie above the diagonal
            w = min(n, q1 - q0)
            qpos = torch.arange(q0, q1, device=s.device) + (Tk - Tq)
            kpos = torch.arange(n - w, n, device=s.device)
            s[..., n - w :].masked_fill_(kpos[None, :] > qpos[:, None], float("-inf"))
        mask.apply(s, q0, q1)
        if lg is not None:
            row = lg[:, :, :, q0:q1].unsqueeze(-1)
            row = torch.where(torch.isfinite(row), row, torch.full_like(row, float("inf")))
            p = torch.exp_(s.sub_(row))
        else:
            m = s.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp_(s.sub_(m))
            denom = p.sum(dim=-1)
            lse[:, :, :, q0:q1] = m.squeeze(-1) + torch.log(denom)
            p.div_(denom.clamp_min(tiny).unsqueeze(-1))
        if want_out:
            o = torch.matmul(p.view(B, Hkv, -1, n), vf[:, :, :n]).view(B, Hkv, G, q1 - q0, dv)
            out[:, :, :, q0:q1] = o.to(q.dtype)
        if mass is not None and q1 > mass_start:
            mass[..., :n] += p[:, :, :, max(0, mass_start - q0):].sum(dim=-2)
    return out, lse, mass


def _finish_mass(mass: torch.Tensor, gqa: str) -> torch.Tensor:
    B, Hkv, G, Tk = mass.shape
    if gqa == "per_head":
        return mass.view(B, Hkv * G, Tk)
    out = mass.sum(dim=2)
    return out / G if gqa == "mean" else out


# ----------------------------------------------------------------------------- attention


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    max_block_elems: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention, blocked over queries; returns ``out`` (and fp32 ``lse`` ``[B,Hq,Tq]``)."""
    B, Hq, _, Tq, _, _ = check_qkv(q, k, v)
    out, lse, _ = _blocked(
        q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, lse_in=None,
        want_out=True, mass_start=None, max_block_elems=max_block_elems,
    )
    out = out.view(B, Hq, Tq, v.shape[-1])
    return (out, lse.view(B, Hq, Tq)) if return_lse else out


def attention_mass_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    gqa: str = "sum",
    attention_mask: torch.Tensor | None = None,
    max_block_elems: int | None = None,
) -> torch.Tensor:
    """Per-key attention mass: column sums over queries of the softmax probabilities.

    ``window=None`` sums over all queries, ``window=w`` over the last ``min(w, Tq)`` queries
    (``w=0`` gives zeros). Returns fp32 ``[B, Hkv, Tk]`` for ``gqa="sum"``/``"mean"`` (summed or
    averaged over each GQA group of query heads) or ``[B, Hq, Tk]`` for ``gqa="per_head"``.
    ``lse`` (``[B, Hq, Tq]``, e.g. from :func:`attention_ref` with ``return_lse=True``) is used
    as the row normaliser; otherwise rows are normalised inside each query block (one pass).
    """
    B, Hq, Hkv, Tq, Tk, d = check_qkv(q, k)
    if gqa not in _GQA_MODES:
        raise ValueError(f"gqa must be one of {_GQA_MODES}, got {gqa!r}")
    window = _check_window(window)
    if lse is not None and tuple(lse.shape) != (B, Hq, Tq):
        raise ValueError(f"lse must be [B, Hq, Tq]=({B}, {Hq}, {Tq}), got {tuple(lse.shape)}")
    start = 0 if window is None else max(0, Tq - window)
    _, _, mass = _blocked(
        q, k, None, causal=causal, scale=scale, attention_mask=attention_mask, lse_in=lse,
        want_out=False, mass_start=start if start < Tq else Tq, max_block_elems=max_block_elems,
    )
    return _finish_mass(mass, gqa)


def attention_and_mass_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    gqa: str = "sum",
    attention_mask: torch.Tensor | None = None,
    max_block_elems: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, mass)`` of :func:`attention_ref` and :func:`attention_mass_ref` in one pass."""
    B, Hq, _, Tq, _, _ = check_qkv(q, k, v)
    if gqa not in _GQA_MODES:
        raise ValueError(f"gqa must be one of {_GQA_MODES}, got {gqa!r}")
    window = _check_window(window)
    start = 0 if window is None else max(0, Tq - window)
    out, lse, mass = _blocked(
        q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, lse_in=None,
        want_out=True, mass_start=start, max_block_elems=max_block_elems,
    )
    return out.view(B, Hq, Tq, v.shape[-1]), lse.view(B, Hq, Tq), _finish_mass(mass, gqa)


# ----------------------------------------------------------------------------- decode


def decode_ragged_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Single-token decode attention over a ragged per-KV-head cache.

    ``q``: ``[B, Hq, d]`` (one new query per sequence); ``k``/``v``: ``[B, Hkv, Tmax, d]``
    padded storage where KV head ``(b, h)`` holds ``lengths[b, h]`` valid entries at the front
    (what head-wise eviction leaves); ``lengths``: ``[B, Hkv]`` integers in ``[0, Tmax]``. A head
    with length 0 yields output 0 and LSE ``-inf``. Returns ``[B, Hq, dv]`` (and ``[B, Hq]``).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, d] for decode, got {tuple(q.shape)}")
    B, Hq, Hkv, _, Tmax, d = check_qkv(q.unsqueeze(2), k, v)
    lengths = _check_lengths(lengths, B, Hkv, Tmax, k.device)
    keymask = torch.arange(Tmax, device=k.device)[None, None, :] < lengths[:, :, None]  # [B,Hkv,T]
    res = attention_ref(
        q.unsqueeze(2),
        k,
        v,
        causal=False,
        scale=scale,
        attention_mask=keymask.repeat_interleave(Hq // Hkv, dim=1).unsqueeze(2),
        return_lse=True,
    )
    out, lse = res
    return (out.squeeze(2), lse.squeeze(2)) if return_lse else out.squeeze(2)


def _check_lengths(lengths: torch.Tensor, B: int, Hkv: int, Tmax: int, device) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if tuple(lengths.shape) != (B, Hkv):
        raise ValueError(f"lengths must be [B, Hkv]=({B}, {Hkv}), got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > Tmax):
        raise ValueError(f"lengths must lie in [0, {Tmax}]")
    return lengths.long()


def decode_quantized_ref(
    q: torch.Tensor,
    kq,
    vq,
    *,
    k_tail: torch.Tensor | None = None,
    v_tail: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Single-token decode over a group-quantized K/V cache (KIVI/GEAR layout).

    ``kq`` / ``vq`` are :class:`ctxzip.kernels.quant.QuantizedTensor` (keys quantized per
    channel over token groups, values per token over channel groups; see
    :mod:`ctxzip.kernels.quant`), optionally carrying a low-rank correction ``A @ B``.
    ``k_tail``/``v_tail`` (``[B, Hkv, Tr, d]``) hold the full-precision recent tokens that come
    after the quantized ones. The reference dequantizes and runs :func:`attention_ref`.
    """
    from .quant import dequantize

    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, d] for decode, got {tuple(q.shape)}")
    k = dequantize(kq).to(torch.float32)
    v = dequantize(vq).to(torch.float32)
    if (k_tail is None) != (v_tail is None):
        raise ValueError("k_tail and v_tail must be given together")
    if k_tail is not None:
        k = torch.cat([k, k_tail.float()], dim=2)
        v = torch.cat([v, v_tail.float()], dim=2)
    res = attention_ref(q.unsqueeze(2), k, v, causal=False, scale=scale, return_lse=True)
    out, lse = res
    out = out.squeeze(2).to(q.dtype)
    return (out, lse.squeeze(2)) if return_lse else out
