"""Prefill FLOPs and wall time vs visual tokens kept, per method, on a random-weight LLaVA-1.5.

Claim checked: pruning/merging visual tokens to 192/128/64 of LLaVA-1.5's 576 cuts the LLM's
prefill FLOPs roughly in proportion to the sequence it sees, and the hook-based wrapper's own
cost is small.

No VLM weights are reachable on this machine (no Hugging Face hub access), so the model is
LLaVA-1.5's token geometry (CLIP ViT-L/14-336: 576 patch tokens, features from layer -2; a
35-token system prompt + 24-token question; Vicuna-style MHA LLM) with random weights and
widths/depths scaled down to fit a shared CPU. Output agreement with the unpruned model is
reported **only as a mechanism check**: with random weights it says nothing about answer
quality. Quality needs real weights: see ``benchmarks/vision_eval.py``.

Every configuration is timed side by side with the unpruned anchor in the same process
(alternating runs), and ratios of medians are reported.

    python benchmarks/vision_prefill.py            # full run (~20 min on a busy shared 2-core CPU)
    python benchmarks/vision_prefill.py --quick    # smaller model, 1 rep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctxzip.budget import Budget  # noqa: E402
from ctxzip.vision import prune, unprune  # noqa: E402
from ctxzip.vision.profile import (  # noqa: E402
    agreement,
    count_prefill_flops,
    llava15_cpu,
    llava15_prompt,
    median,
)

METHODS = ["fastv", "visionzip", "tome", "prumerge", "globalcom2", "correlation"]


CPU = []  # process CPU seconds of every timed() call, in call order (less load-sensitive than wall time)


def timed(model, inputs) -> float:
    with torch.no_grad():
        c0, t0 = time.process_time(), time.perf_counter()
        model(**inputs, logits_to_keep=1)
        CPU.append(time.process_time() - c0)
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, 1 timed rep, budgets 64 and 192")
    ap.add_argument("--reps", type=int, default=2, help="timed reps per configuration (alternating with the anchor)")
    ap.add_argument("--keep", default="192,128,64", help="visual tokens kept per image")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/vision_prefill.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry = dict(vision_layers=12, vision_hidden=128, vision_heads=4, text_layers=8, text_hidden=256, text_heads=4)
    if args.quick:
        geometry = dict(vision_layers=6, vision_hidden=64, vision_heads=2, text_layers=4, text_hidden=128, text_heads=2)
        args.reps = 1
        args.keep = "192,64"
    keeps = [int(k) for k in args.keep.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    from tqdm import tqdm

    model = llava15_cpu(**geometry)
    inputs = llava15_prompt(model)
    base_cost = count_prefill_flops(model, inputs)
    ref_logits = base_cost.last_logits
    timed(model, inputs)  # warm-up

    # wrapper overhead with nothing pruned (scoring hooks run, the sequence is unchanged), for one
    # vision-stage method (CLIP-layer hooks) and FastV (LLM-layer hooks)
    overhead = {}
    for m in tqdm([m for m in ("visionzip", "fastv") if m in methods], desc="keep-all overhead"):
        prune(model, m, Budget(rate=1.0), **({"k": 2} if m == "fastv" else {}))
        t_w, t_b, c_w, c_b = [], [], [], []
        for _ in range(args.reps):
            t_w.append(timed(model, inputs))
            c_w.append(CPU[-1])
            unprune(model)
            t_b.append(timed(model, inputs))
            c_b.append(CPU[-1])
            prune(model, m, Budget(rate=1.0), **({"k": 2} if m == "fastv" else {}))
        flops_w = count_prefill_flops(model, inputs).total_flops
        unprune(model)
        overhead[m] = {
            "time_ratio_keep_all_vs_unwrapped": median(t_w) / median(t_b),
            "cpu_time_ratio_keep_all_vs_unwrapped": median(c_w) / median(c_b),
            "extra_flops_keep_all": flops_w - base_cost.total_flops,
            "extra_flops_fraction": (flops_w - base_cost.total_flops) / base_cost.total_flops,
        }

    rows = []
    for m in methods:
        for k in tqdm(keeps, desc=m):
            kw = {"k": 2} if m == "fastv" else {}
            if m == "prumerge":
                kw["adaptive"] = False  # fixed count so the budgets are comparable
            prune(model, m, Budget(tokens=k), **kw)
            cost = count_prefill_flops(model, inputs)
            kept = model.ctxzip_vision.last_stats
            model.ctxzip_vision.hook_seconds = 0.0
            t_m, t_b, c_m, c_b = [], [], [], []
            for _ in range(args.reps):
                t_m.append(timed(model, inputs))
                c_m.append(CPU[-1])
                pr = model.ctxzip_vision
                unprune(model)
                t_b.append(timed(model, inputs))
                c_b.append(CPU[-1])
                prune(model, m, Budget(tokens=k), **kw)
                model.ctxzip_vision.hook_seconds = pr.hook_seconds
            hook_s = model.ctxzip_vision.hook_seconds / args.reps
            logits = cost.last_logits
            unprune(model)
            rows.append({
                "method": m,
                "keep": k,
                "tokens_kept": [a for _, a in kept],
                "llm_seq_len": cost.llm_tokens,
                "llm_flops": cost.llm_flops,
                "total_flops": cost.total_flops,
                "llm_flops_ratio": cost.llm_flops / base_cost.llm_flops,
                "total_flops_ratio": cost.total_flops / base_cost.total_flops,
                "time_median_s": median(t_m),
                "anchor_time_median_s": median(t_b),
                "time_ratio": median(t_m) / median(t_b),
                "cpu_time_median_s": median(c_m),
                "anchor_cpu_time_median_s": median(c_b),
                "cpu_time_ratio": median(c_m) / median(c_b),
                "hook_seconds_per_prefill": hook_s,
                "hook_fraction_of_prefill": hook_s / median(t_m),
                "mechanism_check_vs_unpruned": agreement(ref_logits, logits),
            })
    # adaptive PruMerge: the count it picks on this input (random weights)
    prune(model, "prumerge")
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
    adaptive_count = model.ctxzip_vision.last_stats
    unprune(model)

    result = {
        "benchmark": "vision_prefill",
        "note": "Random-weight model with LLaVA-1.5 token geometry (576 visual tokens) scaled to CPU; "
                "no VLM weights are reachable here. 'mechanism_check_vs_unpruned' compares last-token logits "
                "with the unpruned model only as a mechanism check (random weights say nothing about quality). "
                "FastV: K=2. PruMerge: fixed count (adaptive=False) at each budget.",
        "geometry": geometry | {"visual_tokens": 576, "sys_tokens": 35, "question_tokens": 24},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "reps": args.reps,
        "anchor": {"llm_seq_len": base_cost.llm_tokens, "llm_flops": base_cost.llm_flops,
                   "total_flops": base_cost.total_flops, "vision_flops": base_cost.vision_flops},
        "wrapper_overhead_keep_all": overhead,
        "prumerge_adaptive_count": adaptive_count,
        "rows": rows,
    }
    out = Path(args.out)
    if args.quick:
        out = out.with_name(out.stem + "_quick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    _plot(result, out.with_suffix(".png"))
    for r in rows:
        print(f"{r['method']:12s} keep={r['keep']:4d} seq={r['llm_seq_len']:4d} LLM FLOPs x{r['llm_flops_ratio']:.3f} "
              f"total x{r['total_flops_ratio']:.3f} time x{r['time_ratio']:.3f} cpu x{r['cpu_time_ratio']:.3f} hooks {100 * r['hook_fraction_of_prefill']:.1f}%")
    return 0


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({r["method"] for r in result["rows"]})
    for m in methods:
        rs = sorted([r for r in result["rows"] if r["method"] == m], key=lambda r: r["keep"])
        ks = [r["keep"] for r in rs] + [576]
        ax[0].plot(ks, [r["llm_flops_ratio"] for r in rs] + [1.0], marker="o", label=m)
        ax[1].plot(ks, [r["cpu_time_ratio"] for r in rs] + [1.0], marker="o", label=m)
    ax[0].set_title("LLM prefill FLOPs / unpruned (counted)")
    ax[1].set_title("prefill CPU time / unpruned (median, side by side)")
    for a in ax:
        a.set_xlabel("visual tokens kept (of 576)")
        a.grid(alpha=0.3)
    ax[0].legend()
    fig.suptitle("Random-weight LLaVA-1.5 geometry on CPU (mechanism benchmark, no real weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
