"""attn_implementation="ctxzip" against SDPA, and attention recording, on tiny random models."""

from __future__ import annotations

import pytest
import torch

import ctxzip.kernels as K
from ctxzip.testing import TINY_FAMILIES, tiny_causal_lm, tiny_llava


def _pair(family, **kw):
    a = tiny_causal_lm(family, attn_implementation="sdpa", **kw)
    b = tiny_causal_lm(family, attn_implementation="ctxzip", **kw)
    assert b.config._attn_implementation == "ctxzip"
    return a, b


def _ids(B=2, T=13, seed=0):
    return torch.randint(3, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logits_match_sdpa(family):
    a, b = _pair(family)
    ids = _ids()
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_left_padding_and_cached_decoding_match_sdpa(family):
    a, b = _pair(family)
    ids = _ids(T=12)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        la = a(ids, attention_mask=mask).logits
        lb = b(ids, attention_mask=mask).logits
        torch.testing.assert_close(lb[0], la[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lb[1, 5:], la[1, 5:], atol=1e-5, rtol=1e-4)
        ga = a.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        gb = b.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)


def test_from_config_after_import():
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8,
    )
    m = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="ctxzip")
    assert m.config._attn_implementation == "ctxzip"
    m.eval()
    s = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    s.load_state_dict(m.state_dict())
    ids = _ids(B=1, T=9)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, s(ids).logits, atol=1e-5, rtol=1e-4)


def _eager_mass(model, ids, mask, window=None):
    """Per-layer column sums of eager attention weights (the O(n^2) way), summed per GQA group.

    Padded query rows are left out: eager gives them a uniform row, ctxzip gives them zero.
    """
    eager = tiny_causal_lm("llama", attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = eager(ids, attention_mask=mask, output_attentions=True).attentions
    real = mask.bool()[:, None, :, None]
    out = []
    for a in att:  # [B, Hq, Tq, Tk]
        a = a * real
        rows = a if window is None else a[:, :, -window:]
        B, Hq, _, Tk = a.shape
        Hkv = model.config.num_key_value_heads
        out.append(rows.sum(2).view(B, Hkv, Hq // Hkv, Tk).sum(2))
    return out


@pytest.mark.parametrize("window", [None, 4])
def test_record_attention_matches_eager_weights(window):
    model = tiny_causal_lm("llama")  # an SDPA model: switched to ctxzip inside the block only
    ids = _ids(T=11)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad(), K.record_attention(model, window=window) as rec:
        out = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0, 3:], ref[0, 3:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-4)
    want = _eager_mass(model, ids, mask, window)
    assert sorted(rec.scores) == list(range(len(want)))
    for layer, w in enumerate(want):
        assert rec.scores[layer].shape == (2, 2, 11)
        torch.testing.assert_close(rec.scores[layer], w, atol=1e-5, rtol=1e-4)


def test_record_attention_layers_callback_and_decode():
    model = tiny_causal_lm("qwen2", num_layers=3)
    seen = []
    ids = _ids(B=1, T=8)
    with torch.no_grad(), K.record_attention(
        model, window=1, layers=[-1], gqa="per_head", callback=lambda **kw: seen.append(kw["layer"])
    ) as rec:
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        model(nxt, past_key_values=out.past_key_values)
    assert list(rec.scores) == [2] and seen == [2, 2] and rec.calls[2] == 2
    s = rec.scores[2]
    assert s.shape == (1, 4, 9)  # per query head, over 8 + 1 keys
    torch.testing.assert_close(s.sum(-1), torch.ones(1, 4))


def test_record_attention_clip_cls_queries():
    model = tiny_llava()
    tower = model.model.vision_tower
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), K.record_attention(tower, queries=0, gqa="per_head") as rec:
        tower(px)
    eager = tiny_llava(attn_implementation="eager").model.vision_tower
    eager.load_state_dict(tower.state_dict())
    with torch.no_grad():
        att = eager(px, output_attentions=True).attentions
    assert len(rec.scores) == len(att) == 2
    for layer, a in enumerate(att):
        torch.testing.assert_close(rec.scores[layer], a[:, :, 0], atol=1e-5, rtol=1e-4)


def test_record_attention_bad_args():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="out of range"), K.record_attention(model, layers=[5]):
        pass
    with pytest.raises(ValueError, match="window"), K.record_attention(model, window=-2):
        pass
    with pytest.raises(ValueError, match="either"), K.record_attention(model, window=2, queries=0):
        pass
    with pytest.raises(ValueError, match="no attention modules"), K.record_attention(torch.nn.Linear(2, 2)):
        pass
    assert model.config._attn_implementation == "sdpa"
