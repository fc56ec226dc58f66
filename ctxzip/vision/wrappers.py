"""``prune(model, method, budget)``: visual-token pruning for Hugging Face VLMs, by hooks.

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration``
(LLaVA-NeXT AnyRes), ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.
The model's own ``forward`` runs unchanged (same vision tower, projector, AnyRes packing and
M-RoPE code); forward hooks (the pattern of ModelTC/llmc's token-reduction modules, without
replacing any model method) do four things:

1. capture what the method scores with from the vision tower (queries/keys of one layer, turned
   into scores by :func:`ctxzip.kernels.attention_mass`; the feature-layer hidden states), so the
   tower keeps running under SDPA;
2. just before the language model runs, rebuild its inputs with fewer image tokens
   (vision-stage methods) - batch rows are left-padded to a common length and the 2-D attention
   mask, position ids (contiguous for LLaVA, the unpruned M-RoPE ids gathered for Qwen2-VL) are
   rebuilt to match - or, for FastV, drop image tokens between decoder layers ``K`` and ``K+1``;
3. leave the pruning state on the KV cache object, so every later decode step (``generate``)
   translates the full-length 2-D attention mask and position ids it gets to the pruned cache;
4. record per-image token counts (``model.ctxzip_vision.last_stats``) and hook time.

The returned logits cover the kept positions only (the last position is always a text token, so
``generate`` is unaffected). A budget that keeps every token leaves the inputs untouched, so the
logits are identical to the unwrapped model's.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ctxzip._hf_compat import cache_from_kwargs, cache_from_output
from ctxzip.budget import Budget

from .base import ImageTokens, ViewResult, ViewTokens, VisualTokenMethod, get_method
from .scores import cls_attention, last_token_attention, received_attention

__all__ = ["prune", "unprune", "VisionPruner", "supported_family"]

_STATE_ATTR = "_ctxzip_vision_state"


def supported_family(model: Any) -> str:
    """``"llava"``, ``"llava_next"`` or ``"qwen2_vl"`` for a supported model, else ``TypeError``."""
    name = type(model).__name__
    if name == "LlavaForConditionalGeneration":
        return "llava"
    if name == "LlavaNextForConditionalGeneration":
        return "llava_next"
    if name in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
        return "qwen2_vl"
    raise TypeError(
        f"ctxzip.vision.prune supports LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
        f"Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration, got {name}"
    )


# ---------------------------------------------------------------------------------- state
@dataclass
class _SeqState:
    """Vision-stage pruning: the cache holds ``mask2d.shape[1]`` prefill entries per row."""

    orig_len: int
    mask2d: torch.Tensor  # [B, Lp] long
    removed: torch.Tensor  # [B] tokens removed from each row
    contiguous: bool


@dataclass
class _FastVState:
    """FastV: layers >= K hold the prefill entries ``keep_idx`` (original positions)."""

    orig_len: int
    keep_idx: torch.Tensor  # [B, Lp]
    valid: torch.Tensor  # [B, Lp]


@dataclass
class _Layout:
    """Where the tokens of one image sit inside its placeholder span."""

    n_slots: int
    slot_of: list[torch.Tensor]  # per view: [N] slot of each patch (-1: not in the sequence)
    fixed_slots: torch.Tensor  # slots always kept unchanged (LLaVA-NeXT image_newline)
    spatial_views: list[int] = field(default_factory=list)  # views re-sorted by slot


# ---------------------------------------------------------------------------------- helpers
def _get(args: tuple, kwargs: dict, name: str, pos: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, H*d] -> [B, H, T, d]."""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, -1).transpose(1, 2)


def _gather_seq(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather along sequence ``dim`` with a per-row index [B, Lp]; batch is the dim before it
    (leading dims broadcast, e.g. M-RoPE's [3, B, L] ids or cos/sin [B, L, d])."""
    dim = dim % x.dim()
    bdim = dim - 1
    B = idx.shape[0]
    if x.shape[bdim] == 1 and B > 1:
        x = x.expand(*x.shape[:bdim], B, *x.shape[bdim + 1:])
    shape = [1] * x.dim()
    shape[bdim], shape[dim] = B, idx.shape[1]
    ix = idx.view(shape).expand(*x.shape[:dim], idx.shape[1], *x.shape[dim + 1:])
    return torch.gather(x, dim, ix)


def _float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return m.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class VisionPruner:
    """The hooks :func:`prune` installs on one model (available as ``model.ctxzip_vision``).

    Attributes:
        method: the :class:`~ctxzip.vision.base.VisualTokenMethod` instance.
        budget: the :class:`~ctxzip.budget.Budget` (visual tokens kept per image) or ``None``
            (adaptive methods only).
        last_stats: per image of the last prefill, ``(tokens_before, tokens_after)``, counting
            visual tokens (LLaVA-NeXT's ``image_newline`` tokens, always kept, are not counted).
        hook_seconds: process CPU time spent inside the hooks (the wrapper's own overhead; CPU
            time rather than wall time so that a loaded machine does not inflate it).
    """

    def __init__(self, model: Any, method: VisualTokenMethod, budget: Budget | None, positions: str | None):
        self.model = model
        self.family = supported_family(model)
        self.method = method
        self.budget = budget
        if positions is None:
            positions = "original" if self.family == "qwen2_vl" else "contiguous"
        if positions not in ("contiguous", "original"):
            raise ValueError(f"positions must be 'contiguous' or 'original', got {positions!r}")
        self.contiguous = positions == "contiguous" and method.stage == "vision"
        self.image_token_id = int(model.config.image_token_id)
        self.lm = model.model.language_model
        self.last_stats: list[tuple[int, int]] = []
        self.hook_seconds = 0.0
        self._s: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._install()

    # ------------------------------------------------------------------ install / remove
    def _install(self) -> None:
        h = self._handles
        self._vision: dict[str, Any] = {}
        base = self.model.model
        orig = base.get_image_features
        sig = inspect.signature(orig)

        @functools.wraps(orig)  # generate() inspects the signature
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            # generate() encodes images before the first forward (mm_encoder_outputs); mark a fresh
            # capture and record the geometry the hooks cannot see (AnyRes image_sizes)
            bound = sig.bind_partial(*args, **kwargs).arguments
            self._vision = {"fresh": True, "image_sizes": bound.get("image_sizes")}
            out = orig(*args, **kwargs)
            self._vision["output"] = out  # generate() may hand this back on every uncached step
            return out

        base.get_image_features = get_image_features
        self._restore = (base, orig)
        h.append(self.model.register_forward_pre_hook(self._on_top, with_kwargs=True))
        h.append(self.lm.register_forward_pre_hook(self._on_lm_pre, with_kwargs=True))
        h.append(self.lm.register_forward_hook(self._on_lm_post, with_kwargs=True))
        if self.method.stage == "llm":
            layers = self.lm.layers
            K = self.method.k  # type: ignore[attr-defined]
            if len(layers) <= K:
                raise ValueError(f"FastV k={K} must be smaller than the number of LLM layers ({len(layers)})")
            attn = layers[K - 1].self_attn
            if not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj"):
                raise TypeError(f"FastV needs separate q_proj/k_proj in the attention ({type(attn).__name__})")
            self._fastv_attn = attn
            h.append(attn.q_proj.register_forward_hook(self._stash("lq")))
            h.append(attn.k_proj.register_forward_hook(self._stash("lk")))
            for j in range(K, len(layers)):
                h.append(layers[j].register_forward_pre_hook(self._make_fastv_layer_hook(j == K), with_kwargs=True))
        elif self.family in ("llava", "llava_next"):
            self._install_clip()
        else:
            self._install_qwen()

    def remove(self) -> None:
        """Remove every hook (the model is then exactly the unwrapped model again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        base, _ = self._restore
        if "get_image_features" in base.__dict__:
            del base.get_image_features  # back to the class method
        if getattr(self.model, "ctxzip_vision", None) is self:
            del self.model.ctxzip_vision

    # ------------------------------------------------------------------ top-level capture
    def _on_top(self, module: Any, args: tuple, kwargs: dict) -> None:
        t0 = time.process_time()
        mm = kwargs.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None and mm["image"] is self._vision.get("output"):
            self._vision["fresh"] = True  # the captured run is the one these features come from
        self._s = {
            "input_ids": _get(args, kwargs, "input_ids", 0),
            "videos": kwargs.get("pixel_values_videos") is not None
            or bool((kwargs.get("mm_encoder_outputs") or {}).get("video")),
        }
        if kwargs.get("labels") is not None and self.budget is not None:
            self._s["labels"] = True
        self.hook_seconds += time.process_time() - t0

    # ------------------------------------------------------------------ CLIP capture
    def _install_clip(self) -> None:
        cfg = self.model.config
        fl = cfg.vision_feature_layer
        if not isinstance(fl, int):
            raise ValueError("ctxzip.vision supports a single vision_feature_layer (int), as LLaVA-1.5/NeXT use")
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError("ctxzip.vision supports vision_feature_select_strategy='default' (CLS dropped)")
        layers = self._clip_encoder_layers()
        n = len(layers)
        if fl == 0 or not -n <= fl <= n:
            raise ValueError(f"vision_feature_layer {fl} is not a transformer layer output")
        feat_layer = layers[fl] if fl < 0 else layers[fl - 1]
        sl = self.method.score_layer
        if not -n <= sl < n:
            raise ValueError(f"score layer {sl} out of range for a {n}-layer vision tower")
        attn = layers[sl].self_attn
        self._clip_attn = attn
        self._handles.append(attn.q_proj.register_forward_hook(self._stash("q")))
        self._handles.append(attn.k_proj.register_forward_hook(self._stash("k")))
        self._handles.append(feat_layer.register_forward_hook(self._on_clip_feat))

    def _clip_encoder_layers(self) -> Any:
        vt = self.model.model.vision_tower
        enc = vt.vision_model.encoder if hasattr(vt, "vision_model") else vt.encoder
        return enc.layers

    def _stash(self, key: str):
        """Forward hook keeping a projection's output (no recomputation)."""

        def hook(module: Any, args: tuple, output: Any) -> None:
            if key in ("lq", "lk"):  # FastV: only while a prefill with images runs
                if self._s.get("fastv", {}).get("mode") == "prefill":
                    self._s[key] = output.detach()
            else:
                self._vision[key] = output.detach()

        return hook

    def _clip_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] attention [B, T] and keys [B, T, .] of the score layer, from the stashed q/k."""
        t0 = time.process_time()
        v = self._vision
        module = self._clip_attn
        qf, kf = v["q"], v["k"]
        with torch.no_grad():
            if self.method.score_kind == "single":
                scores = cls_attention(qf[:, None, :1], kf[:, None], scale=qf.shape[-1] ** -0.5)
                keys = kf
            else:
                H = module.num_heads if hasattr(module, "num_heads") else module.config.num_attention_heads
                q, k = _heads(qf[:, :1], H), _heads(kf, H)
                scores = cls_attention(q, k, scale=module.scale)
                if self.method.head_reduce == "mean":
                    scores = scores / H
                keys = kf if self.method.key_kind == "full" else k.mean(dim=1)
        self.hook_seconds += time.process_time() - t0
        return scores, keys

    def _on_clip_feat(self, module: Any, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self._vision["hidden"] = out.detach()

    def _clip_views(self) -> tuple[list[ImageTokens], list[_Layout]]:
        v = self._vision
        if "hidden" not in v or "k" not in v:
            raise RuntimeError("vision tower hooks did not fire; was pixel_values given?")
        hidden = v["hidden"]
        scores, keys = self._clip_scores()
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        N = side * side

        def view(i: int, valid: torch.Tensor | None = None) -> ViewTokens:
            return ViewTokens(
                feats=hidden[i, 1:], scores=scores[i, 1:], keys=keys[i, 1:], grid=(side, side),
                cls_feat=hidden[i, 0], valid=valid, cls_attn_to_cls=float(scores[i, 0]),
            )

        images, layouts = [], []
        if self.family == "llava":
            for i in range(hidden.shape[0]):
                images.append(ImageTokens([view(i)]))
                layouts.append(_Layout(N, [torch.arange(N, device=hidden.device)], hidden.new_zeros(0, dtype=torch.long)))
            return images, layouts

        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        cfg = self.model.config
        sizes = self._vision.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT pruning needs image_sizes")
        counts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, vc.image_size) for s in sizes]
        feats, first = [], 0
        for c in counts:
            ids = torch.arange(first, first + c * N, dtype=torch.float32).view(c, N, 1) - first
            feats.append(ids)
            first += c * N
        packed, _ = self.model.model.pack_image_features(
            feats, sizes, "default", image_newline=torch.full((1,), -1.0)
        )
        first = 0
        for c, size, pk in zip(counts, sizes, packed):
            code = pk[:, 0].round().long()
            slot_of = []
            for vi in range(c):
                s = torch.full((N,), -1, dtype=torch.long)
                m = (code >= vi * N) & (code < (vi + 1) * N)
                s[code[m] - vi * N] = torch.nonzero(m).flatten()
                slot_of.append(s.to(hidden.device))
            views = [view(first + vi, (slot_of[vi] >= 0) if vi > 0 else None) for vi in range(c)]
            first += c
            nh, nw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, vc.image_size) if c > 1 else (0, 0)
            images.append(ImageTokens(views, base=0 if c > 1 else None, crop_grid=(int(nh), int(nw)) if c > 1 else None,
                                      crop_views=list(range(1, c))))
            newline = torch.nonzero(code == -1).flatten().to(hidden.device)
            layouts.append(_Layout(int(code.numel()), slot_of, newline, spatial_views=list(range(1, c))))
        return images, layouts

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        if self.family == "qwen2_vl":
            return feats
        return self.model.model.multi_modal_projector(feats)

    # ------------------------------------------------------------------ Qwen2-VL capture
    def _install_qwen(self) -> None:
        visual = self.model.model.visual
        n = len(visual.blocks)
        sl = self.method.score_layer
        if not -n <= sl < n:
            raise ValueError(f"score layer {sl} out of range for a {n}-block vision tower")
        self._handles.append(visual.register_forward_pre_hook(self._on_qwen_visual_pre, with_kwargs=True))
        attn = visual.blocks[sl].attn
        self._qwen_attn = attn
        self._handles.append(attn.register_forward_pre_hook(self._on_qwen_attn, with_kwargs=True))
        self._handles.append(attn.qkv.register_forward_hook(self._stash("qkv")))
        self._handles.append(visual.register_forward_hook(self._on_qwen_visual_post))

    def _on_qwen_visual_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._vision["grid_thw"] = _get(args, kwargs, "grid_thw", 1)

    def _on_qwen_attn(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._vision["rope"] = kwargs["position_embeddings"]

    def _qwen_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per merged token: attention received (mean over the image's queries, summed over
        heads) and head-averaged keys, pooled over the merge unit, in raster order."""
        t0 = time.process_time()
        module = self._qwen_attn
        v = self._vision
        qkv = v["qkv"]
        cos, sin = v["rope"]
        S = qkv.shape[0]
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        with torch.no_grad():
            q, k, _ = qkv.reshape(S, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = rope(q, k, cos, sin)
            thw = v["grid_thw"]
            visual = self.model.model.visual
            scores, keys, start = [], [], 0
            for n in thw.prod(-1).tolist():
                qi = q[start:start + n].transpose(0, 1)[None]
                ki = k[start:start + n].transpose(0, 1)[None]
                scores.append(received_attention(qi, ki)[0])
                keys.append(ki[0].mean(0))
                start += n
            unit = visual.spatial_merge_size ** 2
            sc = torch.cat(scores).view(-1, unit).sum(-1)
            ky = torch.cat(keys).view(-1, unit, keys[0].shape[-1]).mean(1)
            if hasattr(visual, "window_size"):  # Qwen2.5-VL: blocks run in window order
                from transformers.vision_utils import get_vision_window_index

                widx, _ = get_vision_window_index(thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
                sc2, ky2 = torch.empty_like(sc), torch.empty_like(ky)
                sc2[widx], ky2[widx] = sc, ky
                sc, ky = sc2, ky2
        self.hook_seconds += time.process_time() - t0
        return sc, ky

    def _on_qwen_visual_post(self, module: Any, args: tuple, output: Any) -> None:
        self._vision["merged"] = output.pooler_output.detach()

    def _qwen_views(self) -> tuple[list[ImageTokens], list[_Layout]]:
        v = self._vision
        v["scores"], v["keys"] = self._qwen_scores()
        m = self.model.config.vision_config.spatial_merge_size
        images, layouts, start = [], [], 0
        for t, h, w in v["grid_thw"].tolist():
            n = t * h * w // (m * m)
            sl = slice(start, start + n)
            view = ViewTokens(feats=v["merged"][sl], scores=v["scores"][sl], keys=v["keys"][sl], grid=(t * h // m, w // m))
            images.append(ImageTokens([view]))
            layouts.append(_Layout(n, [torch.arange(n, device=view.feats.device)], view.feats.new_zeros(0, dtype=torch.long)))
            start += n
        return images, layouts

    # ------------------------------------------------------------------ image spans
    def _spans(self, n_per_image: list[int] | None) -> list[list[tuple[int, int, int]]]:
        """Per row: ``(start, length, image_index)`` of every image placeholder span."""
        ids = self._s.get("input_ids")
        if ids is None:
            raise ValueError("ctxzip.vision needs input_ids (it locates the image tokens in them)")
        is_img = ids == self.image_token_id
        spans: list[list[tuple[int, int, int]]] = []
        g = 0
        for b in range(ids.shape[0]):
            pos = torch.nonzero(is_img[b]).flatten().tolist()
            row, i = [], 0
            while i < len(pos):
                if n_per_image is None:  # FastV: contiguous runs
                    j = i
                    while j + 1 < len(pos) and pos[j + 1] == pos[j] + 1:
                        j += 1
                    n = j - i + 1
                else:
                    if g >= len(n_per_image):
                        raise ValueError("more image tokens in input_ids than images given")
                    n = n_per_image[g]
                    if pos[i + n - 1] - pos[i] != n - 1:
                        raise ValueError("an image's placeholder tokens are not contiguous")
                row.append((pos[i], n, g))
                g += 1
                i += n
            spans.append(row)
        if n_per_image is not None and g != len(n_per_image):
            raise ValueError(f"input_ids hold {g} images but the vision tower saw {len(n_per_image)}")
        return spans

    # ------------------------------------------------------------------ language model hooks
    def _on_lm_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        t0 = time.process_time()
        try:
            return self._lm_pre(args, kwargs)
        finally:
            self.hook_seconds += time.process_time() - t0

    def _lm_pre(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        s = self._s
        cache = cache_from_kwargs(kwargs)
        am = kwargs.get("attention_mask")
        if am is not None and not (isinstance(am, torch.Tensor) and am.dim() == 2):
            if self._vision.get("fresh") or getattr(cache, _STATE_ATTR, None) is not None:
                raise ValueError("ctxzip.vision needs a 2-D attention mask (got a 4-D mask or mask dict; "
                                 "static/compiled caches are not supported)")
            return None
        ids = s.get("input_ids")
        has_images = ids is not None and bool((ids == self.image_token_id).any())
        if has_images and not s.get("videos"):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("ctxzip.vision prunes at prefill; continuing a cache with new images is not supported")
            if s.get("labels"):
                raise ValueError("labels are not supported while pruning (the sequence gets shorter)")
            if self.method.stage == "llm":
                self._fastv_prefill_setup(kwargs)
                return None
            if not self._vision.get("fresh"):
                raise ValueError("image tokens without a vision-tower run to score them (pre-computed image "
                                 "features cannot be pruned; pass pixel_values)")
            try:
                return self._vision_prefill(args, kwargs)
            finally:
                self._vision["fresh"] = False
        elif s.get("input_ids") is None and self._vision.get("fresh"):
            raise ValueError("ctxzip.vision needs input_ids (it locates the image tokens in them)")
        state = getattr(cache, _STATE_ATTR, None) if cache is not None else None
        if state is None:
            return None
        if isinstance(state, _SeqState):
            if am is not None:
                kwargs["attention_mask"] = torch.cat([state.mask2d.to(am.dtype), am[:, state.orig_len:]], dim=1)
            pid = kwargs.get("position_ids")
            if state.contiguous and pid is not None:
                kwargs["position_ids"] = pid - state.removed.view(*([1] * (pid.dim() - 2)), -1, 1).to(pid)
            return args, kwargs
        # FastV decode: layers >= K need the mask of their shorter cache
        self._fastv_decode_setup(state, kwargs)
        return None

    def _on_lm_post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        pending = self._s.pop("pending_state", None)
        cache = cache_from_output(output)
        if pending is not None and cache is not None:
            setattr(cache, _STATE_ATTR, pending)
        self._s.pop("fastv", None)

    # ------------------------------------------------------------------ vision-stage prefill
    def _vision_prefill(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        images, layouts = self._qwen_views() if self.family == "qwen2_vl" else self._clip_views()
        spans = self._spans([lay.n_slots for lay in layouts])
        emb = _get(args, kwargs, "inputs_embeds", 4)
        if emb is None:
            raise ValueError("expected inputs_embeds for the language model")
        results = [self.method.compress_image(img, self.budget) for img in images]
        self.last_stats = []
        outs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for lay, res in zip(layouts, results):
            fixed = int(lay.fixed_slots.numel())
            if res is None:
                outs.append(None)
                self.last_stats.append((lay.n_slots - fixed, lay.n_slots - fixed))
                continue
            slots, feats = self._assemble(lay, res)
            outs.append((slots, self._project(feats.to(emb.dtype)) if feats is not None else None))
            self.last_stats.append((lay.n_slots - fixed, int(slots.numel()) - fixed))
        if all(o is None for o in outs):
            return None
        B, L, D = emb.shape
        am = kwargs.get("attention_mask")
        mask = am if am is not None else torch.ones(B, L, dtype=torch.long, device=emb.device)
        rows_src, rows_new = [], []
        for b in range(B):
            src_parts, new_parts, cur = [], [], 0
            for start, n, g in spans[b]:
                src_parts.append(torch.arange(cur, start, device=emb.device))
                new_parts.append(None)
                if outs[g] is None:
                    src_parts.append(torch.arange(start, start + n, device=emb.device))
                    new_parts.append(None)
                else:
                    slots, proj = outs[g]
                    src_parts.append(start + slots)
                    new_parts.append((proj, slots))
                cur = start + n
            src_parts.append(torch.arange(cur, L, device=emb.device))
            new_parts.append(None)
            rows_src.append(src_parts)
            rows_new.append(new_parts)
        # drop the rows' own padding (it is re-created on the left for the new common length)
        real = mask.bool()
        for b in range(B):
            for i, (part, new) in enumerate(zip(rows_src[b], rows_new[b])):
                if new is None:
                    rows_src[b][i] = part[real[b, part]]
        lengths = [sum(int(p.numel()) for p in r) for r in rows_src]
        Lp = max(lengths)
        src = torch.zeros(B, Lp, dtype=torch.long, device=emb.device)
        valid = torch.zeros(B, Lp, dtype=torch.bool, device=emb.device)
        new_emb = emb.new_zeros(B, Lp, D)
        for b in range(B):
            off = Lp - lengths[b]
            idx = torch.cat(rows_src[b])
            src[b, off:] = idx
            valid[b, off:] = True
            new_emb[b, off:] = emb[b, idx]
            pos = off
            for part, new in zip(rows_src[b], rows_new[b]):
                if new is not None:
                    proj, slots = new
                    if proj is not None:
                        rows = torch.nonzero(proj.isfinite().all(-1)).flatten()
                        new_emb[b, pos + rows] = proj[rows]
                pos += int(part.numel())
        new_mask = torch.gather(mask, 1, src) * valid.to(mask.dtype)
        kwargs = dict(kwargs)
        if len(args) > 4:
            args = tuple(a if i != 4 else new_emb for i, a in enumerate(args))
        else:
            kwargs["inputs_embeds"] = new_emb
        kwargs["attention_mask"] = new_mask
        pid = kwargs.get("position_ids")
        if self.contiguous:
            if pid is not None:
                p = (new_mask.long().cumsum(-1) - 1).clamp_min(0)
                kwargs["position_ids"] = p.view(*([1] * (pid.dim() - 2)), B, Lp).expand(*pid.shape[:-1], Lp).to(pid)
        else:
            if pid is None:
                pid = torch.arange(L, device=emb.device).expand(B, L)
            kwargs["position_ids"] = _gather_seq(pid, src, -1)
        orig_valid = mask.long().sum(-1)
        self._s["pending_state"] = _SeqState(
            orig_len=L, mask2d=new_mask, removed=(orig_valid - new_mask.long().sum(-1)), contiguous=self.contiguous
        )
        return args, kwargs

    def _assemble(self, lay: _Layout, res: list[ViewResult]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slots (within the image span) and pre-projector features of the emitted tokens, in
        sequence order. Fixed slots (newlines) get NaN features: the caller keeps their
        original embeddings."""
        front_slots, front_feats, spatial = [], [], []
        for vi, r in enumerate(res):
            so = lay.slot_of[vi]
            src = r.src
            real = src >= 0
            slot = torch.empty_like(src)
            slot[real] = so[src[real]]
            first = so[src[real]].min() if bool(real.any()) else so[so >= 0].min()
            slot[~real] = first
            if vi in lay.spatial_views:
                key = slot.float() - (~real).float() * 0.5
                spatial.append((key, slot, r.feats))
            else:
                front_slots.append(slot)
                front_feats.append(r.feats)
        slots = front_slots
        feats = front_feats
        if spatial or lay.fixed_slots.numel():
            D = res[0].feats.shape[-1]
            ref = res[0].feats
            keys = [k for k, _, _ in spatial] + [lay.fixed_slots.float()]
            sl = [s for _, s, _ in spatial] + [lay.fixed_slots]
            ft = [f for _, _, f in spatial] + [ref.new_full((lay.fixed_slots.numel(), D), float("nan"))]
            key = torch.cat(keys)
            order = torch.argsort(key, stable=True)
            slots = slots + [torch.cat(sl)[order]]
            feats = feats + [torch.cat(ft)[order]]
        return torch.cat(slots), torch.cat(feats)

    # ------------------------------------------------------------------ FastV
    def _fastv_prefill_setup(self, kwargs: dict) -> None:
        spans = self._spans(None)
        if not any(spans):
            return
        am = kwargs.get("attention_mask")
        self._s["fastv"] = {"mode": "prefill", "spans": spans, "am": am}

    def _fastv_select(self, hs: torch.Tensor, kwargs: dict) -> None:
        """Score image tokens from layer K's stashed q/k (FastV) and set up the pruning."""
        f = self._s["fastv"]
        t0 = time.process_time()
        module = self._fastv_attn
        cos, sin = kwargs["position_embeddings"]
        B, L, _ = hs.shape
        hd = module.head_dim
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
        with torch.no_grad():
            q = self._s.pop("lq")[:, -1:].reshape(B, 1, -1, hd)
            k = self._s.pop("lk").reshape(B, L, -1, hd)
            if hasattr(module, "q_norm"):
                q, k = module.q_norm(q), module.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q = rope(q, q, cos[..., -1:, :], sin[..., -1:, :])[0]
            k = rope(k, k, cos, sin)[0]
            am = f["am"]
            scores = last_token_attention(q, k, None if am is None else am.bool())
        keep = torch.stack([self.method.select(scores[b], [(s, n) for s, n, _ in f["spans"][b]], self.budget)  # type: ignore[attr-defined]
                            for b in range(B)])
        if am is not None:  # the rows' own padding is dropped too (re-created on the left)
            keep &= am.bool()
        self.last_stats = [(n, self.budget.resolve(n) if self.budget else n) for row in f["spans"] for _, n, _ in row]
        lengths = keep.sum(-1)
        Lp = int(lengths.max())
        keep_idx = torch.zeros(B, Lp, dtype=torch.long, device=hs.device)
        valid = torch.zeros(B, Lp, dtype=torch.bool, device=hs.device)
        for b in range(B):
            idx = torch.nonzero(keep[b]).flatten()
            keep_idx[b, Lp - idx.numel():] = idx
            valid[b, Lp - idx.numel():] = True
        am2 = torch.ones(B, L, dtype=torch.bool, device=hs.device) if am is None else am.bool()
        allowed = (keep_idx[:, None, :] <= keep_idx[:, :, None]) & valid[:, None, :] & torch.gather(am2, 1, keep_idx)[:, None, :]
        allowed |= torch.eye(Lp, dtype=torch.bool, device=hs.device)[None]  # no fully masked rows
        f.update(mode="apply", keep_idx=keep_idx, mask4d=_float_mask(allowed, hs.dtype), pe=None)
        self._s["pending_state"] = _FastVState(orig_len=L, keep_idx=keep_idx, valid=valid)
        self.hook_seconds += time.process_time() - t0

    def _fastv_decode_setup(self, state: _FastVState, kwargs: dict) -> None:
        cache = cache_from_kwargs(kwargs)
        emb = kwargs.get("inputs_embeds")
        q_len = emb.shape[1] if emb is not None else kwargs["input_ids"].shape[1]
        past = cache.get_seq_length()  # layer 0 holds every token
        B = state.keep_idx.shape[0]
        dev = state.keep_idx.device
        new_pos = torch.arange(state.orig_len, past + q_len, device=dev)
        kv = torch.cat([state.keep_idx, new_pos.expand(B, -1)], 1)
        kv_valid = torch.cat([state.valid, torch.ones(B, new_pos.numel(), dtype=torch.bool, device=dev)], 1)
        am = kwargs.get("attention_mask")
        am2 = torch.ones(B, past + q_len, dtype=torch.bool, device=dev) if am is None else am.bool()
        qpos = torch.arange(past, past + q_len, device=dev)
        allowed = (kv[:, None, :] <= qpos[None, :, None]) & kv_valid[:, None, :] & torch.gather(am2, 1, kv)[:, None, :]
        dtype = emb.dtype if emb is not None else self.lm.dtype
        self._s["fastv"] = {"mode": "decode", "mask4d": _float_mask(allowed, dtype)}

    def _make_fastv_layer_hook(self, first: bool):
        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            f = self._s.get("fastv")
            if first and f and f["mode"] == "prefill":
                self._fastv_select(_get(args, kwargs, "hidden_states", 0), kwargs)
            if not f or f["mode"] not in ("apply", "decode"):
                return None
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = f["mask4d"]
            if f["mode"] == "apply":
                idx = f["keep_idx"]
                if first:
                    hs = _get(args, kwargs, "hidden_states", 0)
                    hs = _gather_seq(hs, idx, 1)
                    if "hidden_states" in kwargs:
                        kwargs["hidden_states"] = hs
                    else:
                        args = (hs, *args[1:])
                if f["pe"] is None:
                    cos, sin = kwargs["position_embeddings"]
                    f["pe"] = (_gather_seq(cos, idx, -2), _gather_seq(sin, idx, -2))
                kwargs["position_embeddings"] = f["pe"]
                pid = kwargs.get("position_ids")
                if isinstance(pid, torch.Tensor) and pid.shape[-1] != idx.shape[1]:
                    kwargs["position_ids"] = _gather_seq(pid, idx, -1)
            return args, kwargs

        return hook


def prune(
    model: Any,
    method: str | VisualTokenMethod = "visionzip",
    budget: Budget | int | float | str | None = None,
    *,
    positions: str | None = None,
    **params: Any,
) -> Any:
    """Make ``model`` prune/merge visual tokens with ``method`` at ``budget`` tokens per image.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``.
        method: ``"fastv"``, ``"visionzip"``, ``"tome"``, ``"prumerge"``, ``"globalcom2"``,
            ``"correlation"`` or a method instance.
        budget: visual tokens kept per image: a :class:`~ctxzip.budget.Budget`, an int (count),
            a float rate, or a string for :meth:`Budget.parse` (``"64"``, ``"25%"``, ``"4x"``).
            ``None`` only for the adaptive methods (``prumerge``, ``correlation``).
        positions: ``"contiguous"`` (the pruned sequence is renumbered, as LLaVA sees fewer
            tokens in VisionZip/PruMerge/GlobalCom²; default for LLaVA families) or
            ``"original"`` (position ids of the unpruned sequence gathered; default for
            Qwen2-VL's M-RoPE). FastV always keeps the original positions.
        **params: the method's hyperparameters (e.g. ``k=3`` for FastV).

    Returns:
        the same model object, with hooks installed; ``model.ctxzip_vision`` is the
        :class:`VisionPruner` (``.remove()`` undoes everything). Pruning an already pruned model
        replaces the previous hooks.
    """
    supported_family(model)
    m = get_method(method, **params)
    if budget is not None and not isinstance(budget, Budget):
        budget = Budget.parse(budget)
    if budget is None and m.name not in ("prumerge", "correlation"):
        raise ValueError(f"method {m.name!r} needs a budget (e.g. Budget(tokens=64))")
    old = getattr(model, "ctxzip_vision", None)
    if isinstance(old, VisionPruner):
        old.remove()
    model.ctxzip_vision = VisionPruner(model, m, budget, positions)
    return model


def unprune(model: Any) -> Any:
    """Remove :func:`prune`'s hooks (no-op on a model that was never pruned)."""
    old = getattr(model, "ctxzip_vision", None)
    if isinstance(old, VisionPruner):
        old.remove()
    return model
