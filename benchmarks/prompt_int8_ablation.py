"""Which int8 products cost agreement: ``fast="onnx-int8"`` variants against exact decisions.

The fast mode's goal is >= 98% of word keep-decisions identical to the anchor's per-chunk
percentile mode (``benchmarks/prompt_speed.py``). ctxzip's exact mode (``mode="chunk"``, torch
fp32) reproduces the anchor's decisions word for word, so this script compares each int8 variant
with it directly - no anchor, no timing, only agreement - on the same input as the speed
benchmark (the first ``--words`` whitespace words of ``pydoc_data.topics``, default 10k).

Variants (:class:`ctxzip.prompt.onnx_backend.OnnxClassifier` options, passed through
``TokenClassifierCompressor(onnx_options=...)``):

- ``all-int8``: every encoder product quantized (``fp32_ffn_out=()``), SmoothQuant alpha 0.75;
- ``alpha-0.65`` / ``alpha-0.85``: the same with another smoothing strength;
- ``ffn-out-fp32-L0``, ``-L0-1`` (the shipped default), ``-L4-5``, ``-all``: the FFN output
  product (after the GELU) of those encoder layers left in fp32;
- ``L0-1-weights-s8`` / ``-u8`` / ``-s7``, ``all-int8-weights-s8`` / ``-u8``: a fixed weight
  type whatever the CPU - signed 8-bit, unsigned 8-bit, signed 7-bit (the other int8 rows take
  the default, ``OnnxClassifier(weights=None)``: ``"u8"`` on x86 CPUs without VNNI, whose u8s8
  kernels can saturate 16-bit pair sums, ``"s8"`` elsewhere);
- ``onnx-fp32``: no quantization at all (``fast="onnx"``), the floor of what ONNX Runtime's
  fp32 kernels change.

Also recorded per variant: the share of matrix-product FLOPs left in fp32 (per token, encoder
linear layers only; attention score products and the head excluded).

    python benchmarks/prompt_int8_ablation.py                       # shipped default, 10k words: ~6 min
    python benchmarks/prompt_int8_ablation.py --quick --out /tmp/a.json  # 2k words, 3 variants
    python benchmarks/prompt_int8_ablation.py --classifier-asset DIR --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results"

from prompt_speed import _version, agreement, load_classifier, macs_per_token, words_text  # noqa: E402

VARIANTS: dict[str, tuple[str, dict]] = {
    "all-int8": ("onnx-int8", {"fp32_ffn_out": ()}),
    "alpha-0.65": ("onnx-int8", {"fp32_ffn_out": (), "alpha": 0.65}),
    "alpha-0.85": ("onnx-int8", {"fp32_ffn_out": (), "alpha": 0.85}),
    "ffn-out-fp32-L0": ("onnx-int8", {"fp32_ffn_out": (0,)}),
    "ffn-out-fp32-L0-1": ("onnx-int8", {"fp32_ffn_out": (0, 1)}),
    "ffn-out-fp32-L4-5": ("onnx-int8", {"fp32_ffn_out": (4, 5)}),
    "ffn-out-fp32-all": ("onnx-int8", {"fp32_ffn_out": tuple(range(64))}),
    "L0-1-weights-s8": ("onnx-int8", {"fp32_ffn_out": (0, 1), "weights": "s8"}),
    "L0-1-weights-u8": ("onnx-int8", {"fp32_ffn_out": (0, 1), "weights": "u8"}),
    "L0-1-weights-s7": ("onnx-int8", {"fp32_ffn_out": (0, 1), "weights": "s7"}),
    "all-int8-weights-s8": ("onnx-int8", {"fp32_ffn_out": (), "weights": "s8"}),
    "all-int8-weights-u8": ("onnx-int8", {"fp32_ffn_out": (), "weights": "u8"}),
    "onnx-fp32": ("onnx", {}),
}


def fp32_flop_share(cfg, fp32_layers: tuple[int, ...]) -> float:
    """Share of the encoder's linear-layer FLOPs per token (:func:`prompt_speed.macs_per_token`)
    in the FFN-output products (``h x i`` each) of ``fp32_layers``."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kept = sum(h * i for layer in fp32_layers if layer < n)
    return kept / macs_per_token(cfg, 1)["linear"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2k words, three variants")
    ap.add_argument("--words", type=int, nargs="*", default=None, help="input sizes in words (default 10000)")
    ap.add_argument("--rate", type=float, default=0.33)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)} (default: all)")
    ap.add_argument("--classifier-asset", default=None,
                    help="a distilled classifier folder (export_partial output) instead of the shipped default")
    ap.add_argument("--out", default=str(OUT / "prompt_int8_ablation.json"))
    args = ap.parse_args()
    if args.words is None:
        args.words = [2000] if args.quick else [10000]
    if args.variants is None:
        args.variants = ["all-int8", "ffn-out-fp32-L0-1", "onnx-fp32"] if args.quick else list(VARIANTS)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if any(n < 1 for n in args.words):
        ap.error("--words must be positive")

    import torch

    from ctxzip.budget import Budget
    from ctxzip.prompt import TokenClassifierCompressor
    from ctxzip.prompt.onnx_backend import FP32_FFN_OUT, cpu_has_vnni, default_weights

    torch.set_num_threads(args.threads)
    model, tok = load_classifier(args.classifier_asset)
    # the speed benchmark's settings: the anchor-compatible per-chunk mode, classifier tokens
    common = dict(model=model, classifier_tokenizer=tok, tokenizer=tok, token_weights="classifier",
                  return_word_labels=True, mode="chunk")
    exact = TokenClassifierCompressor(fast=False, **common)
    # each variant's graph is converted once (uncached, so no stale graph is measured) and
    # reused for every input size
    variants, build = {}, {}
    for name in args.variants:
        fast, opts = VARIANTS[name]
        variants[name] = TokenClassifierCompressor(fast=fast, onnx_options=dict(opts, cache=False), **common)
        t0 = time.perf_counter()
        variants[name].classifier()
        build[name] = time.perf_counter() - t0
    rows = []
    for n in args.words:
        text = words_text(n)
        ref = exact.compress(text, budget=Budget(rate=args.rate)).details
        for name, c in variants.items():
            fast, opts = VARIANTS[name]
            d = c.compress(text, budget=Budget(rate=args.rate)).details
            ag = agreement(ref["words"], ref["word_labels"], d["words"], d["word_labels"])
            layers = tuple(opts.get("fp32_ffn_out", FP32_FFN_OUT)) if fast == "onnx-int8" else ()
            row = {"words": n, "variant": name, "fast": fast,
                   "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()},
                   "identical": ag["identical"], "aligned_words": ag["aligned_words"],
                   "fp32_flop_share": 1.0 if fast == "onnx" else fp32_flop_share(model.config, layers),
                   "build_seconds": build[name]}
            rows.append(row)
            print(f"{n} words {name:>18}: {100 * ag['identical']:.2f}% identical "
                  f"(fp32 FLOP share {100 * row['fp32_flop_share']:.1f}%)", flush=True)
    info = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": args.threads, "python": platform.python_version(),
                    "cpu_vnni": cpu_has_vnni(), "default_weights": default_weights(),
                    "onnxruntime": _version("onnxruntime")},
        "command": " ".join(["python", "benchmarks/prompt_int8_ablation.py", *sys.argv[1:]]),
        "model": args.classifier_asset or "shipped default (ctxzip/assets/lingua2-minilm)",
        "reference": "ctxzip exact mode (mode='chunk', torch fp32), identical to llmlingua 0.2.2's decisions",
        "rate": args.rate,
        "goal": ">= 98% of word keep-decisions identical (issue 3's fast-mode goal)",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
