"""Per-token attention scores from a real model without eager attention, and a quantized decode.

    python examples/kernels_attention_scores.py

1. Runs SmolLM2-135M (offline default) over real prose under ``record_attention``: every layer
   reports how much attention each prompt token receives from the last 32 queries (SnapKV's
   observation window) — computed from the blocked kernels, not from an N x N matrix.
2. Quantizes the last layer's KV cache to 4 and 2 bits in the shared KIVI/GEAR layout and runs
   one decode step over it, comparing with the full-precision result.
"""

from __future__ import annotations

import pydoc_data.topics

import torch

import ctxzip.kernels as K
from ctxzip.models import load_causal_lm

model, tok = load_causal_lm()  # SmolLM2-135M-Instruct, offline
text = pydoc_data.topics.topics["with"][:2500]
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids

with torch.no_grad(), K.record_attention(model, window=32) as rec:
    out = model(ids, use_cache=True)

last = max(rec.scores)
scores = rec.scores[last][0]  # [KV heads, tokens]: attention mass summed over each GQA group
print(f"{ids.shape[1]} tokens, {len(rec.scores)} layers recorded; layer {last} scores {tuple(scores.shape)}")
top = scores.mean(0).topk(8).indices.tolist()
print("most attended tokens (last layer):", [tok.decode([ids[0, i]]) for i in sorted(top)])

# decode over a quantized copy of that layer's cache
layer = out.past_key_values.layers[last]
k, v = layer.keys, layer.values  # [1, Hkv, T, d], post-RoPE
T = (k.shape[2] // 32) * 32
q = torch.randn(1, model.config.num_attention_heads, k.shape[-1])
ref = K.decode_ragged(q, k, v, torch.full((1, k.shape[1]), k.shape[2]))
for bits in (4, 2):
    kq = K.quantize(k[:, :, :T], bits=bits, group_size=32, axis="channel")
    vq = K.quantize(v[:, :, :T], bits=bits, group_size=32, axis="token")
    got = K.decode_quantized(q, kq, vq, k_tail=k[:, :, T:], v_tail=v[:, :, T:])
    full_bytes = 2 * k[:, :, :T].numel() * 2  # fp16 K and V
    rel = float((got - ref).norm() / ref.norm())
    print(f"{bits}-bit cache: {(kq.nbytes() + vq.nbytes()) / full_bytes:.3f} of fp16 bytes, "
          f"decode output relative error {rel:.3f}")
