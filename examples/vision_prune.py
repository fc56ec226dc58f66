"""Prune visual tokens of a LLaVA model with VisionZip, then generate.

Runs offline on a tiny random-weight LLaVA (no weights needed). With real weights, replace the
model with e.g. ``LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")``
and build the inputs with its ``AutoProcessor``; the ``prune`` call is the same.

    python examples/vision_prune.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctxzip.budget import Budget  # noqa: E402
from ctxzip.testing import tiny_llava  # noqa: E402
from ctxzip.vision import prune, unprune  # noqa: E402
from ctxzip.vision.testing import make_vlm_inputs  # noqa: E402

model = tiny_llava()  # CLIP tower (16 patch tokens per image) + Llama LM, random weights
inputs = make_vlm_inputs(model, [1, 2])  # batch of 2 rows: one image, two images; left-padded

with torch.no_grad():
    full = model(**inputs)
print("unpruned LLM sequence:", full.logits.shape[1], "tokens")

prune(model, method="visionzip", budget=Budget(tokens=4))  # 4 visual tokens per image
with torch.no_grad():
    out = model(**inputs)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
print("pruned LLM sequence:  ", out.logits.shape[1], "tokens")
print("visual tokens per image (before, after):", model.ctxzip_vision.last_stats)
print("generated ids:", generated[:, -5:].tolist())

prune(model, method="fastv", budget=Budget(rate=0.5), k=1)  # FastV after layer 1, keep 50%
with torch.no_grad():
    model.generate(**inputs, max_new_tokens=5, do_sample=False)
print("FastV kept per image:", model.ctxzip_vision.last_stats)

unprune(model)  # back to the original model
