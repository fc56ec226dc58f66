"""Speed of LLMLingua-2 compression: ctxzip's TokenClassifierCompressor vs the `llmlingua` 0.2.2
anchor, same token-classification model, same inputs, side by side in one process.

Model: ctxzip's distilled default classifier (MiniLM), saved once to a temporary folder whose
name contains "bert-base-multilingual-cased" (the anchor picks its `##` word-merging rule by
that substring). The anchor's constructor fetches a GPT tokenizer from the network; it is
replaced here (benchmark only) by a stand-in that counts with the classifier's own tokenizer,
and ctxzip is run with ``token_weights="classifier"`` so both count the same units.

Inputs: the first 2k / 10k / 50k whitespace words of `pydoc_data.topics` (topics in key order).
Rows, interleaved per repetition (order reversed every other repetition): anchor
``compress_prompt_llmlingua2`` (per-chunk percentile), ctxzip exact (``mode="chunk"``, torch
fp32), ctxzip exact on ONNX Runtime (``fast="onnx-exact"``: fp32, chunks with a word within
``EXACT_MARGIN`` of its threshold re-classified with torch; the largest ONNX-vs-torch probability
difference and the re-classified chunk count are recorded untimed), ctxzip ``fast="onnx-int8"`` (ONNX Runtime, SmoothQuant-smoothed dynamic int8) and
``fast="bf16"`` (torch bfloat16). Reported per size: wall seconds and process CPU seconds per run,
words/s (median wall), speed-up vs the anchor (median wall; also median CPU time, the fairer
figure on a loaded machine), and the fraction of word keep-decisions identical to the anchor's.
Both sides use the same torch thread count (``--threads``, default 2); ONNX Runtime gets the same
number of intra-op threads. The one-time ONNX conversion (cached on disk afterwards) is timed
separately as ``setup_seconds`` and not counted in words/s.

    python benchmarks/prompt_speed.py            # 2k, 10k (5 reps), 50k words (2 reps): ~5-6 min idle
    python benchmarks/prompt_speed.py --quick    # 2k, 10k words, 1 repetition
    python benchmarks/prompt_speed.py --classifier-asset DIR --out OUT.json   # a candidate default
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"


def words_text(n_words: int) -> str:
    import pydoc_data.topics as t
    import re

    full = "\n\n".join(t.topics[k] for k in sorted(t.topics))
    pos = [m.end() for m in re.finditer(r"\S+", full)]
    if n_words > len(pos):
        full = (full + "\n\n") * (n_words // len(pos) + 1)
        pos = [m.end() for m in re.finditer(r"\S+", full)]
    return full[: pos[n_words - 1]]


def agreement(a_words, a_labels, b_words, b_labels) -> dict:
    if a_words == b_words:
        same = sum(x == y for x, y in zip(a_labels, b_labels))
        return {"aligned_words": len(a_words), "word_lists_equal": True, "identical": same / max(len(a_words), 1)}
    sm = difflib.SequenceMatcher(a=a_words, b=b_words, autojunk=False)
    same = n = 0
    for blk in sm.get_matching_blocks():
        for i in range(blk.size):
            n += 1
            same += a_labels[blk.a + i] == b_labels[blk.b + i]
    return {"aligned_words": n, "word_lists_equal": False, "anchor_words": len(a_words), "ctxzip_words": len(b_words),
            "identical": same / max(n, 1)}


def load_classifier(asset: str | None):
    """``(model, tokenizer)``: a distilled classifier folder (``export_partial`` output) or,
    without one, the shipped default."""
    from ctxzip.prompt.distill import load_default_classifier, load_partial

    return load_partial(asset) if asset else load_default_classifier()


def macs_per_token(cfg, n: int) -> dict:
    """Multiply-accumulates per token of a BERT-style encoder on an ``n``-token sequence:
    ``linear`` (q, k, v, attention output: 4 h^2; FFN in and out: 2 h i; per layer) and
    ``attention`` (scores and weighted values: 2 n h per layer)."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return {"linear": layers * (4 * h * h + 2 * h * i), "attention": layers * 2 * n * h}


def make_anchor(model, tok):
    """``(anchor, folder)``: ``llmlingua``'s LLMLingua-2 ``PromptCompressor`` on ``model``, saved
    to a temporary folder (removed at exit) whose name selects the anchor's ``##`` word merging,
    with its network-fetched GPT tokenizer replaced by ``tok`` (benchmark-only patch)."""
    import tiktoken
    from llmlingua import PromptCompressor

    tmp_root = tempfile.mkdtemp(prefix="ctxzip-speed-")
    atexit.register(shutil.rmtree, tmp_root, ignore_errors=True)
    tmp = Path(tmp_root) / "bert-base-multilingual-cased-ctxzip-minilm"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)

    class Standin:
        def encode(self, s):
            return tok(s, add_special_tokens=False)["input_ids"]

        def decode(self, ids):
            return tok.decode(ids)

    tiktoken.encoding_for_model = lambda name: Standin()  # benchmark-only patch (offline)
    return PromptCompressor(model_name=str(tmp), device_map="cpu", use_llmlingua2=True), tmp


def write_report(info: dict, out: str | Path, plot_fn) -> None:
    """Write ``info`` as JSON to ``out`` and ``plot_fn(info, png)`` next to it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(info, indent=1))
    plot_fn(info, Path(out).with_suffix(".png"))
    print(f"wrote {out}")


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def _cpu_flags() -> list[str]:
    from ctxzip.prompt.onnx_backend import cpu_flags

    return sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "avx512_vnni", "avx_vnni", "amx", "avx2", "avx512f")))


def plot(info: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    results = info["results"]
    names = list(results[0]["words_per_s"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["words"] for r in results]
    for name in names:
        ax.plot(xs, [r["words_per_s"][name] for r in results], marker="o", label=name)
        if name != "anchor":
            ys = [r["speedup_vs_anchor"][name] for r in results]
            ax2.plot(xs, ys, marker="o", label=name)
            for x, y, r in zip(xs, ys, results):
                ax2.annotate(f"{100 * r['agreement'][name]['identical']:.1f}%", (x, y), textcoords="offset points",
                             xytext=(0, 6), ha="center", fontsize=7)
    ax2.axhline(3.0, color="grey", ls="--", lw=1, label="goal 3x")
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xticks(xs, [f"{x // 1000}k" for x in xs])
        a.minorticks_off()
        a.set_xlabel("input words (pydoc_data.topics)")
        a.legend(fontsize=8)
    m = info["machine"]
    ax.set_ylabel("words / s (median wall)")
    ax.set_title(f"LLMLingua-2, same MiniLM, {m['torch_threads']} threads, load {m['loadavg'][0]:.0f}", fontsize=10)
    ax2.set_ylabel("speed-up vs llmlingua 0.2.2")
    ax2.set_title("labels: % keep-decisions identical to the anchor", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def exact_onnx_check(c, text: str, rate: float) -> dict:
    """Untimed: how far ONNX Runtime fp32 keep probabilities are from torch fp32 on this text,
    and how many chunks ``fast="onnx-exact"`` re-classified with torch (a word within
    ``EXACT_MARGIN`` of its chunk's threshold)."""
    import numpy as np

    from ctxzip.budget import Budget
    from ctxzip.prompt.token_classifier import EXACT_MARGIN

    tok = c.classifier()[1]
    ids = np.asarray(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
    chunks = c.chunk(ids)
    diff = np.abs(c._token_probs(ids, chunks) - c._token_probs(ids, chunks, use_torch=True))
    rechecked: list[int] = []
    real = c._token_probs

    def spy(ids_, chunks_, *, use_torch=False):
        if use_torch:
            rechecked.append(len(chunks_))
        return real(ids_, chunks_, use_torch=use_torch)

    c._token_probs = spy
    try:
        c.compress(text, budget=Budget(rate=rate))
    finally:
        del c._token_probs
    return {"chunks": len(chunks), "rechecked_chunks": sum(rechecked), "margin": EXACT_MARGIN,
            "max_abs_token_prob_diff": float(diff.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--reps", type=int, default=None, help="repetitions per size (default 5, 2 for >= 50k words)")
    ap.add_argument("--methods", nargs="*", default=["exact", "exact-onnx", "fast-onnx-int8", "fast-bf16"],
                    help="ctxzip rows: exact, exact-onnx, fast-onnx-int8, fast-onnx, fast-bf16, fast-int8")
    ap.add_argument("--rate", type=float, default=0.33)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT / "prompt_speed.json"))
    ap.add_argument("--classifier-asset", default=None,
                    help="time this distilled classifier folder (export_partial output) instead of the shipped default")
    ap.add_argument("--onnx-options", type=json.loads, default=None,
                    help='JSON of OnnxClassifier options for the ONNX rows, e.g. \'{"fp32_ffn_out": [0]}\' '
                         '(benchmarks/prompt_int8_ablation.py measures their agreement)')
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    sizes = args.sizes or ([2000, 10000] if args.quick else [2000, 10000, 50000])

    def reps_for(n: int) -> int:
        if args.reps:
            return args.reps
        return 1 if args.quick else (2 if n >= 50000 else 5)

    import torch

    from ctxzip.budget import Budget
    from ctxzip.prompt import TokenClassifierCompressor
    from ctxzip.prompt.onnx_backend import cpu_has_vnni

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    model, tok = load_classifier(args.classifier_asset)
    anchor, tmp = make_anchor(model, tok)

    common = dict(model=str(tmp), tokenizer=tok, token_weights="classifier", return_word_labels=True, mode="chunk")
    fast_of = {"exact": False, "exact-onnx": "onnx-exact", "fast-onnx-int8": "onnx-int8", "fast-onnx": "onnx", "fast-bf16": "bf16", "fast-int8": "int8"}
    ours = {m: TokenClassifierCompressor(fast=fast_of[m], onnx_options=args.onnx_options if "onnx" in m else None, **common)
            for m in args.methods}
    setup = {}
    for name, c in ours.items():
        t0 = time.perf_counter()
        c.classifier()
        setup[name] = time.perf_counter() - t0
        c.compress("warm up the model.", budget=Budget(rate=0.5))
    anchor.compress_prompt_llmlingua2(["warm up the model."], rate=0.5)

    results = []
    for n in sizes:
        text = words_text(n)
        times: dict[str, list[float]] = {k: [] for k in ["anchor", *ours]}
        cpu: dict[str, list[float]] = {k: [] for k in ["anchor", *ours]}
        labels: dict[str, tuple] = {}
        load_before = os.getloadavg()[0]
        for rep in range(reps_for(n)):
            order = ["anchor", *ours] if rep % 2 == 0 else [*reversed(list(ours)), "anchor"]
            for name in order:
                c0 = time.process_time()
                t0 = time.perf_counter()
                if name == "anchor":
                    r = anchor.compress_prompt_llmlingua2([text], rate=args.rate, return_word_label=True)
                    dt = time.perf_counter() - t0
                    dc = time.process_time() - c0
                    pairs = [p.rsplit(" ", 1) for p in r["fn_labeled_original_prompt"].split("\t\t|\t\t")]
                    labels[name] = ([w for w, _ in pairs], [int(lab) for _, lab in pairs])
                else:
                    r = ours[name].compress(text, budget=Budget(rate=args.rate))
                    dt = time.perf_counter() - t0
                    dc = time.process_time() - c0
                    labels[name] = (r.details["words"], r.details["word_labels"])
                times[name].append(dt)
                cpu[name].append(dc)
                print(f"{n} words {name}: {dt:.2f}s wall, {dc:.2f}s cpu", flush=True)
        row = {"words": n, "rate": args.rate, "reps": reps_for(n), "loadavg_1min": [load_before, os.getloadavg()[0]],
               "seconds": times, "cpu_seconds": cpu, "words_per_s": {}, "speedup_vs_anchor": {},
               "cpu_speedup_vs_anchor": {}, "agreement": {}}
        a_med = statistics.median(times["anchor"])
        a_cpu = statistics.median(cpu["anchor"])
        for name, ts in times.items():
            med = statistics.median(ts)
            row["words_per_s"][name] = n / med
            row["speedup_vs_anchor"][name] = a_med / med
            row["cpu_speedup_vs_anchor"][name] = a_cpu / statistics.median(cpu[name])
            if name != "anchor":
                row["agreement"][name] = agreement(*labels["anchor"], *labels[name])
        row["kept_fraction_anchor"] = sum(labels["anchor"][1]) / max(len(labels["anchor"][1]), 1)
        if "exact-onnx" in ours:
            row["exact_onnx_check"] = exact_onnx_check(ours["exact-onnx"], text, args.rate)
        results.append(row)
        print(json.dumps({k: row[k] for k in ("words", "words_per_s", "speedup_vs_anchor", "cpu_speedup_vs_anchor")}), flush=True)
        print(json.dumps({k: v["identical"] for k, v in row["agreement"].items()}), flush=True)
        partial = {"partial": True, "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(partial, indent=1))

    info = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                    "loadavg": os.getloadavg(), "onnxruntime": _version("onnxruntime"),
                    "cpu_flags": _cpu_flags(), "cpu_vnni": cpu_has_vnni()},
        "command": " ".join(["python", "benchmarks/prompt_speed.py", *sys.argv[1:]]),
        "anchor": "llmlingua 0.2.2 compress_prompt_llmlingua2 (tiktoken replaced by the classifier tokenizer)",
        "model": (f"distilled MiniLM token classifier from {args.classifier_asset} (same weights for both)" if args.classifier_asset
                  else "ctxzip default distilled MiniLM token classifier (same weights for both), from ctxzip/assets"),
        "setup_seconds": setup,
        "onnx_options": args.onnx_options,
        # what the int8 graph was actually built with (OnnxClassifier resolves weights=None per CPU)
        "onnx_int8_weights": ours["fast-onnx-int8"]._ort.weights if "fast-onnx-int8" in ours else None,
        "goal": "exact mode: identical decisions, faster than the anchor; fast mode >= 3x the anchor's words/s at 10k and 50k words with >= 98% identical keep-decisions",
        "results": results,
    }
    write_report(info, args.out, plot)


if __name__ == "__main__":
    main()
