"""Compress a context once, answer several questions from it (kvpress's pipeline, as a
function)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import DynamicCache

from .._hf_compat import with_cache
from .base import BasePress
from .decoding import DecodingPress

__all__ = ["generate", "prefill"]


@torch.no_grad()
def prefill(model: Any, input_ids: torch.Tensor, press: BasePress | None = None,
            attention_mask: torch.Tensor | None = None) -> DynamicCache:
    """Run ``input_ids`` through ``model`` under ``press`` and return the (compressed) cache."""
    cache = DynamicCache(config=model.config)
    if press is None:
        model(input_ids, attention_mask=attention_mask, use_cache=True, **with_cache(cache))
        return cache
    with press(model):
        model(input_ids, attention_mask=attention_mask, use_cache=True, **with_cache(cache))
    return cache


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    context: str,
    question: str | list[str] | None = None,
    *,
    press: BasePress | None = None,
    max_new_tokens: int = 64,
    add_special_tokens: bool = True,
) -> str | list[str]:
    """Greedy answers to ``question`` (one string or a list) about ``context``.

    The context is prefilled (and compressed by ``press``) once; each question then runs on a
    copy of that cache, so the compression cost is paid once. With a
    :class:`~ctxzip.kvcache.decoding.DecodingPress` the press stays active while decoding.
    Returns one string per question (a string for a single question or ``None``).
    """
    if not isinstance(context, str):
        raise TypeError(f"context must be a str, got {type(context).__name__}")
    if not context:
        raise ValueError("context is empty")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    single = question is None or isinstance(question, str)
    questions = [question or ""] if single else list(question)
    dev = next(model.parameters()).device
    ctx_ids = tokenizer(context, return_tensors="pt", add_special_tokens=add_special_tokens)[
        "input_ids"
    ].to(dev)
    # the context but its last token is prefilled (and compressed); each answer run starts with
    # that last token followed by the question
    if ctx_ids.shape[1] > 1:
        base = prefill(model, ctx_ids[:, :-1], press)
    else:
        base = DynamicCache(config=model.config)
    buf0 = copy.deepcopy(getattr(press, "_buf", None))
    eos = tokenizer.eos_token_id
    answers = []
    for q in questions:
        cache = copy.deepcopy(base)
        q_ids = tokenizer(q, return_tensors="pt", add_special_tokens=False)["input_ids"].to(dev).long()
        if isinstance(press, DecodingPress):
            press._buf = copy.deepcopy(buf0)  # each question starts from the prefill state
        active = press(model) if isinstance(press, DecodingPress) else None
        out: list[int] = []
        try:
            if active is not None:
                active.__enter__()
            ids = torch.cat([ctx_ids[:, -1:], q_ids], dim=1)
            for _ in range(max_new_tokens):
                logits = model(ids, use_cache=True, **with_cache(cache)).logits[:, -1]
                nxt = int(logits.argmax(-1))
                if eos is not None and nxt == eos:
                    break
                out.append(nxt)
                ids = torch.tensor([[nxt]], device=dev)
        finally:
            if active is not None:
                active.__exit__(None, None, None)
        answers.append(tokenizer.decode(out, skip_special_tokens=True))
    return answers[0] if single else answers
