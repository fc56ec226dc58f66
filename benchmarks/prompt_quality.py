"""Quality of prompt compression: context benefit retained (SmolLM2 as the target LM) on real
prose the distilled classifier never trained on.

Documents: `ctxzip.eval.prose_documents` restricted to the `pydoc_data.topics` entries held out
from distillation (`ctxzip.prompt.distill.holdout_topic_keys`). Each document gives a case
(`ContextEvaluator.make_case`): its first `--context-tokens` tokens are the context, the
continuation and uniformly placed cued recall spans are the targets (see DESIGN.md).

Methods at keep rates 0.5 and 0.33 (the achieved rate is reported beside every number):
random token drop, keep-the-tail truncation, PerplexityCompressor (LLMLingua-1 token level;
question-aware LongLLMLingua contrastive with the document's title as the question; sentence
level), and the distilled default TokenClassifierCompressor (LLMLingua-2, global mode). Compression time per document is measured for the classifier and its teacher.

    python benchmarks/prompt_quality.py           # 4 held-out documents, 512-token contexts
    python benchmarks/prompt_quality.py --quick   # 1 document
    python benchmarks/prompt_quality.py --docs 7 --context-tokens 1024   # the larger run
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--context-tokens", type=int, default=None)
    ap.add_argument("--rates", type=float, nargs="*", default=[0.5, 0.33])
    ap.add_argument("--target-lm", default=None, help="target LM id/path (default: offline SmolLM2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT / "prompt_quality.json"))
    args = ap.parse_args()
    n_docs = args.docs or (1 if args.quick else 4)
    ctx_tokens = args.context_tokens or 512

    import torch

    from ctxzip.budget import Budget
    from ctxzip.eval import ContextEvaluator, pooled_benefit, prose_documents
    from ctxzip.prompt import (
        PerplexityCompressor,
        RandomDropCompressor,
        TokenClassifierCompressor,
        TruncationCompressor,
    )
    from ctxzip.prompt.distill import holdout_topic_keys

    if args.threads:
        torch.set_num_threads(args.threads)
    held = set(holdout_topic_keys())
    docs = [d for d in prose_documents(None) if d.id.split(":")[1] in held]
    ev = ContextEvaluator(args.target_lm)
    tok = ev.tokenizer
    cases = []
    for d in docs:
        try:
            cases.append((d, ev.make_case(d.text, context_tokens=ctx_tokens, n_recall=16 if ctx_tokens >= 1024 else 8, doc_id=d.id)))
        except ValueError:
            continue
        if len(cases) == n_docs:
            break
    methods = {
        "random": lambda q: RandomDropCompressor(seed=0, tokenizer=tok),
        "truncate-tail": lambda q: TruncationCompressor("tail", tokenizer=tok),
        "perplexity": lambda q: PerplexityCompressor(model=args.target_lm, tokenizer=tok),
        "perplexity-query": lambda q: PerplexityCompressor(model=args.target_lm, tokenizer=tok),
        "perplexity-sentence": lambda q: PerplexityCompressor(model=args.target_lm, unit="sentence", tokenizer=tok),
        "lingua2-distilled": lambda q: TokenClassifierCompressor(tokenizer=tok),
    }
    comps = {k: f(None) for k, f in methods.items()}
    rows = []
    for d, case in cases:
        title = d.text.strip().splitlines()[0].strip()
        base = ev.baseline(case)
        print(f"{d.id}: none={base['none']} full={base['full']}", flush=True)
        for rate in args.rates:
            for name, c in comps.items():
                q = title if name == "perplexity-query" else None
                t0 = time.perf_counter()
                r = c.compress(case.context_text, budget=Budget(rate=rate), query=q)
                dt = time.perf_counter() - t0
                b = ev.benefit(case, r.text)
                row = {"doc": d.id, "method": name, "rate": rate, "achieved_rate": r.rate,
                       "seconds": dt, "continuation": b["continuation"], "recall": b["recall"],
                       "nll": {t: b[f"nll_{t}"] for t in ("continuation", "recall")}}
                rows.append(row)
                print(f"  {name} r={rate}: achieved {r.rate:.3f} cont {b['continuation']:.3f} recall {b['recall']:.3f} ({dt:.1f}s)", flush=True)

    summary = {}
    for rate in args.rates:
        for name in comps:
            rs = [r for r in rows if r["method"] == name and r["rate"] == rate]
            if not rs:
                continue
            s = {"achieved_rate": statistics.mean(r["achieved_rate"] for r in rs),
                 "seconds_median": statistics.median(r["seconds"] for r in rs)}
            for t in ("continuation", "recall"):
                vals = [r[t] for r in rs if not math.isnan(r[t])]
                s[f"{t}_mean"] = statistics.mean(vals) if vals else float("nan")
                s[f"{t}_pooled"] = pooled_benefit((r["nll"][t]["none"], r["nll"][t]["full"], r["nll"][t]["compressed"]) for r in rs)
            summary[f"{name}@{rate}"] = s
    # distilled vs teacher: points of benefit and speed ratio
    goals = {}
    for rate in args.rates:
        st, te = summary.get(f"lingua2-distilled@{rate}"), summary.get(f"perplexity@{rate}")
        rd = summary.get(f"random@{rate}")
        if st and te:
            goals[str(rate)] = {
                "points_below_teacher": {t: 100 * (te[f"{t}_pooled"] - st[f"{t}_pooled"]) for t in ("continuation", "recall")},
                "speedup_vs_teacher": te["seconds_median"] / st["seconds_median"],
                "points_above_random": {t: 100 * (st[f"{t}_pooled"] - rd[f"{t}_pooled"]) for t in ("continuation", "recall")} if rd else None,
            }
    info = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()},
        "target_lm": args.target_lm or "SmolLM2-135M-Instruct (offline)",
        "docs": [d.id for d, _ in cases], "context_tokens": ctx_tokens,
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

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
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
    except ImportError:
        pass
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
