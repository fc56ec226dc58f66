"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764; code pkunlp-icler/FastV).

Inside the LLM: after decoder layer ``K`` (1-based; the reference takes layer ``K-1``'s
attention when it reaches layer index ``K``), rank the image tokens by the attention the **last
prompt token** pays them in that layer, averaged over heads, keep the top tokens of every image
and drop the rest from all later layers. Position ids keep their original values (the reference
keeps them too). The paper's main setting is ``K=2, R=50%``; with a :class:`~ctxzip.budget.Budget`
the kept count per image is ``budget.resolve(N_img)``.

Differences from the reference, on purpose: the reference indexes batch row 0 and assumes one
image at ``[sys_len, sys_len + 576)``; here every row and every image is handled (padding keys
are excluded from the softmax), the score is computed with
:func:`ctxzip.kernels.attention_mass` from the layer's queries/keys captured by hooks (no eager
attention), and the pruned tokens are really removed (the reference's mask variant gives no
speed-up). With a KV cache the selection is made once at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxzip.budget import Budget, topk_indices

from .base import VisualTokenMethod, register_method

__all__ = ["FastV"]


@register_method
@dataclass
class FastV(VisualTokenMethod):
    """FastV hyperparameters.

    Args:
        k: prune after this many decoder layers (``K`` in the paper, >= 1); the attention of
            layer ``K`` (1-based) scores the image tokens and layers ``K+1..`` see only the kept
            ones.
    """

    k: int = 2

    name = "fastv"
    stage = "llm"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"FastV k (layers before pruning) must be an integer >= 1, got {self.k!r}")

    def select(self, scores: torch.Tensor, spans: list[tuple[int, int]], budget: Budget) -> torch.Tensor:
        """Boolean keep mask over one row (``scores`` [L]): every non-image position plus the
        top ``budget.resolve(n)`` positions of each image span ``(start, n)``."""
        keep = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        for start, n in spans:
            kk = budget.resolve(n)
            if kk >= n:
                continue
            keep[start:start + n] = False
            idx = topk_indices(scores[start:start + n].float(), kk)
            keep[start + idx] = True
        return keep
