"""Tiny random-weight VLMs and matching inputs, built offline, for mechanism tests.

``tiny_llava`` lives in :mod:`ctxzip.testing`; this module adds the two other families the
vision wrappers support (LLaVA-NeXT with AnyRes crops, Qwen2-VL / Qwen2.5-VL with M-RoPE) and
input builders that place the right number of image tokens, left-pad a batch and give every
row its own number of images (mixed images).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "tiny_llava_next",
    "tiny_qwen2_vl",
    "make_vlm_inputs",
    "image_token_counts",
]

IMAGE_TOKEN_ID = 250
PAD_ID = 0


def _text_config(tf: Any, vocab_size: int, hidden: int, layers: int, cls: str = "LlamaConfig") -> Any:
    return getattr(tf, cls)(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        pad_token_id=PAD_ID,
        max_position_embeddings=4096,
    )


def tiny_llava_next(
    *,
    image_size: int = 56,
    patch_size: int = 14,
    text_hidden: int = 64,
    vision_hidden: int = 32,
    text_layers: int = 4,
    vision_layers: int = 3,
    vocab_size: int = 256,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> Any:
    """A random ``LlavaNextForConditionalGeneration`` (CLIP tower, AnyRes crops, Llama LM).

    Each view is ``(image_size / patch_size)^2`` tokens (16 by default); the grid pinpoints allow
    1x2, 2x1 and 2x2 crop layouts, so an image is a thumbnail plus up to four crops.
    """
    import torch
    import transformers as tf

    vision = tf.CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    s = image_size
    cfg = tf.LlavaNextConfig(
        vision_config=vision,
        text_config=_text_config(tf, vocab_size, text_hidden, text_layers),
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = tf.LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    with torch.no_grad():  # _from_config leaves the newline parameter uninitialised
        model.model.image_newline.normal_(0, 1.0)
    return model.eval()


def tiny_qwen2_vl(
    *,
    version: str = "2",
    text_hidden: int = 64,
    vision_hidden: int = 32,
    text_layers: int = 4,
    vision_layers: int = 2,
    vocab_size: int = 256,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> Any:
    """A random ``Qwen2VLForConditionalGeneration`` (``version="2"``) or
    ``Qwen2_5_VLForConditionalGeneration`` (``version="2.5"``), patch 14, 2x2 spatial merge."""
    import torch
    import transformers as tf

    head_dim = text_hidden // 4
    text = dict(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
    )
    vision = dict(
        depth=vision_layers,
        embed_dim=vision_hidden,
        hidden_size=text_hidden,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    if version == "2":
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                               video_token_id=IMAGE_TOKEN_ID + 1, vision_start_token_id=IMAGE_TOKEN_ID + 2)
        cls = tf.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision.update(out_hidden_size=text_hidden, intermediate_size=vision_hidden * 2,
                      window_size=56, fullatt_block_indexes=[vision_layers - 1])
        vision.pop("embed_dim")
        vision["hidden_size"] = vision_hidden
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                                  video_token_id=IMAGE_TOKEN_ID + 1, vision_start_token_id=IMAGE_TOKEN_ID + 2)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    torch.manual_seed(seed)
    return cls._from_config(cfg, attn_implementation=attn_implementation).eval()


def _family(model: Any) -> str:
    name = type(model).__name__
    if name.startswith("LlavaNext"):
        return "llava_next"
    if name.startswith("Llava"):
        return "llava"
    if name.startswith("Qwen2"):
        return "qwen2_vl"
    raise ValueError(f"no input builder for {name}")


def image_token_counts(model: Any, images: dict[str, Any]) -> list[int]:
    """Number of image placeholder tokens each image expands to in ``model``'s sequence."""
    import torch

    fam = _family(model)
    if fam == "llava":
        n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        return [n] * images["pixel_values"].shape[0]
    if fam == "qwen2_vl":
        m = model.config.vision_config.spatial_merge_size
        return [int(t * h * w) // (m * m) for t, h, w in images["image_grid_thw"].tolist()]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    feats = []
    for size in images["image_sizes"]:
        p = image_size_to_num_patches(size, model.config.image_grid_pinpoints, vc.image_size)
        feats.append(torch.zeros(p, n, 1))
    _, lens = model.model.pack_image_features(
        feats, images["image_sizes"], "default", image_newline=torch.zeros(1)
    )
    return [int(x) for x in lens.tolist()]


def _images(model: Any, n_images: int, gen: Any) -> dict[str, Any]:
    import torch

    fam = _family(model)
    if n_images == 0:
        return {}
    if fam == "llava":
        s = model.config.vision_config.image_size
        return {"pixel_values": torch.randn(n_images, 3, s, s, generator=gen)}
    if fam == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        s = model.config.vision_config.image_size
        # alternate landscape / portrait / square originals so crop grids and unpadding differ
        shapes = [(s, int(1.7 * s)), (int(1.9 * s), s), (2 * s, 2 * s), (int(0.8 * s), s)]
        sizes = torch.tensor([shapes[i % len(shapes)] for i in range(n_images)])
        counts = [image_size_to_num_patches(sz, model.config.image_grid_pinpoints, s) for sz in sizes]
        pv = torch.zeros(n_images, max(counts), 3, s, s)
        for i, c in enumerate(counts):
            pv[i, :c] = torch.randn(c, 3, s, s, generator=gen)
        return {"pixel_values": pv, "image_sizes": sizes}
    vc = model.config.vision_config
    grids = [(1, 8, 8), (1, 4, 8), (1, 8, 4)]
    thw = torch.tensor([grids[i % len(grids)] for i in range(n_images)])
    n_patch = int(thw.prod(-1).sum())
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return {"pixel_values": torch.randn(n_patch, dim, generator=gen), "image_grid_thw": thw}


def make_vlm_inputs(
    model: Any,
    images_per_row: list[int],
    *,
    text_len: int = 6,
    tail_len: int = 3,
    pad_rows: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Left-padded batch: row ``b`` is ``text_len`` text tokens, then per image its placeholder
    tokens followed by ``tail_len`` text tokens; ``images_per_row[b]`` images (0 = text only) and
    a 2-D ``attention_mask``. Token ids are random (random-weight models have no vocabulary).

    Row ``b`` also gets ``b`` extra text tokens so rows differ in length even with equal images.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_total = sum(images_per_row)
    imgs = _images(model, n_total, gen)
    counts = image_token_counts(model, imgs) if n_total else []
    img_id = int(model.config.image_token_id)
    vocab = min(model.config.get_text_config().vocab_size, img_id)
    rows, types = [], []
    k = 0
    for b, n in enumerate(images_per_row):
        ids: list[int] = torch.randint(3, vocab, (text_len + b,), generator=gen).tolist()
        tt = [0] * len(ids)
        for _ in range(n):
            ids += [img_id] * counts[k]
            tt += [1] * counts[k]
            k += 1
            more = torch.randint(3, vocab, (tail_len,), generator=gen).tolist()
            ids += more
            tt += [0] * len(more)
        rows.append(ids)
        types.append(tt)
    L = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    mm = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (r, t) in enumerate(zip(rows, types)):
        input_ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
        mm[b, L - len(r):] = torch.tensor(t)
    if not pad_rows and not bool(mask.all()):
        raise ValueError("rows differ in length; use pad_rows=True")
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, **imgs}
    if _family(model) == "qwen2_vl":
        out["mm_token_type_ids"] = mm
    return out
