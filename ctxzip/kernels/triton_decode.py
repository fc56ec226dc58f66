"""Triton decode kernels over compressed KV caches.

Both kernels process one new query token per sequence, one program per
``(batch x KV head, split)``: the ``G`` query heads of a GQA group form the rows of one tile
(padded to 16 so ``tl.dot`` uses tensor cores), the cache is walked in ``BLOCK_N`` tiles with an
online softmax and fp32 accumulators, and the key range is split ``num_splits`` ways
(flash-decoding) so short batches still fill the GPU; partial results are merged by their
log-sum-exp.

* :func:`decode_ragged_triton` — every KV head has its own length (head-wise eviction leaves
  heads of different sizes; storage is padded, compute and reads stop at each head's length;
  length 0 gives output 0 / LSE ``-inf``).
* :func:`decode_quantized_triton` — K/V in the shared group-quantized layout of
  :mod:`ctxzip.kernels.quant` (2/4/8-bit codes unpacked and dequantized in registers) with an
  optional low-rank correction applied as two skinny products (GEAR), plus a full-precision
  tail of recent tokens handled by the ragged kernel and merged by LSE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import QuantizedTensor
from .reference import _check_lengths, _resolve_scale, check_qkv

__all__ = ["decode_ragged_triton", "decode_quantized_triton", "merge_partials"]


@triton.jit
def _decode_ragged_kernel(
    Q, K, V, LEN, OUT, LSE,
    s_qb, s_qh, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_lb, s_lh,
    s_ob, s_oh, s_os, s_od,
    s_eb, s_eh, s_es,
    Hkv, D, DV, G, scale, NSPLIT,
    FP32_DOT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    L = tl.load(LEN + b * s_lb + hk * s_lh)
    chunk = tl.cdiv(tl.cdiv(L, NSPLIT), BLOCK_N) * BLOCK_N
    t_lo = split * chunk
    t_hi = tl.minimum(L, t_lo + chunk)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_nb = tl.arange(0, BLOCK_N)
    heads = hk * G + offs_g
    q = tl.load(
        Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
        mask=(offs_g[:, None] < G) & (offs_d[None, :] < D), other=0.0,
    )
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for n0 in range(t_lo, t_hi, BLOCK_N):
        offs_n = n0 + offs_nb
        valid = offs_n < t_hi
        k = tl.load(
            K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
            mask=valid[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vn + offs_dv[None, :] * s_vd,
            mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0,
        )
        acc = acc * alpha[:, None]
        if FP32_DOT:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = m_fin + tl.log(l_i)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    gm = offs_g < G
    tl.store(
        OUT + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_dv[None, :] * s_od, out,
        mask=gm[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(LSE + b * s_eb + heads * s_eh + split * s_es, lse, mask=gm)


@triton.jit
def _decode_quant_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, KA, KB, VA, VB, OUT, LSE,
    s_qb, s_qh, s_qd,
    s_kcb, s_kch, s_kcn, s_kcc,
    s_ksb, s_ksh, s_ksn, s_ksd,
    s_vcb, s_vch, s_vcn, s_vcc,
    s_vsb, s_vsh, s_vsn, s_vsd,
    s_kab, s_kah, s_kan, s_kar,
    s_kbb, s_kbh, s_kbr, s_kbd,
    s_vab, s_vah, s_van, s_var,
    s_vbb, s_vbh, s_vbr, s_vbd,
    s_ob, s_oh, s_os, s_od,
    s_eb, s_eh, s_es,
    Hkv, T, D, G, R, scale, NSPLIT,
    BITS: tl.constexpr, K_GS: tl.constexpr, V_GS: tl.constexpr,
    K_LOWRANK: tl.constexpr, V_LOWRANK: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    QMASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    chunk = tl.cdiv(tl.cdiv(T, NSPLIT), BLOCK_N) * BLOCK_N
    t_lo = split * chunk
    t_hi = tl.minimum(T, t_lo + chunk)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_nb = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    heads = hk * G + offs_g
    q = tl.load(
        Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
        mask=(offs_g[:, None] < G) & dmask[None, :], other=0.0,
    )
    if K_LOWRANK:
        # qb[g, r] = q[g] . B_k[r]  (once per program)
        kb = tl.load(
            KB + b * s_kbb + hk * s_kbh + offs_r[:, None] * s_kbr + offs_d[None, :] * s_kbd,
            mask=(offs_r[:, None] < R) & dmask[None, :], other=0.0,
        ).to(tl.float32)
        qb = tl.sum(q.to(tl.float32)[:, None, :] * kb[None, :, :], axis=2)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    pa = tl.zeros([BLOCK_G, BLOCK_R], dtype=tl.float32)
    byte = offs_d // PER
    shift = (offs_d % PER) * BITS
    for n0 in range(t_lo, t_hi, BLOCK_N):
        offs_n = n0 + offs_nb
        valid = offs_n < t_hi
        tile = valid[:, None] & dmask[None, :]
        # keys: codes packed along channels; scale/zero per (token group, channel)
        kc = tl.load(
            KC + b * s_kcb + hk * s_kch + offs_n[:, None] * s_kcn + byte[None, :] * s_kcc,
            mask=tile, other=0,
        )
        kcode = ((kc >> shift[None, :]) & QMASK).to(tl.float32)
        kgrp = offs_n // K_GS
        ks = tl.load(KS + b * s_ksb + hk * s_ksh + kgrp[:, None] * s_ksn + offs_d[None, :] * s_ksd, mask=tile, other=0.0)
        kz = tl.load(KZ + b * s_ksb + hk * s_ksh + kgrp[:, None] * s_ksn + offs_d[None, :] * s_ksd, mask=tile, other=0.0)
        k = kcode * ks.to(tl.float32) + kz.to(tl.float32)
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        if K_LOWRANK:
            ka = tl.load(
                KA + b * s_kab + hk * s_kah + offs_n[:, None] * s_kan + offs_r[None, :] * s_kar,
                mask=valid[:, None] & (offs_r[None, :] < R), other=0.0,
            ).to(tl.float32)
            s += tl.sum(qb[:, None, :] * ka[None, :, :], axis=2)
        s = s * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # values: codes packed along channels; scale/zero per (token, channel group)
        vc = tl.load(
            VC + b * s_vcb + hk * s_vch + offs_n[:, None] * s_vcn + byte[None, :] * s_vcc,
            mask=tile, other=0,
        )
        vcode = ((vc >> shift[None, :]) & QMASK).to(tl.float32)
        vgrp = offs_d // V_GS
        vs = tl.load(VS + b * s_vsb + hk * s_vsh + offs_n[:, None] * s_vsn + vgrp[None, :] * s_vsd, mask=tile, other=0.0)
        vz = tl.load(VZ + b * s_vsb + hk * s_vsh + offs_n[:, None] * s_vsn + vgrp[None, :] * s_vsd, mask=tile, other=0.0)
        v = vcode * vs.to(tl.float32) + vz.to(tl.float32)
        acc = acc * alpha[:, None]
        if FP32_DOT:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
        if V_LOWRANK:
            va = tl.load(
                VA + b * s_vab + hk * s_vah + offs_n[:, None] * s_van + offs_r[None, :] * s_var,
                mask=valid[:, None] & (offs_r[None, :] < R), other=0.0,
            ).to(tl.float32)
            pa = pa * alpha[:, None] + tl.sum(p[:, :, None] * va[None, :, :], axis=1)
        m_i = m_new
    if V_LOWRANK:
        vb = tl.load(
            VB + b * s_vbb + hk * s_vbh + offs_r[:, None] * s_vbr + offs_d[None, :] * s_vbd,
            mask=(offs_r[:, None] < R) & dmask[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.sum(pa[:, :, None] * vb[None, :, :], axis=1)
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = m_fin + tl.log(l_i)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    gm = offs_g < G
    tl.store(
        OUT + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :] * s_od, out,
        mask=gm[:, None] & dmask[None, :],
    )
    tl.store(LSE + b * s_eb + heads * s_eh + split * s_es, lse, mask=gm)


def merge_partials(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split results: ``out`` ``[..., S, dv]`` (each normalised), ``lse`` ``[..., S]``."""
    tot = torch.logsumexp(lse, dim=-1)
    safe = torch.where(torch.isfinite(tot), tot, torch.zeros_like(tot))
    w = torch.exp(lse - safe.unsqueeze(-1))  # 0 for empty splits
    merged = (w.unsqueeze(-1) * out).sum(dim=-2)
    return merged, tot


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _default_splits(n_programs: int, n_tokens: int, block_n: int, device: torch.device) -> int:
    max_splits = max(1, triton.cdiv(max(n_tokens, 1), block_n))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_splits, triton.cdiv(2 * sms, max(n_programs, 1)), 64))


def _fp32(*ts) -> bool:
    return any(t.dtype == torch.float32 for t in ts)


def decode_ragged_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    block_n: int = 64,
    num_splits: int | None = None,
    num_warps: int = 4,
):
    """Decode over a ragged per-KV-head cache (see :func:`ctxzip.kernels.decode_ragged`)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, d] for decode, got {tuple(q.shape)}")
    B, Hq, Hkv, _, Tmax, d = check_qkv(q.unsqueeze(2), k, v)
    lengths = _check_lengths(lengths, B, Hkv, Tmax, k.device).to(torch.int32).contiguous()
    scale = _resolve_scale(scale, d)
    dv = v.shape[-1]
    G = Hq // Hkv
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    S = num_splits or _default_splits(B * Hkv, Tmax, block_n, q.device)
    part = torch.zeros(B, Hq, S, dv, dtype=torch.float32, device=q.device)
    plse = torch.full((B, Hq, S), float("-inf"), dtype=torch.float32, device=q.device)
    if B * Hkv > 0 and Tmax > 0:
        _decode_ragged_kernel[(B * Hkv, S)](
            q, k, v, lengths, part, plse,
            *q.stride(), *k.stride(), *v.stride(), *lengths.stride(), *part.stride(), *plse.stride(),
            Hkv, d, dv, G, scale, S,
            FP32_DOT=_fp32(q), BLOCK_G=_pow2(G), BLOCK_N=block_n, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
            num_warps=num_warps,
        )
    out, lse = merge_partials(part, plse)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def decode_quantized_triton(
    q: torch.Tensor,
    kq: QuantizedTensor,
    vq: QuantizedTensor,
    *,
    k_tail: torch.Tensor | None = None,
    v_tail: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_n: int = 64,
    num_splits: int | None = None,
    num_warps: int = 4,
):
    """Decode over a group-quantized K/V cache (see :func:`ctxzip.kernels.decode_quantized`)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, d] for decode, got {tuple(q.shape)}")
    if not isinstance(kq, QuantizedTensor) or not isinstance(vq, QuantizedTensor):
        raise TypeError("kq and vq must be ctxzip.kernels.quant.QuantizedTensor")
    if kq.axis != "channel" or vq.axis != "token":
        raise ValueError("keys must be quantized per channel (axis='channel'), values per token (axis='token')")
    if kq.bits != vq.bits:
        raise ValueError(f"keys and values must use the same bit width, got {kq.bits} and {vq.bits}")
    if kq.shape != vq.shape:
        raise ValueError(f"quantized K/V shapes differ: {kq.shape} vs {vq.shape}")
    if (k_tail is None) != (v_tail is None):
        raise ValueError("k_tail and v_tail must be given together")
    B, Hkv, T, d = kq.shape
    if q.shape[0] != B or q.shape[2] != d or q.shape[1] % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache [B, Hkv, T, d]={kq.shape}")
    Hq = q.shape[1]
    G = Hq // Hkv
    scale = _resolve_scale(scale, d)
    S = num_splits or _default_splits(B * Hkv, T, block_n, q.device)
    part = torch.zeros(B, Hq, S, d, dtype=torch.float32, device=q.device)
    plse = torch.full((B, Hq, S), float("-inf"), dtype=torch.float32, device=q.device)
    if B * Hkv > 0 and T > 0:
        dummy = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=q.device)
        ka, kb = (kq.lr_a, kq.lr_b) if kq.lr_a is not None else (dummy, dummy)
        va, vb = (vq.lr_a, vq.lr_b) if vq.lr_a is not None else (dummy, dummy)
        R = max(kq.rank, vq.rank, 1)
        _decode_quant_kernel[(B * Hkv, S)](
            q, kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero, ka, kb, va, vb, part, plse,
            *q.stride(),
            *kq.codes.stride(), *kq.scale.stride(),
            *vq.codes.stride(), *vq.scale.stride(),
            *ka.stride(), *kb.stride(), *va.stride(), *vb.stride(),
            *part.stride(), *plse.stride(),
            Hkv, T, d, G, R, scale, S,
            BITS=kq.bits, K_GS=kq.group_size, V_GS=vq.group_size,
            K_LOWRANK=kq.lr_a is not None, V_LOWRANK=vq.lr_a is not None, FP32_DOT=_fp32(q),
            BLOCK_G=_pow2(G), BLOCK_N=block_n, BLOCK_D=_pow2(d), BLOCK_R=_pow2(R, 1),
            num_warps=num_warps,
        )
    if k_tail is not None:
        Tr = k_tail.shape[2]
        if k_tail.shape[:2] != (B, Hkv) or k_tail.shape[-1] != d or v_tail.shape != k_tail.shape:
            raise ValueError("k_tail/v_tail must be [B, Hkv, Tr, d] matching the quantized cache")
        lens = torch.full((B, Hkv), Tr, dtype=torch.int32, device=q.device)
        t_out, t_lse = decode_ragged_triton(
            q, k_tail, v_tail, lens, scale=scale, return_lse=True, block_n=block_n, num_splits=1,
            num_warps=num_warps,
        )
        part = torch.cat([part, t_out.float().unsqueeze(2)], dim=2)
        plse = torch.cat([plse, t_lse.unsqueeze(2)], dim=2)
    out, lse = merge_partials(part, plse)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
