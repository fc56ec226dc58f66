"""kvpress side of benchmarks/kvcache_quality.py - runs inside kvpress's own venv.

kvpress pins transformers < 5.3, so it cannot share ctxzip's environment. The main script
writes the evaluation cases as token ids (so both sides see identical tokens - no tokenizer,
hence no automatic BOS, is involved here), this script loads SmolLM2 from the same packaged GGUF,
prefills each context under a kvpress press and scores the targets with the very same
procedure (``ctxzip.eval.metric.ContextEvaluator.score_items``, imported from the repository),
and writes the compressed-context NLLs as JSON.

usage: python _kvpress_runner.py IN.json OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ctxzip repository


def _presses(kp, keep: float, eager: bool):
    cr = 1.0 - keep
    out = {
        "streaming_llm": lambda: kp.StreamingLLMPress(compression_ratio=cr),
        "snapkv": lambda: kp.SnapKVPress(compression_ratio=cr),
        "expected_attention": lambda: kp.ExpectedAttentionPress(compression_ratio=cr),
        "knorm": lambda: kp.KnormPress(compression_ratio=cr),
        "tova": lambda: kp.TOVAPress(compression_ratio=cr),
    }
    if eager:
        out = {"observed_attention": lambda: kp.ObservedAttentionPress(compression_ratio=cr)}
    return out


def main() -> int:
    inp, outp = sys.argv[1], sys.argv[2]
    payload = json.loads(Path(inp).read_text())
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("KVPRESS_THREADS", "1")))
    import kvpress as kp
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from ctxzip.eval.metric import ContextEvaluator, _means

    gguf_dir, gguf_file = payload["gguf_dir"], payload["gguf_file"]
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    results = {"kvpress_version": kp.__version__ if hasattr(kp, "__version__") else "?",
               "transformers_version": transformers.__version__, "rows": []}
    for eager in (False, True):
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32,
            attn_implementation="eager" if eager else "sdpa",
        ).eval()
        ev = ContextEvaluator(model, tok)
        ev.start_ids = payload["start_ids"]
        ev.max_batch = payload.get("max_batch", 32)
        for ci, case in enumerate(payload["cases"]):
            items = [("continuation", [], case["continuation"])]
            items += [("recall", c, s) for c, s in case["recall"]]
            if not eager and ci == 0:  # sanity: the full-context NLL must match ctxzip's side
                full = ev.score_items(case["context"], [(p, t) for _, p, t in items])
                results["full_check"] = _means(items, full)
            for keep in payload["keeps"]:
                for name, factory in _presses(kp, keep, eager).items():
                    press = factory()
                    times = []

                    def make_cache(m, ids, press=press, times=times):
                        cache = DynamicCache()
                        t0 = time.perf_counter()
                        with torch.no_grad(), press(m):
                            m(ids, past_key_values=cache, use_cache=True)
                        times.append(time.perf_counter() - t0)
                        return cache, ids.shape[1]

                    scored = ev.score_items(case["context"], [(p, t) for _, p, t in items],
                                            make_cache=make_cache)
                    results["rows"].append({
                        "case": ci, "press": name, "keep": keep, "nll": _means(items, scored),
                        "prefill_s": times[0] if times else None,
                    })
                    print(f"kvpress {name} keep={keep} case={ci}", file=sys.stderr, flush=True)
        del model
    Path(outp).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
