"""Triton kernels: fused attention forward with LSE, and per-key attention mass.

The forward kernel follows FlashAttention-2 as in the Triton fused-attention tutorial: one
program per ``(query block, batch x query head)``, an online softmax over key blocks with fp32
accumulators, GQA by pointing query head ``h`` at KV head ``h // G``, and the causal loop cut
at the last key a block can see (queries aligned to the end of the keys). It writes the row
log-sum-exp, which the attention-mass kernel reuses.

The attention-mass kernel is the transpose of the usual loop: one program per
``(key block, batch x KV head [x group member])``; it walks the query blocks of the window
(skipping those that cannot see the block under the causal mask) and all query heads of the
GQA group, recomputes ``p = exp(q·k * scale - lse)`` tile by tile and adds the column sums.
No ``Tq x Tk`` matrix is ever stored, and no atomics are needed.

Tile sizes are ``tl.constexpr`` parameters (``BLOCK_M``, ``BLOCK_N``; head dims padded to a
power of two >= 16 so ``tl.dot`` maps to tensor cores on Ampere/Hopper); there is no autotune
(Triton's interpreter, used for the CPU tests, does not support it). Masks: ``MASK_KIND`` 0 =
none, 1 = ``[B, Tk]`` key padding, 2 = 4-D boolean, 3 = 4-D additive (strides carry the
broadcast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import _resolve_scale, check_qkv

__all__ = ["attention_triton", "attention_mass_triton"]


@triton.jit
def _load_mask(
    mask_ptr, b, h, offs_m, offs_n, Tq, Tk,
    s_mb, s_mh, s_mq, s_mk,
    MASK_KIND: tl.constexpr,
):
    """Returns (allowed [BM, BN] bool, additive [BM, BN] fp32)."""
    in_k = offs_n[None, :] < Tk
    in_q = offs_m[:, None] < Tq
    if MASK_KIND == 1:
        km = tl.load(mask_ptr + b * s_mb + offs_n * s_mk, mask=offs_n < Tk, other=0)
        allowed = (km[None, :] != 0) & in_q
        add = tl.zeros(allowed.shape, dtype=tl.float32)
    elif MASK_KIND == 2:
        ptrs = mask_ptr + b * s_mb + h * s_mh + offs_m[:, None] * s_mq + offs_n[None, :] * s_mk
        mv = tl.load(ptrs, mask=in_q & in_k, other=0)
        allowed = mv != 0
        add = tl.zeros(allowed.shape, dtype=tl.float32)
    else:  # MASK_KIND == 3
        ptrs = mask_ptr + b * s_mb + h * s_mh + offs_m[:, None] * s_mq + offs_n[None, :] * s_mk
        add = tl.load(ptrs, mask=in_q & in_k, other=0.0).to(tl.float32)
        allowed = add > float("-inf")
    return allowed, add


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, MASK,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_lb, s_lh, s_lm,
    s_mb, s_mh, s_mq, s_mk,
    Hq, Tq, Tk, D, DV, G, scale,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, COMPUTE_OUT: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_nb = tl.arange(0, BLOCK_N)

    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    shift = Tk - Tq  # query i sits at absolute position i + shift
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + shift)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + offs_nb
        k_ptrs = K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
        k = tl.load(k_ptrs, mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < D), other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        allowed = (offs_n[None, :] < Tk) & (offs_m[:, None] < Tq)
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + shift)
        if MASK_KIND != 0:
            mallowed, madd = _load_mask(
                MASK, b, h, offs_m, offs_n, Tq, Tk, s_mb, s_mh, s_mq, s_mk, MASK_KIND
            )
            allowed = allowed & mallowed
            s = s + madd
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if COMPUTE_OUT:
            v_ptrs = V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vn + offs_dv[None, :] * s_vd
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < Tk) & (offs_dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None]
            if FP32_DOT:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = m_fin + tl.log(l_i)  # log(0) = -inf for rows that saw no key
    tl.store(LSE + b * s_lb + h * s_lh + offs_m * s_lm, lse, mask=offs_m < Tq)
    if COMPUTE_OUT:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptrs = OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :] * s_od
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < Tq) & (offs_dv[None, :] < DV))


@triton.jit
def _attn_mass_kernel(
    Q, K, LSE, OUT, MASK,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_lb, s_lh, s_lm,
    s_ob, s_oh, s_on,
    s_mb, s_mh, s_mq, s_mk,
    Hout, Tq, Tk, D, G, q_start, scale,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PER_HEAD: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hout
    ho = pid_bh % Hout
    if PER_HEAD:
        hk = ho // G
        h_first = ho
        n_heads = 1
    else:
        hk = ho
        h_first = ho * G
        n_heads = G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_mb = tl.arange(0, BLOCK_M)
    k_ptrs = K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
    k = tl.load(k_ptrs, mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < D), other=0.0)
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)

    shift = Tk - Tq
    lo = q_start
    if CAUSAL:
        # queries with position < first key of this block see none of it
        lo = tl.maximum(q_start, pid_n * BLOCK_N - shift)
        lo = q_start + ((lo - q_start) // BLOCK_M) * BLOCK_M
    for g in range(0, n_heads):
        h = h_first + g
        for m0 in range(lo, Tq, BLOCK_M):
            offs_m = m0 + offs_mb
            q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd
            q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)
            lse = tl.load(LSE + b * s_lb + h * s_lh + offs_m * s_lm, mask=offs_m < Tq, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            if FP32_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            allowed = (offs_n[None, :] < Tk) & (offs_m[:, None] < Tq)
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + shift)
            if MASK_KIND != 0:
                mallowed, madd = _load_mask(
                    MASK, b, h, offs_m, offs_n, Tq, Tk, s_mb, s_mh, s_mq, s_mk, MASK_KIND
                )
                allowed = allowed & mallowed
                s = s + madd
            p = tl.exp(s - lse[:, None])
            p = tl.where(allowed, p, 0.0)
            colsum += tl.sum(p, axis=0)
    tl.store(OUT + b * s_ob + ho * s_oh + offs_n * s_on, colsum, mask=offs_n < Tk)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _mask_args(attention_mask, B, Hq, Tq, Tk, device):
    """(tensor, strides, kind) for the kernels; strides are 0 on broadcast dims."""
    dummy = torch.zeros(1, dtype=torch.uint8, device=device)
    if attention_mask is None:
        return dummy, (0, 0, 0, 0), 0
    m = attention_mask
    if m.dim() == 2:
        if tuple(m.shape) != (B, Tk):
            raise ValueError(f"2-D attention_mask must be [B, Tk]=({B}, {Tk}), got {tuple(m.shape)}")
        m = m.to(device=device, dtype=torch.uint8).contiguous()
        return m, (m.stride(0), 0, 0, m.stride(1)), 1
    if m.dim() != 4:
        raise ValueError(f"attention_mask must be [B, Tk] or [B|1, H|1, Tq, Tk], got {tuple(m.shape)}")
    mb, mh, mq, mk = m.shape
    if mb not in (1, B) or mh not in (1, Hq) or mq != Tq or mk != Tk:
        raise ValueError(
            f"4-D attention_mask must be [B|1, Hq|1, Tq, Tk]=({B}, {Hq}, {Tq}, {Tk}), got {tuple(m.shape)}"
        )
    if m.dtype == torch.bool:
        m, kind = m.to(torch.uint8), 2
    elif m.is_floating_point():
        m, kind = m.float(), 3
    else:
        raise TypeError("a non-boolean 4-D attention_mask must be a float additive mask")
    st = [m.stride(i) if m.shape[i] > 1 else 0 for i in range(4)]
    return m, tuple(st), kind


def _prep(q, k, v, causal, scale, attention_mask):
    B, Hq, Hkv, Tq, Tk, d = check_qkv(q, k, v)
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries aligned to the end); got {Tq} > {Tk}")
    return B, Hq, Hkv, Tq, Tk, d, _resolve_scale(scale, d)


def _fp32_dot(*ts) -> bool:
    return any(t is not None and t.dtype == torch.float32 for t in ts)


def _lse_and_out(q, k, v, *, causal, scale, attention_mask, compute_out, block_m, block_n, num_warps):
    B, Hq, Hkv, Tq, Tk, d, scale = _prep(q, k, v, causal, scale, attention_mask)
    dv = v.shape[-1] if v is not None else d
    G = Hq // Hkv
    lse = torch.full((B, Hq, Tq), float("-inf"), dtype=torch.float32, device=q.device)
    out = torch.zeros(B, Hq, Tq, dv, dtype=q.dtype, device=q.device) if compute_out else lse
    if Tq == 0 or Tk == 0 or B == 0:
        return out, lse
    mask, ms, kind = _mask_args(attention_mask, B, Hq, Tq, Tk, q.device)
    vv = v if v is not None else k
    if v is not None and v.dtype != k.dtype:
        vv = v.to(k.dtype)
    grid = (triton.cdiv(Tq, block_m), B * Hq)
    os_ = out.stride() if compute_out else (0, 0, 0, 0)
    _attn_fwd_kernel[grid](
        q, k, vv, out, lse, mask,
        *q.stride(), *k.stride(), *vv.stride(), *os_, *lse.stride(), *ms,
        Hq, Tq, Tk, d, dv, G, scale,
        CAUSAL=bool(causal), MASK_KIND=kind, COMPUTE_OUT=compute_out,
        FP32_DOT=_fp32_dot(q, k, v),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
        num_warps=num_warps,
    )
    return out, lse


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
):
    """Fused attention forward (see :func:`ctxzip.kernels.attention`)."""
    if q.dtype != k.dtype:
        k = k.to(q.dtype)
    out, lse = _lse_and_out(
        q, k, v.to(q.dtype), causal=causal, scale=scale, attention_mask=attention_mask,
        compute_out=True, block_m=block_m, block_n=block_n, num_warps=num_warps,
    )
    return (out, lse) if return_lse else out


def attention_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    gqa: str = "sum",
    attention_mask: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """Per-key attention mass in two passes (LSE, then column sums); see :func:`ctxzip.kernels.attention_mass`."""
    B, Hq, Hkv, Tq, Tk, d, scale = _prep(q, k, None, causal, scale, attention_mask)
    if gqa not in ("sum", "mean", "per_head"):
        raise ValueError(f"gqa must be one of ('sum', 'mean', 'per_head'), got {gqa!r}")
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 0):
        raise ValueError(f"window must be a non-negative int or None, got {window!r}")
    if lse is not None and tuple(lse.shape) != (B, Hq, Tq):
        raise ValueError(f"lse must be [B, Hq, Tq]=({B}, {Hq}, {Tq}), got {tuple(lse.shape)}")
    if q.dtype != k.dtype:
        k = k.to(q.dtype)
    G = Hq // Hkv
    per_head = gqa == "per_head"
    Hout = Hq if per_head else Hkv
    out = torch.zeros(B, Hout, Tk, dtype=torch.float32, device=q.device)
    start = 0 if window is None else max(0, Tq - int(window))
    if Tk == 0 or start >= Tq or B == 0:
        return out
    if lse is None:
        # pass 1: row log-sum-exp of the window's queries only
        qw = q[:, :, start:]
        mask_w = attention_mask
        if attention_mask is not None and attention_mask.dim() == 4:
            mask_w = attention_mask[:, :, start:]
        _, lse_w = _lse_and_out(
            qw, k, None, causal=causal, scale=scale, attention_mask=mask_w, compute_out=False,
            block_m=block_m, block_n=block_n, num_warps=num_warps,
        )
        lse = torch.full((B, Hq, Tq), float("-inf"), dtype=torch.float32, device=q.device)
        lse[:, :, start:] = lse_w
    lse = lse.float()
    mask, ms, kind = _mask_args(attention_mask, B, Hq, Tq, Tk, q.device)
    grid = (triton.cdiv(Tk, block_n), B * Hout)
    _attn_mass_kernel[grid](
        q, k, lse, out, mask,
        *q.stride(), *k.stride(), *lse.stride(), *out.stride(), *ms,
        Hout, Tq, Tk, d, G, start, scale,
        CAUSAL=bool(causal), MASK_KIND=kind, PER_HEAD=per_head, FP32_DOT=_fp32_dot(q, k),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(d),
        num_warps=num_warps,
    )
    return out / G if gqa == "mean" else out
