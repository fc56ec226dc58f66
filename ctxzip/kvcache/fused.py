"""Prefill attention that also returns each key's attention mass, in one pass.

H2O, observed attention and EMS rank keys by the attention they receive from *all* prefill
queries (column sums of the causal softmax matrix). Recomputing that next to the model's SDPA
call costs a second full ``Q Kᵀ`` pass plus the query projections (H2O measured 1.73x the
prefill time of no press at 4k tokens). Instead, while such a press is active, the prefill's
attention itself runs through :func:`attention_with_mass`: the probabilities of each query block
are computed once, multiplied by ``V`` for the layer output and summed over the block's queries
for the mass. Memory stays ``O(block x T)`` (two reused score buffers); outputs equal SDPA's up
to fp32 rounding (tested), and the mass equals :func:`ctxzip.kernels.attention_mass` (tested).

Why not ``ctxzip.kernels.attention_and_mass``: the reference there is the general,
arbitrary-mask ground truth (several elementwise passes and fresh allocations per block); this
is the one case a prefill needs (queries = keys, causal or a boolean mask), with the scale folded
into the queries, one fused softmax per block, preallocated buffers (large fresh tensors cost a
page fault per 4 KB on CPU) and the column sums as a matrix product.
"""

from __future__ import annotations

import torch

__all__ = ["attention_with_mass", "prefill_block_size"]

_MAX_BLOCK_ELEMS = 1 << 23  # per score buffer (32 MB in fp32)


def prefill_block_size(batch: int, q_heads: int, seq_len: int) -> int:
    """Query rows per block: 32 up to ~1.5k tokens, 64 beyond (measured fastest on CPU at
    1k / 2k / 4k tokens), capped so one score buffer holds at most 2**23 floats."""
    bq = 32 if seq_len <= 1536 else 64
    cap = max(1, _MAX_BLOCK_ELEMS // max(1, batch * q_heads * seq_len))
    return max(1, min(bq, cap, seq_len))


def attention_with_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    query_weights: torch.Tensor | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal self-attention of a prefill and the attention mass every key receives.

    Args:
        query: ``[B, Hq, T, d]`` (post-RoPE).
        key / value: ``[B, Hkv, T, d]`` / ``[B, Hkv, T, dv]``, ``Hq`` a multiple of ``Hkv``
            (grouped-query attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``).
        scale: softmax scale.
        attention_mask: ``None`` (plain causal) or a boolean ``[B|1, 1|Hq, T, T]`` mask
            (``True`` = may attend) that already contains the causal pattern, as transformers'
            SDPA mask builder produces with padding. Rows that see no key give 0.
        query_weights: optional ``[B, T]`` weight of each query row in the mass (e.g. 0 for
            padding queries); default 1.
        block: query rows per block (default :func:`prefill_block_size`).

    Returns:
        ``out`` ``[B, Hq, T, dv]`` in the query dtype and ``mass`` fp32 ``[B, Hq, T]``: for every
        query head, the sum over (weighted) queries of the softmax probabilities of each key.
    """
    b, hq, t, d = query.shape
    bk, hkv, tk, dk = key.shape
    if bk != b or dk != d or tk != t or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"prefill attention needs q [B, Hq, T, d], k/v [B, Hkv, T, d] with the same T; got "
            f"q{tuple(query.shape)} k{tuple(key.shape)} v{tuple(value.shape)}"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    g = hq // hkv
    dv = value.shape[-1]
    dev = query.device
    mass = torch.zeros(b, hkv, g, 1, t, dtype=torch.float32, device=dev)
    out = torch.empty(b, hkv, g, t, dv, dtype=query.dtype, device=dev)
    if t == 0:
        return out.view(b, hq, t, dv), mass.view(b, hq, t)
    bq = block or prefill_block_size(b, hq, t)
    qs = (query.float() * scale).view(b, hkv, g, t, d)
    kt = key.float().transpose(-1, -2)
    vf = value.float()
    mask = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
            raise ValueError("attention_mask must be a boolean [B|1, 1|Hq, T, T] mask")
        mb, mh = attention_mask.shape[:2]
        mask = attention_mask.view(mb, hkv, g, t, -1) if mh == hq and hq > 1 else attention_mask.view(mb, 1, 1, t, -1)
    w_all = None
    if query_weights is not None:
        w_all = query_weights.to(device=dev, dtype=torch.float32).view(b, 1, 1, 1, t)
    n_buf = b * hkv * g * bq * t
    s_buf = torch.empty(n_buf, dtype=torch.float32, device=dev)
    p_buf = torch.empty(n_buf, dtype=torch.float32, device=dev)
    tri = torch.ones(bq, bq, dtype=torch.bool, device=dev).triu_(1)
    ones = torch.ones(1, 1, 1, 1, bq, dtype=torch.float32, device=dev)
    for q0 in range(0, t, bq):
        q1 = min(t, q0 + bq)
        w, n = q1 - q0, q1  # a causal block sees keys 0 .. q1-1
        qb = qs[:, :, :, q0:q1].reshape(b, hkv, g * w, d)
        s = s_buf[: b * hkv * g * w * n].view(b, hkv, g * w, n)
        torch.matmul(qb, kt[..., :n], out=s)
        s5 = s.view(b, hkv, g, w, n)
        if mask is None:
            s5[..., n - w :].masked_fill_(tri[:w, :w], float("-inf"))
        else:
            s5.masked_fill_(~mask[..., q0:q1, :n], float("-inf"))
        p5 = p_buf[: b * hkv * g * w * n].view(b, hkv, g, w, n)
        torch.ops.aten._softmax.out(s5, -1, False, out=p5)
        if mask is not None:
            p5.nan_to_num_(0.0)  # rows with no visible key
        o = torch.matmul(p5.view(b, hkv, g * w, n), vf[:, :, :n])
        out[:, :, :, q0:q1] = o.view(b, hkv, g, w, dv).to(out.dtype)
        wq = ones[..., :w] if w_all is None else w_all[..., q0:q1]
        mass[..., :n] += torch.matmul(wq, p5)
    return out.view(b, hq, t, dv), mass.view(b, hq, t)
