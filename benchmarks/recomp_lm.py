"""RECOMP's language-modelling setup on real local text (pydoc_data.topics).

For each test case (a 96-token prefix of a held-out document and its next 32 tokens - the
In-Context RALM / RECOMP LM geometry) the last 32 prefix tokens retrieve the top-5 100-word
passages of *other* documents from a faiss index. Each method compresses those passages; the
target LM (default SmolLM2-135M-Instruct) then reads ``[compressed passages; prefix]`` and we
measure the continuation NLL.

    context benefit retained = (NLL_none - NLL_method) / (NLL_none - NLL_full)

with "full" = the five retrieved passages uncompressed (pooled over cases, plus the per-case
median). Methods: extractive (packaged MiniLM), extractive trained with
``ctxzip rag train-extractive`` on topics disjoint from the test topics (with and without its
calibrated selective-augmentation threshold), abstractive (SmolLM2 summary; with and without its
relevance gate), first sentences, random sentences, no docs. Goal (issue 5): extractive at
<= 20% of the retrieved tokens keeps >= 90% of the full docs' benefit, and selective
augmentation is never worse than no docs on average.

    python benchmarks/recomp_lm.py            # full run (trains the extractive model if absent)
    python benchmarks/recomp_lm.py --quick    # a few cases
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ctxzip.budget import Budget  # noqa: E402
from ctxzip.eval import context_benefit, pooled_benefit  # noqa: E402
from ctxzip.prompt.extractive import _fill_tokens, split_sentences  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def baseline_select(passages: list[str], budget: Budget, tok, how: str, seed: int) -> str:
    """first-sentences (lead of every passage first: sentence 0 of each, then 1, ...) or
    random sentences, filled into the same token budget as the extractive compressor."""
    sents = [s for i, p in enumerate(passages) for s in split_sentences(p, doc=i)]
    if not sents:
        return ""
    lengths = np.array([len(x) for x in tok([s.text for s in sents],
                                            add_special_tokens=False)["input_ids"]])
    n_tok = len(tok("\n\n".join(passages), add_special_tokens=False)["input_ids"])
    if how == "first":
        pos: dict[int, int] = {}
        rank = []
        for s in sents:
            rank.append(pos.get(s.doc, 0))
            pos[s.doc] = pos.get(s.doc, 0) + 1
        scores = -np.array(rank, dtype=float) - 1e-3 * np.array([s.doc for s in sents])
    else:
        scores = np.random.default_rng(seed).random(len(sents))
    kept = _fill_tokens(scores, lengths, budget.resolve(n_tok))
    parts: dict[int, list[str]] = {}
    for s, k in zip(sents, kept):
        if k:
            parts.setdefault(s.doc, []).append(s.text)
    return "\n\n".join(" ".join(v) for _, v in sorted(parts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 cases, 2 abstractive, rate 0.2")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--abstractive-cases", type=int, default=4)
    ap.add_argument("--rates", default="0.1,0.2")
    ap.add_argument("--lm", default=None, help="target LM (default SmolLM2-135M-Instruct)")
    ap.add_argument("--model-dir", default=None,
                    help="trained extractive compressor (default: <ctxzip cache>/"
                         "recomp-extractive-pydoc; trained with the CLI when missing)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=str(RESULTS / "recomp_lm.json"))
    ap.add_argument("--resume", action="store_true",
                    help="reuse finished phases from <out>.partial.json (same settings)")
    args = ap.parse_args()
    if args.quick:
        args.cases, args.abstractive_cases, args.rates = 4, 2, "0.2"
    rates = [float(x) for x in args.rates.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    from ctxzip.eval import ContextEvaluator
    from ctxzip.models import cache_dir, load_causal_lm
    from ctxzip.prompt import AbstractiveCompressor, ExtractiveCompressor
    from ctxzip.rag.index import PassageIndex, index_documents
    from ctxzip.rag.train_extractive import lm_examples, pydoc_documents, split_by_source

    t_start = time.perf_counter()
    docs = pydoc_documents()
    train_docs, test_docs = split_by_source(docs)  # the CLI's default split (seed 0, 30%)
    ix_dir = cache_dir() / "bench" / "pydoc-passages-minilm"
    if (ix_dir / "index.faiss").is_file():
        index = PassageIndex.load(ix_dir)
    else:
        index = index_documents(docs, words=100, progress=True)
        index.save(ix_dir)
    model, tok = load_causal_lm(args.lm)
    ev = ContextEvaluator(model, tok)
    cases = lm_examples(test_docs, index, tok, max_per_doc=2)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(cases))[: args.cases]
    cases = [cases[i] for i in sorted(order)]
    print(f"{len(docs)} documents, {len(index)} passages; {len(test_docs)} test documents "
          f"({len({d.source for d in test_docs})} topics) -> {len(cases)} cases", flush=True)

    def nll(ex, context: str) -> float:
        ctx = ev.encode(context.strip() + "\n\n") if context.strip() else []
        (tot, n), = ev.score_items(ctx, [(ev.encode(ex.prefix), ev.encode(ex.continuation))])
        return tot / n

    def ntok(text: str) -> int:
        return len(ev.encode(text)) if text else 0

    rows: dict[str, list[dict]] = {}
    partial = Path(args.out).with_suffix(".partial.json")
    if args.resume and partial.is_file():
        rows = json.loads(partial.read_text())
        print(f"resuming: {sorted(rows)}", flush=True)

    def checkpoint() -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(rows))

    def record(method: str, i: int, ex, context: str, extra: dict | None = None) -> None:
        rows.setdefault(method, []).append({
            "case": i, "nll": nll(ex, context), "tokens": ntok(context), **(extra or {})})

    base = ExtractiveCompressor(tokenizer=tok)
    t0 = time.perf_counter()
    for i, ex in enumerate(cases if "full" not in rows else []):
        full = "\n\n".join(ex.passages)
        record("none", i, ex, "")
        record("full", i, ex, full)
        for r in rates:
            b = Budget(rate=r)
            record(f"extractive@{r}", i, ex, base.compress(ex.passages, query=ex.query,
                                                           budget=b).text)
            record(f"first-sentences@{r}", i, ex, baseline_select(ex.passages, b, tok, "first", i))
            record(f"random-sentences@{r}", i, ex,
                   baseline_select(ex.passages, b, tok, "random", i))
        print(f"  case {i + 1}/{len(cases)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t_base = time.perf_counter() - t0
    checkpoint()

    # abstractive: one generation per case; the relevance gate is evaluated on the same output
    absc = AbstractiveCompressor(model=model, generation_tokenizer=tok, tokenizer=tok,
                                 relevance_threshold=None, max_input_tokens=1024)
    t0 = time.perf_counter()
    r_abs = 0.2
    done_abs = f"abstractive@{r_abs}" in rows
    for i, ex in enumerate(cases[: args.abstractive_cases] if not done_abs else []):
        res = absc.compress(ex.passages, query=ex.query, budget=Budget(rate=r_abs))
        p_yes = absc.relevance(ex.query, ex.passages)
        record(f"abstractive@{r_abs}", i, ex, res.text, {"relevance": p_yes})
        gated = res.text if p_yes >= 0.5 else ""
        record(f"abstractive+gate@{r_abs}", i, ex, gated, {"relevance": p_yes})
        print(f"  abstractive {i + 1}/{args.abstractive_cases} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    t_abs = time.perf_counter() - t0
    checkpoint()

    # trained extractive (wait for / run the training)
    mdir = Path(args.model_dir) if args.model_dir else cache_dir() / "recomp-extractive-pydoc"
    if not (mdir / "train_report.json").is_file():
        wait = os.environ.get("RECOMP_WAIT_FOR_TRAINING")
        if wait:
            print(f"waiting for {mdir} ...", flush=True)
            while not (mdir / "train_report.json").is_file():
                time.sleep(20)
        else:
            cmd = [sys.executable, "-m", "ctxzip", "rag", "train-extractive", "--out", str(mdir),
                   "--index", str(ix_dir), "--max-sentences", "8", "--batch-size", "16"]
            cmd += ["--max-docs", "10", "--epochs", "1"] if args.quick else [
                "--max-docs", "15", "--epochs", "3"]
            print("training:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    report = json.loads((mdir / "train_report.json").read_text())
    trained_ids = set(report["train_doc_ids"]) | set(report["dev_doc_ids"])
    test_ids = {ex.doc_id for ex in cases}
    overlap = trained_ids & test_ids
    assert not overlap, f"trained on test documents: {sorted(overlap)[:5]}"
    trained = ExtractiveCompressor.from_pretrained(mdir, tokenizer=tok, threshold=None)
    selective = ExtractiveCompressor.from_pretrained(mdir, tokenizer=tok)
    t0 = time.perf_counter()
    for k in [m for m in rows if m.startswith("extractive-trained")]:
        del rows[k]
    for i, ex in enumerate(cases):
        for r in rates:
            record(f"extractive-trained@{r}", i, ex,
                   trained.compress(ex.passages, query=ex.query, budget=Budget(rate=r)).text)
        res = selective.compress(ex.passages, query=ex.query, budget=Budget(rate=0.2))
        record("extractive-trained+selective@0.2", i, ex, res.text,
               {"empty": res.details["selective_empty"]})
    t_trained = time.perf_counter() - t0
    checkpoint()

    # ------------------------------------------------------------------ summary
    none = {r["case"]: r["nll"] for r in rows["none"]}
    full = {r["case"]: r["nll"] for r in rows["full"]}
    full_tok = {r["case"]: r["tokens"] for r in rows["full"]}
    summary = {}
    for m, rs in rows.items():
        trip = [(none[r["case"]], full[r["case"]], r["nll"]) for r in rs]
        per = [context_benefit(*t) for t in trip]
        per = [p for p in per if np.isfinite(p)]
        summary[m] = {
            "cases": len(rs),
            "benefit_retained_pooled": pooled_benefit(trip),
            "benefit_retained_median": float(np.median(per)) if per else None,
            "mean_nll": float(np.mean([r["nll"] for r in rs])),
            "mean_nll_none_same_cases": float(np.mean([none[r["case"]] for r in rs])),
            "mean_gain_vs_none": float(np.mean([none[r["case"]] - r["nll"] for r in rs])),
            "achieved_rate": float(np.sum([r["tokens"] for r in rs]) /
                                   max(1, np.sum([full_tok[r["case"]] for r in rs]))),
        }
        if any("empty" in r for r in rs):
            summary[m]["empty_fraction"] = float(np.mean([r["empty"] for r in rs]))
        if any("relevance" in r for r in rs):
            summary[m]["gate_empty_fraction"] = float(np.mean([r["relevance"] < 0.5 for r in rs]))
    helps = float(np.mean([full[c] < none[c] for c in none]))
    ext = summary.get("extractive@0.2", {})
    tr = summary.get("extractive-trained@0.2", {})
    sel = summary.get("extractive-trained+selective@0.2", {})
    goals = {
        "extractive_at_0.2_retains_ge_0.9": {
            "default": ext.get("benefit_retained_pooled"),
            "trained": tr.get("benefit_retained_pooled"),
            "met": max(ext.get("benefit_retained_pooled", -1), tr.get("benefit_retained_pooled", -1))
            >= 0.9,
        },
        "selective_never_worse_than_no_docs": {
            "mean_gain_vs_none": sel.get("mean_gain_vs_none"),
            "met": sel.get("mean_gain_vs_none", -1) >= 0.0,
        },
    }
    out = {
        "setup": {
            "corpus": "pydoc_data.topics via ctxzip.eval.prose_documents(min_chars=1500, "
                      "max_chars=4000)", "passages": len(index), "passage_words": 100,
            "retrieved_k": 5, "dedup": "passages sharing an 8-word n-gram with the test document "
                                     "are never retrieved", "prefix_tokens": 96, "continuation_tokens": 32,
            "query_tokens": 32, "test_documents": len(test_docs), "cases": len(cases),
            "abstractive_cases": min(args.abstractive_cases, len(cases)),
            "target_lm": args.lm or "SmolLM2-135M-Instruct",
            "encoder": "all-MiniLM-L6-v2", "trained_model": str(mdir),
            "train_report": {k: report.get(k) for k in (
                "train_cases", "dev_cases", "triplets", "threshold", "training",
                "dev_mean_gain_always", "dev_mean_gain_selective", "seconds_total")},
            "full_docs_help_fraction": helps,
            "mean_nll_none": float(np.mean(list(none.values()))),
            "mean_nll_full": float(np.mean(list(full.values()))),
            "mean_full_tokens": float(np.mean(list(full_tok.values()))),
        },
        "summary": summary,
        "goals": goals,
        "seconds": {"baselines+extractive": t_base, "abstractive": t_abs,
                    "trained": t_trained, "total": time.perf_counter() - t_start},
        "machine": machine(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({"summary": {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv)
                                      for kk, vv in v.items()} for k, v in summary.items()},
                      "goals": goals}, indent=2))
    plot(summary, rates, Path(args.out).with_suffix(".png"))


def plot(summary: dict, rates: list[float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, style in (("extractive", "o-"), ("extractive-trained", "s-"),
                     ("first-sentences", "^--"), ("random-sentences", "v:")):
        pts = [(summary[f"{m}@{r}"]["achieved_rate"], summary[f"{m}@{r}"]["benefit_retained_pooled"])
               for r in rates if f"{m}@{r}" in summary]
        if pts:
            ax.plot(*zip(*pts), style, label=m)
    for m, mk in (("abstractive@0.2", "*"), ("abstractive+gate@0.2", "P"),
                  ("extractive-trained+selective@0.2", "D")):
        if m in summary:
            ax.plot(summary[m]["achieved_rate"], summary[m]["benefit_retained_pooled"], mk,
                    markersize=10, label=m)
    ax.axhline(1.0, color="gray", lw=0.8, label="full retrieved docs")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.axhline(0.9, color="green", lw=0.8, ls="--", label="goal 0.9")
    ax.set_xlabel("achieved rate (tokens kept / retrieved tokens)")
    ax.set_ylabel("context benefit retained (continuation, pooled)")
    ax.set_title("RECOMP LM setup on pydoc topics, SmolLM2-135M target")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
