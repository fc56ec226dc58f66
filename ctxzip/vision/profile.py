"""Prefill cost of a (pruned) VLM: counted FLOPs, wall time, tokens, output agreement.

Used by ``ctxzip vision bench`` and ``benchmarks/vision_prefill.py``. FLOPs are counted with
:class:`torch.utils.flop_counter.FlopCounterMode` (every matmul, including the wrapper's own
scoring); CPU SDPA kernels are not in torch's FLOP registry, so a formula for
``aten._scaled_dot_product_flash_attention_for_cpu`` is supplied (``4 * B * H * Lq * Lk * d``,
the same formula torch uses for the CUDA kernels).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["llava15_cpu", "llava15_prompt", "count_prefill_flops", "time_prefill", "agreement", "PrefillCost"]


def llava15_cpu(
    *,
    vision_layers: int = 24,
    vision_hidden: int = 256,
    vision_heads: int = 8,
    text_layers: int = 16,
    text_hidden: int = 512,
    text_heads: int = 8,
    vocab_size: int = 32064,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> Any:
    """Random-weight ``LlavaForConditionalGeneration`` with LLaVA-1.5's *token geometry* scaled
    in width/depth to fit a CPU: CLIP ViT-L/14 at 336 px (24x24 = 576 patch tokens, 24 layers,
    features from layer -2), a Vicuna-style LLM (MHA, SiLU MLP 2.6875x wide, 32k vocabulary).
    Widths and LLM depth are reduced (defaults 256 / 512, 16 LLM layers vs 1024 / 4096, 32)."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=336,
        patch_size=14,
        projection_dim=text_hidden,
    )
    text = tf.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=int(text_hidden * 2.6875),
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    cfg = tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=32000,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation).eval()


def llava15_prompt(model: Any, *, batch: int = 1, sys_len: int = 35, question_len: int = 24, seed: int = 0) -> dict:
    """One image per row at LLaVA-1.5's prompt layout: ``sys_len`` system tokens (35 in FastV's
    setup), the 576 image tokens, then the question. Pixels and ids are random."""
    from .testing import make_vlm_inputs

    inp = make_vlm_inputs(model, [1] * batch, text_len=sys_len, tail_len=question_len, seed=seed)
    if batch > 1:  # make_vlm_inputs lengthens row b by b tokens; keep rows equal here
        inp = make_vlm_inputs(model, [1], text_len=sys_len, tail_len=question_len, seed=seed)
        inp = {k: v.repeat(batch, *([1] * (v.dim() - 1))) if k != "pixel_values" else v.repeat(batch, 1, 1, 1)
               for k, v in inp.items()}
    return inp


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, lq, d = query_shape
    lk = key_shape[-2]
    return 4 * b * h * lq * lk * d


@dataclass
class PrefillCost:
    total_flops: int
    llm_flops: int
    vision_flops: int
    llm_tokens: int  # sequence length the LLM saw (max over rows)
    last_logits: torch.Tensor | None = None  # [B, V] logits of the last position


def count_prefill_flops(model: Any, inputs: dict) -> PrefillCost:
    """FLOPs of one prefill forward (``logits_to_keep=1``, as ``generate`` runs it)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_sdpa_flop
    lm_len: list[int] = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lm_len.append(int(k["inputs_embeds"].shape[1])), with_kwargs=True
    )
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as fc, torch.no_grad():
            out = model(**inputs, logits_to_keep=1)
    finally:
        h.remove()
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    root = type(model).__name__
    llm = counts.get(f"{root}.model.language_model", 0) + counts.get(f"{root}.lm_head", 0)
    vision = counts.get(f"{root}.model.vision_tower", 0) + counts.get(f"{root}.model.multi_modal_projector", 0)
    return PrefillCost(int(fc.get_total_flops()), int(llm), int(vision), lm_len[-1] if lm_len else 0,
                       out.logits[:, -1].detach())


def time_prefill(model: Any, inputs: dict, reps: int = 3, warmup: int = 1) -> list[float]:
    """Wall seconds of ``reps`` prefill forwards (after ``warmup`` untimed ones)."""
    out = []
    with torch.no_grad():
        for i in range(warmup + reps):
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
    return out


def agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """Last-position agreement of two logit tensors [B, V]: top-1 match rate, mean cosine, KL."""
    p = torch.log_softmax(ref_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return {
        "top1_agree": float((ref_logits.argmax(-1) == logits.argmax(-1)).float().mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(ref_logits.float(), logits.float(), dim=-1).mean()),
        "kl": float((p.exp() * (p - q)).sum(-1).mean()),
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")
