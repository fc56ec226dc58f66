"""What every visual-token method sees and returns, and the method registry.

A visual-token method works on one *image* at a time. An image is one or more *views* (LLaVA-1.5:
one; LLaVA-NeXT AnyRes: the thumbnail plus the crops; Qwen2-VL: one view of merged tokens). For
every view the model wrapper captures, from the vision tower:

* ``feats``   - the tokens' features that will be projected into the LLM (pre-projector CLIP
  features at the LLaVA feature layer, or Qwen2-VL's merged tokens, already in LLM space);
* ``scores``  - [CLS]->patch attention of the method's scoring layer (summed over heads), or,
  for towers without a [CLS] token (Qwen2-VL), the attention mass each token receives from all
  tokens (:func:`ctxzip.kernels.attention_mass`);
* ``keys``    - the scoring layer's keys (averaged over heads, or the full key vector);
* ``cls_feat`` - the [CLS] feature at the feature layer (``None`` when the tower has none);
* ``valid``   - tokens that reach the LLM (AnyRes unpadding removes some crop tokens).

A method returns, per view, the features it keeps or merges (``feats``, in the same space as the
input) and for each output token the patch it stands at (``src``; ``-1`` for the [CLS] token),
which the wrapper uses to order tokens and to pick position ids. Returning ``None`` means
"keep the image unchanged" (the budget covers every token), which makes keep-all exactly the
identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ctxzip.budget import Budget, allocate

__all__ = [
    "ViewTokens",
    "ViewResult",
    "ImageTokens",
    "VisualTokenMethod",
    "METHODS",
    "register_method",
    "get_method",
]


@dataclass
class ViewTokens:
    """One view of an image as the method sees it (see the module docstring)."""

    feats: torch.Tensor  # [N, D]
    scores: torch.Tensor  # [N] float32
    keys: torch.Tensor  # [N, Dk]
    grid: tuple[int, int]  # (rows, cols) of the N tokens in raster order
    cls_feat: torch.Tensor | None = None  # [D]
    valid: torch.Tensor | None = None  # [N] bool; None = all valid
    cls_attn_to_cls: float | None = None  # attention the [CLS] query gives itself (PruMerge)

    @property
    def n(self) -> int:
        return int(self.feats.shape[0])

    def valid_mask(self) -> torch.Tensor:
        if self.valid is None:
            return torch.ones(self.n, dtype=torch.bool, device=self.feats.device)
        return self.valid

    @property
    def n_valid(self) -> int:
        return self.n if self.valid is None else int(self.valid.sum())


@dataclass
class ViewResult:
    """Tokens a method emits for one view: ``feats`` [k, D] and their anchor patch ``src`` [k]
    (``-1`` = the [CLS] token). ``order="method"`` keeps the method's order; the wrapper sorts
    multi-view (AnyRes crop) outputs into spatial order."""

    feats: torch.Tensor
    src: torch.Tensor


@dataclass
class ImageTokens:
    """All views of one image. ``base`` is the index of the thumbnail view for AnyRes images
    (``None`` for single-view images); ``crop_grid`` is (rows, cols) of the crops in the canvas
    and ``crop_views`` the view indices in raster order."""

    views: list[ViewTokens]
    base: int | None = None
    crop_grid: tuple[int, int] | None = None
    crop_views: list[int] = field(default_factory=list)

    @property
    def n_valid(self) -> int:
        return sum(v.n_valid for v in self.views)


def keep_all(view: ViewTokens) -> ViewResult:
    """Every valid token of ``view`` unchanged (used for views a budget leaves whole)."""
    idx = torch.nonzero(view.valid_mask(), as_tuple=False).flatten()
    return ViewResult(view.feats[idx], idx)


def masked_scores(view: ViewTokens) -> torch.Tensor:
    """``view.scores`` in fp32 with invalid tokens at -inf (so top-k never picks them)."""
    s = view.scores.float()
    if view.valid is not None:
        s = s.masked_fill(~view.valid, float("-inf"))
    return s


class VisualTokenMethod:
    """Base class of the visual-token methods (subclasses are dataclasses of hyperparameters).

    Class attributes tell the wrapper what to capture:

    * ``stage``: ``"vision"`` (applied to the vision features before the LLM) or ``"llm"``
      (applied inside the LLM, FastV);
    * ``score_layer``: vision-tower layer whose attention / keys score tokens (python index into
      the encoder's layer list; ``-2`` is the LLaVA feature layer);
    * ``score_kind``: ``"heads"`` ([CLS] attention per head, summed) or ``"single"`` (one head
      over the full q/k projections, as LLaVA-PruMerge computes it);
    * ``key_kind``: ``"mean"`` (keys averaged over heads) or ``"full"`` (the k_proj output);
    * ``head_reduce``: ``"sum"`` or ``"mean"`` of the per-head [CLS] attention.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "vision"
    score_kind: ClassVar[str] = "heads"
    key_kind: ClassVar[str] = "mean"
    head_reduce: ClassVar[str] = "sum"

    @property
    def score_layer(self) -> int:
        return -2

    # ------------------------------------------------------------------ per image
    def compress_image(self, image: ImageTokens, budget: Budget) -> list[ViewResult] | None:
        """Compress one image under ``budget`` (visual tokens kept per image).

        Default: resolve the budget over the image's valid tokens, split it over views in
        proportion to their sizes (:func:`ctxzip.budget.allocate`) and compress each view.
        """
        n = image.n_valid
        total = budget.resolve(n)
        if total >= n:
            return None
        sizes = [v.n_valid for v in image.views]
        per_view = self.allocate_views(image, total, sizes)
        return [
            keep_all(v) if int(k) >= v.n_valid else self.compress_view(v, int(k))
            for v, k in zip(image.views, per_view)
        ]

    def allocate_views(self, image: ImageTokens, total: int, sizes: list[int]) -> Any:
        """Tokens per view; proportional to view size unless a method overrides it."""
        return allocate(total, sizes, method="proportional")

    def compress_view(self, view: ViewTokens, k: int) -> ViewResult:  # pragma: no cover
        raise NotImplementedError


METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` available to :func:`ctxzip.vision.prune` by ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def get_method(method: str | VisualTokenMethod, **params: Any) -> VisualTokenMethod:
    """A method instance from its name (plus hyperparameters) or an instance itself."""
    if isinstance(method, VisualTokenMethod):
        if params:
            raise ValueError("pass hyperparameters either to the method instance or here, not both")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a VisualTokenMethod, got {type(method).__name__}")
    key = method.strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown visual-token method {method!r}; choose from {sorted(METHODS)}")
    try:
        return METHODS[key](**params)
    except TypeError as e:
        raise ValueError(f"bad hyperparameters for {key}: {e}") from None
