"""Attention scores for visual tokens, computed with :func:`ctxzip.kernels.attention_mass`.

The wrappers capture a layer's queries and keys with forward hooks (the layer itself keeps
running under SDPA / flash attention, so no eager attention matrix is ever materialised for the
whole layer); these helpers turn them into per-token scores.
"""

from __future__ import annotations

import torch

from ctxzip.kernels import attention_mass

__all__ = ["cls_attention", "received_attention", "last_token_attention"]


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """[CLS] -> token attention probabilities, summed over heads.

    ``q_cls``: ``[B, H, 1, d]`` query of the [CLS] token; ``k``: ``[B, H, T, d]`` keys of all
    tokens (CLS first). Returns fp32 ``[B, T]`` (the CLS column included). With ``H = 1`` and the
    full projections this is LLaVA-PruMerge's single-head score.
    """
    mass = attention_mass(q_cls, k, causal=False, gqa="per_head", scale=scale)  # [B, H, T]
    return mass.sum(dim=1)


def received_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean attention each key receives from all queries (non-causal), summed over heads.

    ``q``/``k``: ``[B, H, T, d]``. Returns fp32 ``[B, T]``; used where the tower has no [CLS]
    token (Qwen2-VL).
    """
    T = q.shape[-2]
    mass = attention_mass(q, k, causal=False, gqa="per_head")
    return mass.sum(dim=1) / max(T, 1)


def last_token_attention(
    q_last: torch.Tensor, k: torch.Tensor, key_padding: torch.Tensor | None = None
) -> torch.Tensor:
    """FastV's score: attention of the last query to every key, averaged over query heads.

    ``q_last``: ``[B, Hq, 1, d]`` (after RoPE); ``k``: ``[B, Hkv, T, d]`` (after RoPE, GQA allowed);
    ``key_padding``: ``[B, T]`` true for real tokens. Returns fp32 ``[B, T]``.
    """
    Hq = q_last.shape[1]
    mass = attention_mass(q_last, k, causal=False, gqa="sum", attention_mask=key_padding)
    return mass.sum(dim=1) / Hq
