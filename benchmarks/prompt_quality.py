"""Quality of prompt compression: context benefit retained (SmolLM2 as the target LM) on real
prose the distilled classifier never trained on.

Documents: `ctxzip.eval.prose_documents` (pieces of 3,000-6,000 characters) restricted to the
`pydoc_data.topics` entries held out from distillation (`ctxzip.prompt.distill.holdout_topic_keys`,
split by topic id, so no training text is evaluated). Each document gives a case
(`ContextEvaluator.make_case`): its first `--context-tokens` tokens are the context, the
continuation and uniformly placed cued recall spans are the targets (see DESIGN.md).

Methods at keep rates 0.5 and 0.33 (the achieved rate is reported beside every number):

* `random` - random token drop; `truncate-tail` - keep the most recent tokens;
* `perplexity` - LLMLingua-1 token-level ITPC only (the anchor's default for one context);
* `perplexity-query` - the same, question-aware (LongLLMLingua contrastive perplexity, the
  document's title as the question);
* `perplexity-budget` - **the teacher**: LLMLingua-1 budget controller (sentence-level coarse
  stage, `token_budget_ratio=1.0`) then token-level ITPC to the exact budget;
* `perplexity-budget-query` - the teacher, question-aware;
* `perplexity-sentence` - whole sentences only (knapsack on mean self-information);
* `lingua2-distilled` - the shipped default TokenClassifierCompressor (MiniLM distilled from the
  teacher; same coarse stage on its own probabilities, then words);
* `lingua2-distilled-words` - the same classifier without the sentence stage (plain LLMLingua-2).

Compression time (wall, one thread) per document is measured for every method; the goal row
compares the distilled default with its teacher (`perplexity-budget`). Rows are cached in
`<out>.rows.jsonl` as they finish, so an interrupted run resumes (`--fresh` starts over).

    python benchmarks/prompt_quality.py           # 10 held-out documents, 512-token contexts
    python benchmarks/prompt_quality.py --quick   # 1 document
    # a candidate default (an `export_partial` folder) in the distilled rows, other rows reused
    python benchmarks/prompt_quality.py --classifier-asset DIR --out benchmarks/results/prompt_quality_DIR.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"


def heldout_cases(ev, n_docs: int, ctx_tokens: int) -> list:
    """The first ``n_docs`` (document, case) pairs of the held-out `pydoc_data.topics` prose
    that are long enough for a ``ctx_tokens`` context (shared with prompt_fine_stage.py)."""
    from ctxzip.eval import prose_documents
    from ctxzip.prompt.distill import holdout_topic_keys

    held = set(holdout_topic_keys())
    docs = [d for d in prose_documents(None, min_chars=3000, max_chars=6000) if d.id.split(":")[1] in held]
    cases = []
    for d in docs:
        try:
            cases.append((d, ev.make_case(d.text, context_tokens=ctx_tokens, n_recall=16 if ctx_tokens >= 1024 else 8, doc_id=d.id)))
        except ValueError:
            continue
        if len(cases) == n_docs:
            break
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--context-tokens", type=int, default=None)
    ap.add_argument("--rates", type=float, nargs="*", default=[0.5, 0.33])
    ap.add_argument("--target-lm", default=None, help="target LM id/path (default: offline SmolLM2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT / "prompt_quality.json"))
    ap.add_argument("--fresh", action="store_true", help="ignore cached rows")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all)")
    ap.add_argument("--classifier-asset", default=None,
                    help="evaluate this distilled classifier folder (export_partial output) instead of the shipped default")
    ap.add_argument("--stop-at", default=None, help="UTC HH:MM after which no new document is started")
    args = ap.parse_args()
    n_docs = args.docs or (1 if args.quick else 10)
    ctx_tokens = args.context_tokens or 512

    import torch

    from ctxzip.budget import Budget
    from ctxzip.eval import ContextEvaluator, pooled_benefit, pooled_benefit_diff
    from ctxzip.prompt import (
        PerplexityCompressor,
        RandomDropCompressor,
        TokenClassifierCompressor,
        TruncationCompressor,
    )
    torch.set_num_threads(args.threads or 1)
    ev = ContextEvaluator(args.target_lm)
    tok = ev.tokenizer
    cases = heldout_cases(ev, n_docs, ctx_tokens)
    teacher = {"sentence_filter": True, "token_budget_ratio": 1.0}
    student: dict = {}
    if args.classifier_asset:
        from ctxzip.prompt.distill import load_partial

        m, t = load_partial(args.classifier_asset)
        # a model object turns the coarse stage off by default; the shipped default has it on
        student = {"model": m, "classifier_tokenizer": t, "sentence_filter": True}
    comps = {
        "random": RandomDropCompressor(seed=0, tokenizer=tok),
        "truncate-tail": TruncationCompressor("tail", tokenizer=tok),
        "perplexity": PerplexityCompressor(model=args.target_lm, tokenizer=tok),
        "perplexity-query": PerplexityCompressor(model=args.target_lm, tokenizer=tok),
        "perplexity-budget": PerplexityCompressor(model=args.target_lm, tokenizer=tok, **teacher),
        "perplexity-budget-query": PerplexityCompressor(model=args.target_lm, tokenizer=tok, **teacher),
        "perplexity-sentence": PerplexityCompressor(model=args.target_lm, unit="sentence", tokenizer=tok),
        "lingua2-distilled": TokenClassifierCompressor(tokenizer=tok, **student),
        "lingua2-distilled-words": TokenClassifierCompressor(tokenizer=tok, **{**student, "sentence_filter": False}),
    }
    if args.methods:
        unknown = set(args.methods) - set(comps)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(comps)}")
        comps = {k: v for k, v in comps.items() if k in args.methods}
    query_methods = {"perplexity-query", "perplexity-budget-query"}
    # warm-up: load every model once so no row pays a load
    for c in comps.values():
        c.compress("Warm up the models. This is a sentence.", budget=Budget(rate=0.5))
    cache_file = Path(str(args.out) + ".rows.jsonl")
    done = {}
    if cache_file.is_file() and not args.fresh:
        for line in cache_file.read_text().splitlines():
            r = json.loads(line)
            if r.get("context_tokens") == ctx_tokens:
                done[(r["doc"], r["method"], r["rate"])] = r
    rows: list[dict] = []

    def write_report() -> None:
        summary = {}
        for rate in args.rates:
            for name in comps:
                rs = [r for r in rows if r["method"] == name and r["rate"] == rate]
                if not rs:
                    continue
                s = {"n_docs": len(rs), "achieved_rate": statistics.mean(r["achieved_rate"] for r in rs),
                     "seconds_median": statistics.median(r["seconds"] for r in rs),
                     "cpu_seconds_median": statistics.median(r.get("cpu_seconds", float("nan")) for r in rs)}
                for t in ("continuation", "recall"):
                    vals = [r[t] for r in rs if not math.isnan(r[t])]
                    s[f"{t}_mean"] = statistics.mean(vals) if vals else float("nan")
                    s[f"{t}_pooled"] = pooled_benefit((r["nll"][t]["none"], r["nll"][t]["full"], r["nll"][t]["compressed"]) for r in rs)
                summary[f"{name}@{rate}"] = s
        # distilled vs teacher: points of benefit and speed ratio
        goals = {}
        for rate in args.rates:
            st, te = summary.get(f"lingua2-distilled@{rate}"), summary.get(f"perplexity-budget@{rate}")
            rd = summary.get(f"random@{rate}")
            tr = summary.get(f"truncate-tail@{rate}")
            if st and te:
                # per-document speed ratio, then the median (robust to load changes during the run)
                ratios, cpu_ratios = [], []
                for dname in {r["doc"] for r in rows}:
                    a = [r for r in rows if r["doc"] == dname and r["rate"] == rate and r["method"] == "perplexity-budget"]
                    b = [r for r in rows if r["doc"] == dname and r["rate"] == rate and r["method"] == "lingua2-distilled"]
                    if a and b:
                        ratios.append(a[0]["seconds"] / b[0]["seconds"])
                        cpu_ratios.append(a[0]["cpu_seconds"] / max(b[0]["cpu_seconds"], 1e-9))
                T = ("continuation", "recall")

                def paired(a: str, b: str, t: str, rate: float = rate) -> dict:
                    """100 x (pooled benefit of ``a`` - ``b``) with a paired bootstrap 95%
                    interval over the documents both have."""
                    ra = {r["doc"]: r for r in rows if r["method"] == a and r["rate"] == rate}
                    rb = {r["doc"]: r for r in rows if r["method"] == b and r["rate"] == rate}
                    docs = sorted(set(ra) & set(rb))
                    d = pooled_benefit_diff([ra[x]["nll"][t]["none"] for x in docs], [ra[x]["nll"][t]["full"] for x in docs],
                                            [ra[x]["nll"][t]["compressed"] for x in docs],
                                            [rb[x]["nll"][t]["compressed"] for x in docs])
                    return {"points": 100 * d["diff"], "ci95": [100 * v for v in d["ci95"]], "p_ahead": d["p_ahead"],
                            "n_docs": d["n_cases"]}

                goals[str(rate)] = {
                    "teacher": "perplexity-budget",
                    "points_below_teacher": {t: 100 * (te[f"{t}_pooled"] - st[f"{t}_pooled"]) for t in T},
                    # paired over documents: how much the gap depends on which 10 documents were drawn
                    "points_below_teacher_bootstrap": {t: paired("perplexity-budget", "lingua2-distilled", t) for t in T},
                    "speedup_vs_teacher_median": statistics.median(ratios) if ratios else None,
                    "speedup_vs_teacher_cpu_median": statistics.median(cpu_ratios) if cpu_ratios else None,
                    "student_points_above_random": {t: 100 * (st[f"{t}_pooled"] - rd[f"{t}_pooled"]) for t in T} if rd else None,
                    "student_points_above_random_bootstrap": {t: paired("lingua2-distilled", "random", t) for t in T} if rd else None,
                    "teacher_points_above_random": {t: 100 * (te[f"{t}_pooled"] - rd[f"{t}_pooled"]) for t in T} if rd else None,
                    "truncate_tail_minus_student": {t: 100 * (tr[f"{t}_pooled"] - st[f"{t}_pooled"]) for t in T} if tr else None,
                    "achieved_rate": {"student": st["achieved_rate"], "teacher": te["achieved_rate"], "random": rd["achieved_rate"] if rd else None},
                }
        info = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()},
            "target_lm": args.target_lm or "SmolLM2-135M-Instruct (offline)",
            "docs": [d.id for d, _ in cases if any(r["doc"] == d.id for r in rows)], "context_tokens": ctx_tokens,
            "teacher": {"class": "PerplexityCompressor", **teacher},
            "student_asset": args.classifier_asset or "shipped default (ctxzip/assets/lingua2-minilm)",
            "command": "python benchmarks/prompt_quality.py " + " ".join(sys.argv[1:]),
            "note": "benefit = (NLL_none - NLL_comp) / (NLL_none - NLL_full); *_pooled sums over documents. "
                    "Truncation keeps the most recent tokens, which favours the continuation target.",
            "summary": summary, "goals": goals, "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(info, indent=1, default=float))
        print(json.dumps(goals, indent=1))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
            names = list(comps)
            for ax, t in zip(axes, ("continuation", "recall")):
                w = 0.8 / len(args.rates)
                for i, rate in enumerate(args.rates):
                    vals = [summary.get(f"{n}@{rate}", {}).get(f"{t}_pooled", float("nan")) for n in names]
                    ax.bar([j + i * w for j in range(len(names))], vals, width=w, label=f"rate {rate}")
                ax.set_xticks([j + w / 2 for j in range(len(names))])
                ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
                ax.set_title(f"{t} target")
                ax.axhline(0, color="k", lw=0.5)
            axes[0].set_ylabel("context benefit retained (pooled)")
            axes[0].legend()
            fig.tight_layout()
            fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
            plt.close(fig)
        except ImportError:
            pass
        print(f"wrote {args.out}")

    fh = cache_file.open("a" if not args.fresh else "w")
    from ctxzip.prompt import perplexity as P

    for d, case in cases:
        if args.stop_at and time.strftime("%H:%M", time.gmtime()) >= args.stop_at and rows:
            print(f"--stop-at {args.stop_at} UTC reached: {len({r['doc'] for r in rows})} documents done", flush=True)
            break
        title = d.text.strip().splitlines()[0].strip()
        base = None
        for rate in args.rates:
            for name, c in comps.items():
                if (d.id, name, rate) in done:
                    rows.append(done[(d.id, name, rate)])
                    continue
                if base is None:
                    base = ev.baseline(case)
                    print(f"{d.id}: none={base['none']} full={base['full']}", flush=True)
                q = title if name in query_methods else None
                if name.startswith("perplexity-budget"):
                    P._FULL_SCORES.clear()  # the teacher's time includes its full scoring pass
                t0, c0 = time.perf_counter(), time.process_time()
                r = c.compress(case.context_text, budget=Budget(rate=rate), query=q)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                b = ev.benefit(case, r.text)
                row = {"doc": d.id, "method": name, "rate": rate, "achieved_rate": r.rate,
                       "seconds": dt, "cpu_seconds": cpu, "continuation": b["continuation"], "recall": b["recall"],
                       "nll": {t: b[f"nll_{t}"] for t in ("continuation", "recall")},
                       "context_tokens": ctx_tokens, "loadavg": os.getloadavg()[0]}
                rows.append(row)
                fh.write(json.dumps(row, default=float) + "\n")
                fh.flush()
                print(f"  {name} r={rate}: achieved {r.rate:.3f} cont {b['continuation']:.3f} recall {b['recall']:.3f} ({dt:.1f}s)", flush=True)
        write_report()
    write_report()



if __name__ == "__main__":
    main()
