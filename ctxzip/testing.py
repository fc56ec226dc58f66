"""Tiny random-weight models built from configs offline, for mechanism tests.

They load in milliseconds and exercise the same code paths as real checkpoints (GQA, RoPE,
q/k norms, sliding-window layers, vision towers). Quality checks use the real offline
defaults instead (``pytest -m slow``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["tiny_causal_lm", "tiny_encoder", "tiny_llava", "TINY_FAMILIES", "random_ids", "prefill_then_decode", "save_tiny_token_classifier"]

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3")


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def tiny_causal_lm(
    family: str = "llama",
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    **overrides: Any,
) -> Any:
    """A randomly initialised causal LM of the given family (GQA by default), in eval mode.

    ``family``: one of ``llama``, ``qwen2``, ``qwen3`` (q/k norm), ``mistral``, ``gemma3``
    (sliding-window layers mixed with full ones), ``phi3`` (fused qkv).
    """
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(head_dim=head_dim, **common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(head_dim=head_dim, **common)
    elif family == "mistral":
        cfg = tf.MistralConfig(head_dim=head_dim, sliding_window=None, **common)
    elif family == "gemma3":
        n = max(num_layers, 2)
        common["num_hidden_layers"] = n
        cfg = tf.Gemma3TextConfig(
            head_dim=head_dim,
            sliding_window=8,
            layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)],
            **common,
        )
    elif family == "phi3":
        cfg = tf.Phi3Config(**common)
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    _seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def tiny_encoder(*, vocab_size: int = 256, hidden_size: int = 32, seed: int = 0) -> Any:
    """A randomly initialised BERT encoder (2 layers)."""
    import transformers as tf

    cfg = tf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
    )
    _seed(seed)
    return tf.BertModel(cfg).eval()


def tiny_llava(
    *,
    image_size: int = 56,
    patch_size: int = 14,
    text_hidden: int = 64,
    vision_hidden: int = 32,
    image_token_id: int = 250,
    vocab_size: int = 256,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> Any:
    """A randomly initialised ``LlavaForConditionalGeneration`` (CLIP tower + Llama LM).

    With the defaults an image is (56/14)^2 = 16 patch tokens.
    """
    import transformers as tf

    vision = tf.CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = tf.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
    )
    cfg = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    _seed(seed)
    model = tf.LlavaForConditionalGeneration._from_config(
        cfg, attn_implementation=attn_implementation
    )
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 0, low: int = 3, high: int = 256) -> Any:
    """Deterministic random token ids ``[batch, length]`` in ``[low, high)`` (skipping the tiny
    models' special ids)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, length), generator=g)


def prefill_then_decode(
    model: Any,
    press: Any,
    ids: Any,
    new: Any,
    attention_mask: Any = None,
    position_ids: Any = None,
    new_pos: Any = None,
) -> tuple[Any, Any]:
    """Prefill ``ids`` into a fresh ``DynamicCache`` (under ``with press(model)`` unless ``press``
    is ``None``), then run ``new`` on that cache: returns ``(logits of new, cache)``. The KV-press
    test matrix compares these against the no-press run. ``attention_mask`` covers ``ids``; the
    decode step's mask extends it with ones."""
    import torch
    from transformers import DynamicCache

    from ctxzip._hf_compat import with_cache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if press is None:
            model(ids, attention_mask=attention_mask, position_ids=position_ids, **with_cache(cache))
        else:
            with press(model):
                model(ids, attention_mask=attention_mask, position_ids=position_ids, **with_cache(cache))
        am = None
        if attention_mask is not None:
            am = torch.cat([attention_mask, torch.ones_like(new)], 1)
        out = model(new, attention_mask=am, position_ids=new_pos, **with_cache(cache)).logits
    return out, cache


def save_tiny_token_classifier(directory: Any, seed: int = 0) -> Any:
    """Save a tiny random ``BertForTokenClassification`` (2 layers, hidden 32, 2 labels) with the
    packaged MiniLM's real WordPiece tokenizer into ``directory`` and return it as a ``Path``.
    The classifier weights are scaled up so keep probabilities spread over (0, 1) and percentile
    thresholds are meaningful. Name the directory ``...bert-base-multilingual-cased...`` to make
    llmlingua pick ``##`` word merging."""
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from .models import encoder_path

    tok = AutoTokenizer.from_pretrained(encoder_path())
    _seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=2)
    model = BertForTokenClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)
    d = Path(directory)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
