"""Compress a KV cache with a press, then keep decoding from it (offline SmolLM2).

    python examples/kvcache_press.py
"""

import torch
from transformers import DynamicCache

from ctxzip.budget import Budget
from ctxzip.eval import prose_documents
from ctxzip.kvcache import SnapKVPress, cache_nbytes, generate
from ctxzip.models import load_causal_lm

model, tok = load_causal_lm()
text = prose_documents(1)[0].text
ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :1024]

press = SnapKVPress(budget=Budget(rate=0.25))
cache = DynamicCache(config=model.config)
with torch.no_grad():
    full = DynamicCache(config=model.config)
    model(ids, past_key_values=full)
    with press(model):
        model(ids, past_key_values=cache)  # the cache now holds 25 % of the context per layer
    print(f"positions continue at {cache.get_seq_length()} (context {ids.shape[1]} tokens)")
    print(f"cache bytes: {cache_nbytes(cache):,} vs {cache_nbytes(full):,} uncompressed")
    nxt = tok(" In short,", return_tensors="pt", add_special_tokens=False)["input_ids"]
    for _ in range(12):
        logits = model(nxt, past_key_values=cache).logits
        nxt = logits[:, -1:].argmax(-1)
        print(tok.decode(nxt[0]), end="", flush=True)
    print()

# compress once, answer several questions
answers = generate(model, tok, text[:3000], ["\nQuestion: what is this about?\nAnswer:",
                                              "\nSummary:"], press=press, max_new_tokens=20)
for a in answers:
    print(repr(a))
