"""RECOMP's language-modelling setup on real local text (pydoc_data.topics).

For each test case (a 128-token prefix of a held-out document and its next 64 tokens - the
In-Context RALM / RECOMP LM geometry with a longer scored chunk) the last 32 prefix tokens
retrieve the top-5 100-word passages of *other* documents from a faiss index (passages sharing
an 8-word n-gram with the test document are never retrieved). Each method compresses those
passages; the target LM (default SmolLM2-135M-Instruct) reads ``[compressed passages; prefix]``
and we measure the mean NLL of the continuation.

    context benefit retained = (NLL_none - NLL_method) / (NLL_none - NLL_full)

with "full" = the five retrieved passages uncompressed. Reported per method: pooled over cases
(sum of gains / sum of full gains - the corpus-level number RECOMP's perplexities correspond
to) and the per-case median, each with a 95% bootstrap CI over cases, plus the mean NLL gain
over "no docs" (with CI) for the selective-augmentation goal.

Methods: extractive (packaged MiniLM; token budget and RECOMP's top-1 sentence), extractive
trained with ``ctxzip rag train-extractive`` on topics disjoint from the test topics, both with
their selective-augmentation threshold calibrated on held-out *training-side* documents,
abstractive (SmolLM2-Instruct; with and without its relevance gate), first sentences, random
sentences, no docs. Goals (issue 5): extractive at <= 20% of the retrieved tokens keeps >= 90%
of the full docs' benefit, and selective augmentation is never worse than no docs on average.

Every (case, method) NLL is cached in ``<ctxzip cache>/bench/recomp_lm/<settings>.jsonl``, so a
rerun resumes where it stopped; results are rewritten after every phase.

    python benchmarks/recomp_lm.py            # 40 cases (trains the extractive model if absent)
    python benchmarks/recomp_lm.py --quick    # 4 cases
"""

from __future__ import annotations

import argparse
import hashlib
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
from ctxzip.prompt.extractive import _fill_tokens, _render, split_sentences  # noqa: E402

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


def oracle_contexts(ex, scorer, tok, budget: Budget, labels: dict | None, *,
                    max_tries: int = 10) -> tuple[dict, dict[str, tuple[str, dict, float]]]:
    """**Not a deployable method**: the ceiling of extractive selection at this budget, from
    the teacher signal itself - the target LM's NLL gain on the *actual continuation* of every
    retrieved sentence prepended alone (RECOMP's labelling signal; cf. the "oracle" ranking of
    the reference ``eval_lm.py``, which picks the document minimising the target's loss).

    * ``oracle-marginal``: fill the token budget with the sentences of positive marginal gain,
      best first (the per-sentence teacher labels used as scores).
    * ``oracle-greedy``: walk down that ranking and keep a sentence only if the *set* (rendered
      in original order, exactly as evaluated) lowers the continuation NLL further; at most
      ``max_tries`` LM calls per case.

    ``labels`` (cached ``{"gains", "nll_none"}``) is reused when given. Returns the labels and
    ``{method: (context, extra, nll or nan)}``."""
    sents = [s for j, p in enumerate(ex.passages) for s in split_sentences(p, doc=j)]
    texts = [s.text for s in sents]
    if labels is None:
        nll = scorer.nll([None, *texts], ex.prefix, ex.continuation)
        labels = {"gains": (nll[0] - nll[1:]).tolist(), "nll_none": float(nll[0])}
    gains = np.asarray(labels["gains"], dtype=float)
    lengths = np.array([len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]])
    n_tok = len(tok("\n\n".join(ex.passages), add_special_tokens=False)["input_ids"])
    cap = budget.resolve(n_tok)
    pos_scores = np.where(gains > 0, gains, -np.inf)
    kept = _fill_tokens(pos_scores, lengths, cap) & (gains > 0)
    out = {"oracle-marginal": (_render(ex.passages, sents, kept),
                               {"kept": int(kept.sum())}, float("nan"))}
    order = [i for i in np.argsort(-gains, kind="stable").tolist() if gains[i] > 0]
    cur, used = labels["nll_none"], 0
    sel = np.zeros(len(sents), dtype=bool)
    tries = 0
    for i in order:
        if tries >= max_tries:
            break
        if used + lengths[i] > cap:
            continue
        trial = sel.copy()
        trial[i] = True
        ctx = _render(ex.passages, sents, trial)
        tries += 1
        n = float(scorer.nll([ctx], ex.prefix, ex.continuation)[0])
        if n < cur:
            sel, cur, used = trial, n, used + int(lengths[i])
    out["oracle-greedy"] = (_render(ex.passages, sents, sel),
                            {"kept": int(sel.sum()), "tries": tries},
                            cur if sel.any() else float("nan"))
    return labels, out


def bootstrap(values: dict[str, np.ndarray], stat, n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap CI of ``stat(**resampled arrays)`` over cases."""
    rng = np.random.default_rng(seed)
    m = len(next(iter(values.values())))
    out = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        v = stat(**{k: a[idx] for k, a in values.items()})
        if np.isfinite(v):
            out.append(v)
    if not out:
        return [float("nan"), float("nan")]
    return [float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))]


def summarise(rows: dict[str, dict[int, dict]], cases: list[int]) -> dict:
    none = {c: rows["none"][c]["nll"] for c in cases if c in rows.get("none", {})}
    full = {c: rows["full"][c]["nll"] for c in cases if c in rows.get("full", {})}
    full_tok = {c: rows["full"][c]["tokens"] for c in full}
    summary = {}
    for m, by_case in rows.items():
        cs = [c for c in cases if c in by_case and c in none and c in full]
        if not cs:
            continue
        a_none = np.array([none[c] for c in cs])
        a_full = np.array([full[c] for c in cs])
        a_m = np.array([by_case[c]["nll"] for c in cs])

        def pooled(n, f, x):
            d = np.sum(n - f)
            return float(np.sum(n - x) / d) if abs(d) > 1e-12 else float("nan")

        def median(n, f, x):
            d = n - f
            ok = np.abs(d) > 1e-9
            return float(np.median((n[ok] - x[ok]) / d[ok])) if ok.any() else float("nan")

        arrays = {"n": a_none, "f": a_full, "x": a_m}
        per = [context_benefit(n, f, x) for n, f, x in zip(a_none, a_full, a_m)]
        per = [p for p in per if np.isfinite(p)]
        s = {
            "cases": len(cs),
            "benefit_retained_pooled": float(pooled_benefit(zip(a_none, a_full, a_m))),
            "benefit_retained_pooled_ci95": bootstrap(arrays, pooled),
            "benefit_retained_median": float(np.median(per)) if per else None,
            "benefit_retained_median_ci95": bootstrap(arrays, median),
            "mean_nll": float(a_m.mean()),
            "mean_gain_vs_none": float(np.mean(a_none - a_m)),
            "mean_gain_vs_none_ci95": bootstrap(arrays, lambda n, f, x: float(np.mean(n - x))),
            "fraction_worse_than_none": float(np.mean(a_m > a_none + 1e-9)),
            "fraction_better_than_none": float(np.mean(a_m < a_none - 1e-9)),
            "achieved_rate": float(np.sum([by_case[c]["tokens"] for c in cs]) /
                                   max(1, np.sum([full_tok[c] for c in cs]))),
            "mean_tokens": float(np.mean([by_case[c]["tokens"] for c in cs])),
        }
        if any("empty" in by_case[c] for c in cs):
            s["empty_fraction"] = float(np.mean([by_case[c].get("empty", False) for c in cs]))
        summary[m] = s
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 cases, rate 0.2")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--abstractive-cases", type=int, default=None,
                    help="cases for the abstractive compressor (default: all)")
    ap.add_argument("--calibration-cases", type=int, default=16,
                    help="training-side cases calibrating the packaged encoder's selective "
                    "threshold (default 16)")
    ap.add_argument("--rates", default="0.2", help="comma-separated rates (e.g. 0.1,0.2)")
    ap.add_argument("--prefix-tokens", type=int, default=128)
    ap.add_argument("--continuation-tokens", type=int, default=64)
    ap.add_argument("--query-tokens", type=int, default=32)
    ap.add_argument("--lm", default=None, help="target LM (default SmolLM2-135M-Instruct)")
    ap.add_argument("--model-dir", default=None,
                    help="trained extractive compressor (default: <ctxzip cache>/"
                         "recomp-extractive-pydoc; trained with the CLI when missing)")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: "
                    "oracle,trained,abstractive")
    ap.add_argument("--cache-only", action="store_true",
                    help="compute nothing new: summarise the (case, method) rows already cached "
                    "by earlier (possibly interrupted) runs")
    ap.add_argument("--only-calibration", action="store_true",
                    help="like --cache-only for the test cases, but compute the calibration "
                    "cases (e.g. alongside a running full run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.cases, args.rates, args.calibration_cases = 4, "0.2", 4
    out_path = Path(args.out) if args.out else RESULTS / (
        "recomp_lm_quick.json" if args.quick else "recomp_lm.json")
    rates = [float(x) for x in args.rates.split(",")]
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    cases_cached_only = args.cache_only or args.only_calibration
    if cases_cached_only:
        skip |= {"trained"}
    if args.only_calibration:
        skip |= {"abstractive"}

    import torch

    torch.set_num_threads(args.threads)
    from ctxzip.models import cache_dir
    from ctxzip.prompt import AbstractiveCompressor, ExtractiveCompressor
    from ctxzip.rag.index import PassageIndex, index_documents
    from ctxzip.rag.train_extractive import (
        ContinuationScorer,
        lm_examples,
        pydoc_documents,
        split_by_source,
    )

    t_start = time.perf_counter()
    docs = pydoc_documents()
    train_docs, test_docs = split_by_source(docs)  # the CLI's default split (seed 0, 30%)
    ix_dir = cache_dir() / "bench" / "pydoc-passages-minilm"
    if (ix_dir / "index.faiss").is_file():
        index = PassageIndex.load(ix_dir)
    else:
        index = index_documents(docs, words=100, progress=True)
        index.save(ix_dir)
    scorer = ContinuationScorer(args.lm, batch_size=4)
    tok = scorer.tokenizer
    geo = dict(prefix_tokens=args.prefix_tokens, continuation_tokens=args.continuation_tokens,
               query_tokens=args.query_tokens, stride=args.prefix_tokens + args.continuation_tokens,
               max_per_doc=3)
    all_cases = lm_examples(test_docs, index, tok, **geo)
    rng = np.random.default_rng(0)
    pick = sorted(rng.permutation(len(all_cases))[: args.cases].tolist())
    cases = [all_cases[i] for i in pick]
    print(f"{len(docs)} documents, {len(index)} passages; {len(test_docs)} test documents "
          f"({len({d.source for d in test_docs})} topics) -> {len(all_cases)} cases, "
          f"evaluating {len(cases)}", flush=True)

    settings = {"geo": geo, "lm": args.lm, "k": 5, "index": len(index), "v": 2}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache_path = cache_dir() / "bench" / "recomp_lm" / f"{tag}.jsonl"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[int, dict]] = {}
    seen: dict[tuple[str, str], dict] = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                seen[(d["key"], d["method"])] = d
    case_key = {i: hashlib.sha256(json.dumps([ex.doc_id, ex.prefix, ex.passage_ids]).encode())
                .hexdigest()[:16] for i, ex in enumerate(cases)}

    def have(i: int, method: str) -> bool:
        d = seen.get((case_key[i], method))
        if d is not None:
            rows.setdefault(method, {})[i] = d
        return d is not None

    def record(i: int, ex, contexts: dict[str, tuple[str, dict]]) -> None:
        todo = {m: v for m, v in contexts.items() if not have(i, m)}
        if not todo or cases_cached_only:
            return
        nll = scorer.nll([v[0] for v in todo.values()], ex.prefix, ex.continuation)
        with cache_path.open("a") as f:
            for (m, (ctx, extra)), x in zip(todo.items(), nll):
                d = {"key": case_key[i], "method": m, "nll": float(x),
                     "tokens": len(tok(ctx, add_special_tokens=False)["input_ids"]) if ctx else 0,
                     **extra}
                seen[(case_key[i], m)] = d
                rows.setdefault(m, {})[i] = d
                f.write(json.dumps(d) + "\n")

    phase_seconds: dict[str, float] = {}
    mdir = Path(args.model_dir) if args.model_dir else cache_dir() / "recomp-extractive-pydoc"
    report: dict = {}

    def load_report() -> dict:
        if (mdir / "train_report.json").is_file():
            return json.loads((mdir / "train_report.json").read_text())
        return {}

    def write(final: bool = False) -> dict:
        summary = summarise(rows, list(range(len(cases))))
        none = rows.get("none", {})
        full = rows.get("full", {})
        ext = summary.get("extractive@0.2", {})
        tr = summary.get("extractive-trained@0.2", {})
        sels = {m: summary[m] for m in summary if "selective" in m or "gate" in m}
        goals = {
            "extractive_at_0.2_retains_ge_0.9": {
                "default_pooled": ext.get("benefit_retained_pooled"),
                "default_pooled_ci95": ext.get("benefit_retained_pooled_ci95"),
                "default_median": ext.get("benefit_retained_median"),
                "trained_pooled": tr.get("benefit_retained_pooled"),
                "trained_median": tr.get("benefit_retained_median"),
                "met_pooled": bool(max(ext.get("benefit_retained_pooled", -9),
                                       tr.get("benefit_retained_pooled", -9)) >= 0.9),
                "met_median": bool(max(ext.get("benefit_retained_median") or -9,
                                       tr.get("benefit_retained_median") or -9) >= 0.9),
            },
            "selective_never_worse_than_no_docs": {
                m: {"mean_gain_vs_none": s["mean_gain_vs_none"],
                    "ci95": s["mean_gain_vs_none_ci95"],
                    "met": bool(s["mean_gain_vs_none"] >= 0.0)} for m, s in sels.items()},
        }
        rep = report or load_report()
        out = {
            "setup": {
                "corpus": "pydoc_data.topics via ctxzip.eval.prose_documents(min_chars=1500, "
                          "max_chars=4000); test = 30% of topics (split_by_source seed 0)",
                "passages": len(index), "passage_words": 100, "retrieved_k": 5,
                "dedup": "passages of the same document or sharing an 8-word n-gram with it "
                         "are never retrieved",
                **geo, "test_documents": len(test_docs), "cases_available": len(all_cases),
                "cases": len(cases), "cases_evaluated": len(full),
                "target_lm": args.lm or "SmolLM2-135M-Instruct",
                "encoder": "all-MiniLM-L6-v2", "trained_model": str(mdir),
                "train_report": {k: rep.get(k) for k in (
                    "config", "train_cases", "dev_cases", "cases_with_positive", "triplets",
                    "threshold", "base_encoder_threshold", "training",
                    "dev_mean_gain_base_encoder", "dev_mean_gain_always",
                    "dev_mean_gain_selective", "seconds_labelling", "seconds_total")},
                "full_docs_help_fraction": float(np.mean([full[c]["nll"] < none[c]["nll"]
                                                          for c in full if c in none]))
                if full else None,
                "mean_nll_none": float(np.mean([d["nll"] for d in none.values()])) if none
                else None,
                "mean_nll_full": float(np.mean([d["nll"] for d in full.values()])) if full
                else None,
                "mean_full_tokens": float(np.mean([d["tokens"] for d in full.values()]))
                if full else None,
                "bootstrap": "2000 resamples of cases, percentile 95% CI",
                "selective_calibration_packaged_encoder": calib,
            },
            "summary": summary,
            "goals": goals,
            "seconds": {**phase_seconds, "total": time.perf_counter() - t_start},
            "finished": final,
            "machine": machine(),
            "cases": [{"doc_id": ex.doc_id, "passage_ids": ex.passage_ids} for ex in cases],
            "rows": {m: {str(c): d for c, d in v.items()} for m, v in rows.items()},
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=2))
        plot(summary, rates, out_path.with_suffix(".png"))
        return out

    calib: dict = {}

    def derive_selective() -> None:
        """Selective augmentation: no context when the best sentence scores below the
        threshold calibrated on held-out training-side documents (this script's calibration
        cases for the packaged encoder, train_report.json for the trained one)."""
        rep = load_report()
        for src, key in (("extractive@0.2", "base_encoder_threshold"),
                         ("extractive-trained@0.2", "threshold")):
            if src not in rows:
                continue
            if src == "extractive@0.2" and "threshold" in calib:
                th = calib["threshold"]
            elif rep and key in rep:
                th = rep[key]
            else:
                continue
            dst = src.replace("@", "+selective@")
            rows[dst] = {}
            for i, d in rows[src].items():
                empty = th is not None and d["best_score"] < th
                sel = dict(d, method=dst, empty=bool(empty), threshold=th)
                if empty:
                    sel.update(nll=rows["none"][i]["nll"], tokens=0)
                rows[dst][i] = sel

    from tqdm.auto import tqdm

    # ---------------------------------------------------------------- phase 1: untrained
    base = ExtractiveCompressor(tokenizer=tok)
    t0 = time.perf_counter()
    phase1 = ("none", "full", *[f"{b}@{r}" for r in rates for b in (
        "extractive", "first-sentences", "random-sentences")],
        *(("extractive-top1-sentence", "extractive-prefix-query@0.2") if 0.2 in rates else ()))
    for i, ex in enumerate(tqdm(cases, desc="baselines + extractive")):
        if all([have(i, m) for m in phase1]) or cases_cached_only:
            continue  # every row of this case is cached (or nothing new may be computed)
        ctx = {"none": ("", {}), "full": ("\n\n".join(ex.passages), {})}
        for r in rates:
            b = Budget(rate=r)
            res = base.compress(ex.passages, query=ex.query, budget=b)
            ctx[f"extractive@{r}"] = (res.text, {"best_score": res.details["best_score"]})
            ctx[f"first-sentences@{r}"] = (baseline_select(ex.passages, b, tok, "first", i), {})
            ctx[f"random-sentences@{r}"] = (baseline_select(ex.passages, b, tok, "random", i),
                                            {})
            if r == 0.2:  # query = the whole 128-token prefix (chosen on training-side cases)
                res_p = base.compress(ex.passages, query=ex.prefix, budget=b)
                ctx["extractive-prefix-query@0.2"] = (
                    res_p.text, {"best_score": res_p.details["best_score"]})
            if r == 0.2:  # RECOMP's sentence budget, top-1, from the same scores
                sents = [s for j, p in enumerate(ex.passages) for s in split_sentences(p, doc=j)]
                best = int(np.argmax([s["score"] for s in res.details["sentences"]]))
                ctx["extractive-top1-sentence"] = (sents[best].text, {})
        record(i, ex, ctx)
    phase_seconds["baselines+extractive"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- calibration
    # the packaged encoder's selective threshold, from cases of *training-side* documents
    # (never the test documents): calibrate_threshold maximises the total NLL gain there
    t0 = time.perf_counter()
    from ctxzip.prompt.extractive import calibrate_threshold

    pool = lm_examples(train_docs, index, tok, **{**geo, "max_per_doc": 1})
    crng = np.random.default_rng(1)
    cal = [pool[j] for j in sorted(crng.permutation(len(pool))[: args.calibration_cases])]
    best, gains = [], []
    for ex in tqdm(cal, desc="calibrating selective threshold"):
        ck = "cal:" + hashlib.sha256(json.dumps([ex.doc_id, ex.prefix]).encode()).hexdigest()[:16]
        d = seen.get((ck, "calibration"))
        if d is None and args.cache_only:
            continue
        if d is None:
            res = base.compress(ex.passages, query=ex.query, budget=Budget(rate=0.2))
            n = scorer.nll([None, res.text], ex.prefix, ex.continuation)
            d = {"key": ck, "method": "calibration", "best_score": res.details["best_score"],
                 "gain": float(n[0] - n[1])}
            seen[(ck, "calibration")] = d
            with cache_path.open("a") as f:
                f.write(json.dumps(d) + "\n")
        best.append(d["best_score"])
        gains.append(d["gain"])
    if best:
        calib.update(threshold=calibrate_threshold(best, gains), cases=len(best),
                     documents="training-side (disjoint from the test topics)",
                     mean_gain=float(np.mean(gains)))
    phase_seconds["calibration"] = time.perf_counter() - t0
    derive_selective()
    write()

    # ---------------------------------------------------------------- oracle (ceiling)
    # NOT a deployable method: selects with the teacher signal on the real continuation
    if "oracle" not in skip:
        t0 = time.perf_counter()
        for i, ex in enumerate(tqdm(cases, desc="oracle (teacher-signal ceiling)")):
            if all(have(i, f"{m}@0.2") for m in ("oracle-marginal", "oracle-greedy")):
                continue
            if cases_cached_only:
                continue
            lab = seen.get((case_key[i], "oracle-labels"))
            lab, ctxs = oracle_contexts(ex, scorer, tok, Budget(rate=0.2), lab)
            if (case_key[i], "oracle-labels") not in seen:
                d = {"key": case_key[i], "method": "oracle-labels", **lab}
                seen[(case_key[i], "oracle-labels")] = d
                with cache_path.open("a") as f:
                    f.write(json.dumps(d) + "\n")
            ctx_m, extra_m, _ = ctxs["oracle-marginal"]
            record(i, ex, {"oracle-marginal@0.2": (ctx_m, extra_m)})
            ctx_g, extra_g, n_g = ctxs["oracle-greedy"]
            if not have(i, "oracle-greedy@0.2"):
                d = {"key": case_key[i], "method": "oracle-greedy@0.2",
                     "nll": n_g if np.isfinite(n_g) else rows["none"][i]["nll"],
                     "tokens": len(tok(ctx_g, add_special_tokens=False)["input_ids"])
                     if ctx_g else 0, **extra_g}
                seen[(case_key[i], d["method"])] = d
                rows.setdefault(d["method"], {})[i] = d
                with cache_path.open("a") as f:
                    f.write(json.dumps(d) + "\n")
            if i % 4 == 3:
                write()
        phase_seconds["oracle"] = time.perf_counter() - t0
        write()

    # ---------------------------------------------------------------- phase 2: trained
    if "trained" not in skip:
        if not (mdir / "train_report.json").is_file():
            cmd = [sys.executable, "-m", "ctxzip", "rag", "train-extractive", "--out", str(mdir),
                   "--index", str(ix_dir)]
            if args.quick:
                cmd += ["--max-docs", "6", "--epochs", "1"]
            print("training:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                 "OMP_NUM_THREADS": str(args.threads)})
        report = load_report()
        trained_ids = set(report["train_doc_ids"]) | set(report["dev_doc_ids"])
        overlap = trained_ids & {ex.doc_id for ex in cases}
        assert not overlap, f"trained on test documents: {sorted(overlap)[:5]}"
        trained = ExtractiveCompressor.from_pretrained(mdir, tokenizer=tok, threshold=None)
        mtag = hashlib.sha256(json.dumps([report.get("seconds_total"), report.get("triplets")])
                              .encode()).hexdigest()[:8]  # a retrained model gets new rows
        t0 = time.perf_counter()
        for i, ex in enumerate(tqdm(cases, desc="trained extractive")):
            ctx = {}
            for r in rates:
                res = trained.compress(ex.passages, query=ex.query, budget=Budget(rate=r))
                ctx[f"extractive-trained@{r}#{mtag}"] = (
                    res.text, {"best_score": res.details["best_score"]})
            record(i, ex, ctx)
        for m in list(rows):
            if m.endswith(f"#{mtag}"):
                rows[m.split("#")[0]] = rows.pop(m)
        derive_selective()
        phase_seconds["trained"] = time.perf_counter() - t0
        write()

    # ---------------------------------------------------------------- phase 3: abstractive
    if "abstractive" not in skip:
        absc = AbstractiveCompressor(model=scorer.model, generation_tokenizer=tok, tokenizer=tok,
                                     relevance_threshold=None, max_input_tokens=1024)
        gate = 0.5
        n_abs = len(cases) if args.abstractive_cases is None else args.abstractive_cases
        r_abs = 0.2
        t0 = time.perf_counter()

        def derive_gate() -> None:
            for i in rows.get(f"abstractive@{r_abs}", {}):
                d = rows[f"abstractive@{r_abs}"][i]
                sel = dict(d, empty=bool(d.get("empty") or d["relevance"] < gate))
                if sel["empty"]:
                    sel.update(nll=rows["none"][i]["nll"], tokens=0)
                rows.setdefault(f"abstractive+gate@{r_abs}", {})[i] = sel

        for i, ex in enumerate(tqdm(cases[:n_abs], desc="abstractive")):
            if have(i, f"abstractive@{r_abs}") or args.cache_only:
                continue
            res = absc.compress(ex.passages, query=ex.query, budget=Budget(rate=r_abs))
            p_yes = absc.relevance(ex.query, ex.passages)
            record(i, ex, {f"abstractive@{r_abs}": (res.text, {
                "relevance": p_yes, "empty": bool(res.details.get("selective_empty")),
                "raw": res.details.get("raw", "")[:400]})})
            derive_gate()
            phase_seconds["abstractive"] = time.perf_counter() - t0
            write()  # partial results after every case (the slowest phase)
        derive_gate()
        phase_seconds["abstractive"] = time.perf_counter() - t0
    out = write(final=not cases_cached_only)
    print(json.dumps({"summary": {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv)
                                      for kk, vv in v.items()}
                                  for k, v in out["summary"].items()},
                      "goals": out["goals"]}, indent=1))


def plot(summary: dict, rates: list[float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key in zip(axes, ("benefit_retained_pooled", "benefit_retained_median")):
        for m, style in (("extractive", "o-"), ("extractive-trained", "s-"),
                         ("first-sentences", "^--"), ("random-sentences", "v:")):
            pts = [(summary[f"{m}@{r}"]["achieved_rate"], summary[f"{m}@{r}"][key],
                    summary[f"{m}@{r}"][key + "_ci95"]) for r in rates if f"{m}@{r}" in summary]
            if pts:
                x, y, ci = zip(*pts)
                err = np.array([[yy - c[0], c[1] - yy] for yy, c in zip(y, ci)]).T
                ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=m)
        for m, mk in (("extractive-top1-sentence", "x"), ("extractive-prefix-query@0.2", "h"),
                      ("oracle-greedy@0.2", "*"), ("oracle-marginal@0.2", "p"), ("abstractive@0.2", "X"),
                      ("abstractive+gate@0.2", "P"), ("extractive+selective@0.2", "d"),
                      ("extractive-trained+selective@0.2", "D")):
            if m in summary:
                ax.plot(summary[m]["achieved_rate"], summary[m][key], mk, markersize=9, label=m)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.axhline(0.9, color="green", lw=0.8, ls="--")
        ax.set_xlabel("achieved rate (tokens kept / retrieved tokens)")
        ax.set_ylabel(f"context benefit retained ({key.split('_')[-1]}, 95% CI)")
    axes[0].legend(fontsize=7)
    n = next(iter(summary.values()))["cases"] if summary else 0
    fig.suptitle(f"RECOMP LM setup on pydoc topics, SmolLM2-135M target, {n} cases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
