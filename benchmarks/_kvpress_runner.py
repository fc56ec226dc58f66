"""kvpress side of benchmarks/kvcache_quality.py - runs inside kvpress's own venv.

kvpress pins transformers < 5.3, so it cannot share ctxzip's environment. The main script
writes the evaluation cases as token ids (so both sides see identical tokens - no tokenizer,
hence no automatic BOS, is involved here); this script loads SmolLM2 from the same packaged GGUF
and scores the targets with the very same procedure
(``ctxzip.eval.metric.ContextEvaluator.score_items``, imported from the repository).

Prefill once per document: a kvpress press runs as a forward hook after each attention layer
and only rewrites that layer's cache entries, so every later layer - and hence the whole prefill
- is the same for every press and rate. This script therefore prefills each context once (SDPA;
once more with eager attention for ObservedAttention, which needs the attention matrix), and at
each layer calls every ``(press, keep)``'s own ``press.compress(module, hidden_states, keys,
values, attentions, kwargs)`` - exactly what kvpress's ``forward_hook`` calls - collecting one
compressed cache per configuration. Results are cached per case in ``OUT_DIR/<key>.json`` so an
interrupted run resumes.

usage: python _kvpress_runner.py IN.json OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ctxzip repository


def _presses(kp, keep: float, eager: bool) -> dict:
    cr = 1.0 - keep
    if eager:
        return {"observed_attention": kp.ObservedAttentionPress(compression_ratio=cr)}
    return {
        "streaming_llm": kp.StreamingLLMPress(compression_ratio=cr),
        "snapkv": kp.SnapKVPress(compression_ratio=cr),
        "expected_attention": kp.ExpectedAttentionPress(compression_ratio=cr),
        "knorm": kp.KnormPress(compression_ratio=cr),
        "tova": kp.TOVAPress(compression_ratio=cr),
    }


def compressed_caches(model, ids, configs: dict) -> dict:
    """One prefill of ``ids``; returns ``{config: DynamicCache}`` with each press's compressed
    layers (the same computation kvpress's ``BasePress.forward_hook`` does per press)."""
    from transformers import DynamicCache

    layers = model.model.layers
    out: dict = {name: [None] * len(layers) for name in configs}
    hooks = []

    def make_hook(idx):
        def hook(module, args, kwargs, output):
            cache = kwargs["past_key_values"]
            hs = kwargs["hidden_states"]
            keys, values = cache.layers[idx].keys, cache.layers[idx].values
            for name, press in configs.items():
                out[name][idx] = press.compress(module, hs, keys, values, output[1], kwargs)
            return output

        return hook

    for cfg in configs.values():
        cfg.post_init_from_model(model)
    for i, layer in enumerate(layers):
        layer.self_attn.rotary_emb = model.model.rotary_emb  # as kvpress's BasePress.__call__ does
        hooks.append(layer.self_attn.register_forward_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    caches = {}
    for name, per_layer in out.items():
        c = DynamicCache()
        for i, (k, v) in enumerate(per_layer):
            c.update(k.contiguous(), v.contiguous(), i)
        caches[name] = c
    return caches


def main() -> int:
    inp, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = json.loads(Path(inp).read_text())
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("KVPRESS_THREADS", "1")))
    import kvpress as kp
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctxzip.eval.metric import ContextEvaluator, _means

    gguf_dir, gguf_file = payload["gguf_dir"], payload["gguf_file"]
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    meta = {"kvpress_version": version("kvpress"), "transformers_version": transformers.__version__}
    (out_dir / "versions.json").write_text(json.dumps(meta))
    todo = [c for c in payload["cases"] if not (out_dir / f"{c['key']}.json").exists()]
    print(f"kvpress runner: {len(todo)} of {len(payload['cases'])} cases to do", file=sys.stderr, flush=True)
    if not todo:
        return 0
    models = {}
    for eager in (False, True):
        m = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32,
            attn_implementation="eager" if eager else "sdpa",
        ).eval()
        ev = ContextEvaluator(m, tok)
        ev.start_ids = payload["start_ids"]
        ev.max_batch = payload.get("max_batch", 32)
        models[eager] = ev
    for case in todo:
        t_case = time.time()
        items = [("continuation", [], case["continuation"])]
        items += [("recall", c, s) for c, s in case["recall"]]
        pairs = [(p, t) for _, p, t in items]
        row: dict = {"nll": {}, "prefill_s": {}}
        ev0 = models[False]
        if case.get("check", False):  # the full-context NLL must equal ctxzip's (first cases only)
            row["full_check"] = _means(items, ev0.score_items(case["context"], pairs))
        for eager, ev in models.items():
            pre = torch.tensor([list(ev.start_ids) + list(case["context"])[:-1]])
            configs = {}
            for keep in payload["keeps"]:
                for name, press in _presses(kp, keep, eager).items():
                    configs[(name, keep)] = press
            t0 = time.perf_counter()
            caches = compressed_caches(ev.model, pre, configs)
            row["prefill_s"]["eager" if eager else "sdpa"] = time.perf_counter() - t0
            for (name, keep), cache in caches.items():

                def make_cache(m, ids, cache=cache, pre=pre):
                    if ids.shape != pre.shape:
                        raise RuntimeError("prefill ids differ from the scorer's")
                    return cache, ids.shape[1]

                scored = ev.score_items(case["context"], pairs, make_cache=make_cache)
                row["nll"].setdefault(name, {})[str(keep)] = _means(items, scored)
        row["wall_s"] = time.time() - t_case
        tmp = out_dir / f"{case['key']}.json.tmp"
        tmp.write_text(json.dumps(row))
        tmp.rename(out_dir / f"{case['key']}.json")
        print(f"kvpress case {case['key']} done in {row['wall_s']:.0f}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
