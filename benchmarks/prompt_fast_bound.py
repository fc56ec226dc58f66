"""Can ``fast="onnx-int8"`` reach 3x the anchor's words/s on this CPU? A time budget per token
set against where ONNX Runtime spends its time.

Issue 3's fast-mode goal is >= 3x ``llmlingua`` 0.2.2's LLMLingua-2 words/s at 10k and 50k
words with >= 98% of word keep-decisions identical (``benchmarks/prompt_speed.py`` measures it).
This script asks how far any kernel work could take the same model on this CPU:

1. **Budget.** The anchor and ctxzip's ``onnx-int8`` mode run on the same inputs as
   ``prompt_speed.py`` (the first N words of ``pydoc_data.topics``, same classifier, same
   threads). ctxzip's time outside the classifier (tokenizing, word merging, selection,
   rendering) is measured by timing :meth:`OnnxClassifier.map`. Reaching 3x leaves
   ``anchor/3 - outside`` seconds for inference; with the chunks spread over ``--threads``
   one-thread workers that is a budget in microseconds of one core per token.
2. **Profile.** ONNX Runtime's own profiler, one thread, one real 512-token chunk, three graphs
   of the same model: fp32 (``fast="onnx"``), int8 with unsigned weights (``"u8"``, the
   default on x86 without VNNI: the only int8 graph that keeps >= 98% there) and int8 with
   signed weights (``"s8"``, faster u8s8 kernels that saturate without VNNI). Operator time is
   grouped into linear products (``MatMul``, ``Gemm``, the int8 matmuls and their activation
   quantization), attention (``MultiHeadAttention``/``Attention``) and everything else
   (layer norms, GELU, adds, embeddings). Linear MACs per token come from the config, so the
   achieved rates are printed beside the times.
3. **Lower bound.** For each int8 graph: its measured linear products, plus attention at the
   fp32 graph's achieved linear-product rate (a dense fp32 GEMM is the best case for the
   score and value products), plus nothing for the other operators. If that bound is above
   the budget, no tuning of attention or elementwise kernels gets this graph to 3x.
4. **Shorter windows** (the one work reduction that keeps the model): classifier windows of
   ``--windows`` tokens instead of 512, with the per-chunk percentile taken either over the
   shorter chunks (``max_seq_len``, the public option) or over the anchor's 512-token chunks
   (inference in sub-windows, decisions per anchor chunk); agreement with exact decisions and
   speed-up over the anchor at the first size.

Writes ``benchmarks/results/prompt_fast_bound.json`` and a PNG.

    python benchmarks/prompt_fast_bound.py           # 10k (3 reps) and 50k words (1 rep): ~4 min idle
    python benchmarks/prompt_fast_bound.py --quick   # 2k words, 1 rep, 256-token windows only
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results"

from prompt_speed import (  # noqa: E402
    _cpu_flags,
    _version,
    agreement,
    load_classifier,
    macs_per_token,
    make_anchor,
    words_text,
    write_report,
)

GOAL_SPEEDUP = 3.0
GOAL_AGREEMENT = 0.98
ATTENTION_OPS = {"MultiHeadAttention", "Attention", "QAttention"}


def op_class(op: str) -> str:
    """``"linear"``, ``"attention"`` or ``"other"`` for an ONNX Runtime operator type."""
    if op in ATTENTION_OPS:
        return "attention"
    if "MatMul" in op or op in ("Gemm", "DynamicQuantizeLinear"):
        return "linear"
    return "other"


def profile_graph(clf, x, runs: int) -> dict:
    """Mean operator time per run of ``clf``'s graph on ``x`` (one thread), grouped by
    :func:`op_class`, from ONNX Runtime's profiler."""
    import numpy as np

    prof_dir = tempfile.mkdtemp(prefix="ctxzip-prof-")
    sess = clf._session(1, profile=str(Path(prof_dir) / "ort"))  # the graph's own session options
    feed = {"input_ids": x, "attention_mask": np.ones_like(x)}
    walls = []
    for r in range(runs + 2):
        t0 = time.perf_counter()
        sess.run(None, feed)
        if r >= 2:
            walls.append(time.perf_counter() - t0)
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    shutil.rmtree(prof_dir, ignore_errors=True)
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e6
    total_runs = runs + 2  # the profiler saw the warm-up runs too
    per_op = {k: v / total_runs for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}
    classes = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for op, s in per_op.items():
        classes[op_class(op)] += s
    return {"seconds_per_run_median_wall": statistics.median(walls), "op_seconds": per_op, "class_seconds": classes}


def time_int8(c, text: str, rate: float) -> dict:
    """One ``compress`` of ``c`` (``fast="onnx-int8"``): wall seconds, seconds inside
    :meth:`OnnxClassifier.map`, and the sequences' token count."""
    from ctxzip.budget import Budget

    ort_clf = c._ort
    inner = ort_clf.map
    seen: dict = {}

    def timed(seqs, progress=None):
        t0 = time.perf_counter()
        out = inner(seqs, progress)
        seen["map"] = seen.get("map", 0.0) + time.perf_counter() - t0
        seen["tokens"] = seen.get("tokens", 0) + sum(len(s) for s in seqs)
        seen["chunks"] = seen.get("chunks", 0) + len(seqs)
        return out

    ort_clf.map = timed
    try:
        t0 = time.perf_counter()
        r = c.compress(text, budget=Budget(rate=rate))
        wall = time.perf_counter() - t0
    finally:
        del ort_clf.map
    return {"wall": wall, "inference": seen["map"], "tokens": seen["tokens"], "chunks": seen["chunks"],
            "words": r.details["words"], "labels": r.details["word_labels"]}


def windowed(c, window: int, anchor_chunks: bool):
    """``c`` classifying in windows of ``window`` tokens. ``anchor_chunks``: inference in
    sub-windows of each 512-token anchor chunk, percentile decisions still per anchor chunk;
    else the public ``max_seq_len`` (shorter chunks for both)."""
    if not anchor_chunks:
        c.max_seq_len = window
        return c
    from dataclasses import replace

    splitter = replace(c, max_seq_len=window)
    splitter._tables = c._vocab_tables()
    inner = c._token_probs

    def token_probs(ids, chunks, *, use_torch=False):
        pieces = [(a + x, a + y) for a, b in chunks for x, y in splitter.chunk(ids[a:b])]
        return inner(ids, pieces, use_torch=use_torch)

    c._token_probs = token_probs
    return c


def plot(info: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.4, 1]})
    rows = [(name, g["class_us_per_token"]) for name, g in info["profile"]["graphs"].items()]
    rows += [(f"{name} bound", {"linear": b["linear_us"], "attention": b["attention_us"], "other": 0.0})
             for name, b in info["lower_bound"].items()]
    colors = {"linear": "tab:blue", "attention": "tab:orange", "other": "tab:grey"}
    for y, (_name, cl) in enumerate(rows):
        left = 0.0
        for k in ("linear", "attention", "other"):
            ax.barh(y, cl[k], left=left, color=colors[k], label=k if y == 0 else None)
            left += cl[k]
        ax.text(left, y, f" {left:.0f}", va="center", fontsize=8)
    for b, ls in zip(info["budget"], ["--", ":", "-."]):
        ax.axvline(b["budget_us_per_token_core"], color="red", ls=ls, lw=1,
                   label=f"3x budget at {b['words'] // 1000}k words ({b['budget_us_per_token_core']:.0f})")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("microseconds of one core per token (one 512-token chunk)")
    ax.set_title("where the time goes vs the 3x budget", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    w = info.get("windows") or []
    b0 = info["budget"][0]
    ax2.scatter(b0["int8_speedup_vs_anchor"], 100 * b0["int8_identical"], color="tab:green")
    ax2.annotate("512 tokens (shipped onnx-int8)", (b0["int8_speedup_vs_anchor"], 100 * b0["int8_identical"]),
                 fontsize=7, textcoords="offset points", xytext=(4, -9))
    for r in w:
        ax2.scatter(r["speedup_vs_anchor"], 100 * r["identical"], color="tab:purple")
        ax2.annotate(r["label"], (r["speedup_vs_anchor"], 100 * r["identical"]), fontsize=7,
                     textcoords="offset points", xytext=(4, 2))
    ax2.axvline(GOAL_SPEEDUP, color="grey", ls="--", lw=1)
    ax2.axhline(100 * GOAL_AGREEMENT, color="grey", ls="--", lw=1)
    ax2.set_xlabel("speed-up vs llmlingua 0.2.2 (wall)")
    ax2.set_ylabel("% keep-decisions identical")
    ax2.set_title(f"onnx-int8 with shorter windows, {w[0]['words'] // 1000 if w else '?'}k words; goal: top right",
                  fontsize=10)
    ax2.set_xlim(left=1.0, right=max([GOAL_SPEEDUP + 0.3] + [r["speedup_vs_anchor"] + 0.3 for r in w]))
    ax2.set_ylim(top=100.5)
    ax2.axvspan(GOAL_SPEEDUP, ax2.get_xlim()[1], ymin=0, ymax=1, color="tab:green", alpha=0.06)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2k words, 1 rep, 256-token windows")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="input sizes in words (default 10000 50000)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per size (default 3, 1 for >= 50k words)")
    ap.add_argument("--windows", type=int, nargs="*", default=None, help="shorter windows (default 384 256)")
    ap.add_argument("--profile-runs", type=int, default=10)
    ap.add_argument("--rate", type=float, default=0.33)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT / "prompt_fast_bound.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    sizes = args.sizes or ([2000] if args.quick else [10000, 50000])
    windows = args.windows if args.windows is not None else ([256] if args.quick else [384, 256])
    if any(n < 1 for n in sizes) or any(not 16 <= w < 512 for w in windows) or args.profile_runs < 1:
        ap.error("--sizes must be positive, --windows in [16, 512), --profile-runs >= 1")

    def reps_for(n: int) -> int:
        return args.reps or (1 if args.quick or n >= 50000 else 3)

    import numpy as np
    import torch

    from ctxzip.budget import Budget
    from ctxzip.prompt import TokenClassifierCompressor
    from ctxzip.prompt.onnx_backend import OnnxClassifier, cpu_has_vnni

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    model, tok = load_classifier(None)
    anchor, folder = make_anchor(model, tok)
    common = dict(model=str(folder), tokenizer=tok, token_weights="classifier", return_word_labels=True, mode="chunk")
    int8 = TokenClassifierCompressor(fast="onnx-int8", **common)
    int8.classifier()
    int8.compress("warm up the model.", budget=Budget(rate=0.5))
    anchor.compress_prompt_llmlingua2(["warm up the model."], rate=0.5)
    workers = args.threads

    # 1. budget ---------------------------------------------------------------------------
    budget, anchor_seconds = [], {}
    for n in sizes:
        text = words_text(n)
        a_times, runs = [], []
        for rep in range(reps_for(n)):
            for name in (["anchor", "int8"] if rep % 2 == 0 else ["int8", "anchor"]):
                if name == "anchor":
                    t0 = time.perf_counter()
                    r = anchor.compress_prompt_llmlingua2([text], rate=args.rate, return_word_label=True)
                    a_times.append(time.perf_counter() - t0)
                    pairs = [p.rsplit(" ", 1) for p in r["fn_labeled_original_prompt"].split("\t\t|\t\t")]
                    a_labels = ([w for w, _ in pairs], [int(lab) for _, lab in pairs])
                else:
                    runs.append(time_int8(int8, text, args.rate))
        a_med = statistics.median(a_times)
        anchor_seconds[n] = a_med
        wall = statistics.median(r["wall"] for r in runs)
        inference = statistics.median(r["inference"] for r in runs)
        outside = statistics.median(r["wall"] - r["inference"] for r in runs)
        tokens = runs[0]["tokens"]
        target = a_med / GOAL_SPEEDUP
        row = {
            "words": n, "reps": reps_for(n), "anchor_seconds": a_times, "anchor_words_per_s": n / a_med,
            "int8_seconds": [r["wall"] for r in runs], "int8_inference_seconds": [r["inference"] for r in runs],
            "int8_speedup_vs_anchor": a_med / wall,
            "int8_identical": agreement(*a_labels, runs[0]["words"], runs[0]["labels"])["identical"],
            "chunks": runs[0]["chunks"], "tokens": tokens, "workers": workers,
            "target_seconds_for_3x": target, "outside_inference_seconds": outside,
            "budget_us_per_token_core": max(target - outside, 0.0) * workers / tokens * 1e6,
            "int8_us_per_token_core": inference * workers / tokens * 1e6,
        }
        row["needed_inference_speedup"] = row["int8_us_per_token_core"] / max(row["budget_us_per_token_core"], 1e-9)
        budget.append(row)
        print(f"{n} words: anchor {n / a_med:.0f} words/s, int8 {row['int8_speedup_vs_anchor']:.2f}x "
              f"({100 * row['int8_identical']:.2f}% identical); 3x leaves {row['budget_us_per_token_core']:.1f} "
              f"us/token/core for inference, int8 spends {row['int8_us_per_token_core']:.1f} "
              f"(needs {row['needed_inference_speedup']:.2f}x less)", flush=True)

    # 2. profile --------------------------------------------------------------------------
    ids = tok(words_text(2000), add_special_tokens=False)["input_ids"][:510]
    x = np.asarray([[tok.cls_token_id, *ids, tok.sep_token_id]], dtype=np.int64)
    n_tok = x.shape[1]
    macs = macs_per_token(model.config, n_tok)
    graphs = {"fp32": dict(quantize=False), "int8-u8": dict(quantize=True, weights="u8"),
              "int8-s8": dict(quantize=True, weights="s8")}
    prof = {}
    for name, opts in graphs.items():
        clf = OnnxClassifier(model, tok, threads=1, **opts)
        p = profile_graph(clf, x, args.profile_runs)
        cl = p["class_seconds"]
        p["class_us_per_token"] = {k: v / n_tok * 1e6 for k, v in cl.items()}
        p["us_per_token"] = sum(p["class_us_per_token"].values())
        p["linear_gmacs_per_s"] = macs["linear"] * n_tok / cl["linear"] / 1e9
        p["attention_gmacs_per_s"] = macs["attention"] * n_tok / cl["attention"] / 1e9 if cl["attention"] else None
        prof[name] = p
        print(f"{name}: {1e3 * p['seconds_per_run_median_wall']:.0f} ms per chunk; per token "
              + ", ".join(f"{k} {v:.1f} us" for k, v in p["class_us_per_token"].items())
              + f"; linear {p['linear_gmacs_per_s']:.0f} GMAC/s", flush=True)

    # 3. lower bound ----------------------------------------------------------------------
    peak = prof["fp32"]["linear_gmacs_per_s"]
    bound = {}
    for name in ("int8-u8", "int8-s8"):
        lin = prof[name]["class_us_per_token"]["linear"]
        att = macs["attention"] / (peak * 1e9) * 1e6
        bound[name] = {"linear_us": lin, "attention_us": att, "us_per_token": lin + att,
                       "fits_budget": {str(b["words"]): lin + att <= b["budget_us_per_token_core"] for b in budget}}
        print(f"{name} bound: {lin + att:.1f} us/token (linear {lin:.1f} + attention at fp32 GEMM rate {att:.1f}) vs "
              + ", ".join(f"{b['budget_us_per_token_core']:.1f} at {b['words'] // 1000}k" for b in budget), flush=True)

    # 4. shorter windows ------------------------------------------------------------------
    n0 = sizes[0]
    text = words_text(n0)
    exact = TokenClassifierCompressor(fast=False, **common)
    ref = exact.compress(text, budget=Budget(rate=args.rate)).details
    wrows = []
    for w in windows:
        for anchor_chunks in (False, True):
            c = windowed(TokenClassifierCompressor(fast="onnx-int8", **common), w, anchor_chunks)
            c.compress("warm up the model.", budget=Budget(rate=0.5))
            times = []
            for _ in range(max(1, min(2, reps_for(n0)))):
                t0 = time.perf_counter()
                d = c.compress(text, budget=Budget(rate=args.rate)).details
                times.append(time.perf_counter() - t0)
            ag = agreement(ref["words"], ref["word_labels"], d["words"], d["word_labels"])
            label = f"{w} tokens, {'anchor' if anchor_chunks else 'own'} chunks"
            wrows.append({"words": n0, "window": w, "percentile_over": "anchor chunks" if anchor_chunks else "own chunks",
                          "label": label, "seconds": times, "identical": ag["identical"],
                          "speedup_vs_anchor": anchor_seconds[n0] / statistics.median(times)})
            print(f"window {label}: {wrows[-1]['speedup_vs_anchor']:.2f}x, {100 * ag['identical']:.2f}% identical",
                  flush=True)

    info = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": args.threads, "python": platform.python_version(), "loadavg": os.getloadavg(),
                    "onnxruntime": _version("onnxruntime"), "cpu_flags": _cpu_flags(), "cpu_vnni": cpu_has_vnni()},
        "command": " ".join(["python", "benchmarks/prompt_fast_bound.py", *sys.argv[1:]]),
        "anchor": "llmlingua 0.2.2 compress_prompt_llmlingua2 (tiktoken replaced by the classifier tokenizer)",
        "model": "ctxzip default distilled MiniLM token classifier (same weights for both)",
        "rate": args.rate,
        "goal": "fast mode >= 3x the anchor's words/s at 10k and 50k words with >= 98% identical keep-decisions",
        "budget": budget,
        "profile": {"tokens": n_tok, "runs": args.profile_runs, "threads": 1, "macs_per_token": macs, "graphs": prof},
        "lower_bound": bound,
        "windows": wrows,
    }
    write_report(info, args.out, plot)


if __name__ == "__main__":
    main()
