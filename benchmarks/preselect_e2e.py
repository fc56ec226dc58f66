"""PreSelect end to end on real local text with a model ladder built offline.

Ladder (all offline): SmolLM2-135M (30 layers) and layer-truncated views of it (first 24 / 18 /
12 layers: same tokenizer and weights, less depth -- a controlled "smaller model" ladder), plus
Gemma-3-270M (another family) when installed. Their "benchmark scores" are NOT public benchmark
numbers: each is measured here as -BPC on held-out task text (chunks of held-out CPython test
files), i.e. how well the model predicts the task we select data for.

Pool: ~1,000-char chunks of CPython stdlib code and of pydoc_data.topics prose (real text).
1. BPC of every pool document under every rung (sliding window inside each document).
2. Predictive strength S (normalised concordance with the benchmark order), positives = S == 1,
   as many negatives from the lowest S; fastText trained (reference settings: 3 epochs, lr 0.1,
   word bigrams; plus a 25-epoch variant since a few hundred documents underfit 3 epochs).
3. Agreement of the classifier with the loss-based labels on held-out documents (AUC, Spearman
   with S), and a global-budget selection (top 10% of characters, as PreSelect's
   find_threshold.py) with ``select()``; the loss-based selection (-BPC under SmolLM2) beside it.

    python benchmarks/preselect_e2e.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _datasel_data as data  # noqa: E402


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def build_pool(n_code: int, n_prose: int, n_task: int, chars: int = 1000) -> dict:
    from ctxzip.eval.corpora import prose_documents

    code, task = [], []
    for rel, p in data.stdlib_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        held = rel.startswith("test/") and int(data._h(rel), 16) % 10 == 0
        if rel.startswith("test/") and not held:
            continue
        for i, c in enumerate(data.chunk_text(text, chars)):
            (task if held else code).append({"id": f"{rel}#{i}", "text": c, "kind": "code"})
    code.sort(key=lambda r: data._h(r["id"]))
    task.sort(key=lambda r: data._h(r["id"]))
    prose = []
    for d in prose_documents(min_chars=2000, max_chars=12000):
        for i, c in enumerate(data.chunk_text(d.text, chars)):
            prose.append({"id": f"{d.id}#{i}", "text": c, "kind": "prose"})
    prose.sort(key=lambda r: data._h(r["id"]))
    return {"code": code[:n_code], "prose": prose[:n_prose], "task": task[:n_task]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-gemma", action="store_true", help="leave Gemma-3-270M out")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (quality run: 1)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from ctxzip.datasel import FastTextScorer, LadderModel, PreSelect, select, train_fasttext
    from ctxzip.datasel.bpc import LossScorer
    from ctxzip.datasel.preselect import balanced_labels, predictive_strength
    from ctxzip.models import ModelNotFoundError, load_causal_lm

    n = 40 if a.quick else 240
    pool = build_pool(n_code=n, n_prose=n, n_task=10 if a.quick else 40)
    docs = pool["code"] + pool["prose"]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(docs))
    docs = [docs[i] for i in perm]
    n_train = int(len(docs) * 0.7)
    texts = [d["text"] for d in docs]
    kinds = np.array([d["kind"] for d in docs])

    specs = ["smollm2", "smollm2@layers=24", "smollm2@layers=18", "smollm2@layers=12"]
    if not a.no_gemma:
        try:
            load_causal_lm("gemma3-270m")
            specs.append("gemma3-270m")
        except ModelNotFoundError as e:
            print(f"Gemma-3-270M not available ({e}); ladder without it")
    ps = PreSelect([LadderModel(s) for s in specs])
    t0 = time.perf_counter()
    bench = ps.measure_benchmarks([d["text"] for d in pool["task"]], progress=True)
    losses = ps.losses(texts, progress=True)
    t_bpc = time.perf_counter() - t0
    print("benchmark (-BPC on held-out task code):", dict(zip(specs, np.round(bench, 4))))

    strength = predictive_strength(losses, bench)
    tr = np.arange(n_train)
    te = np.arange(n_train, len(docs))
    pos, neg = balanced_labels(strength[tr])
    pos_te, neg_te = balanced_labels(strength[te])
    idx_te = np.concatenate([te[pos_te], te[neg_te]])
    y_te = np.concatenate([np.ones(len(pos_te)), np.zeros(len(neg_te))])
    work = Path(tempfile.mkdtemp(prefix="preselect_bench_"))
    clf = {}
    for name, kw in (("reference_3ep", {}), ("25ep", {"epoch": 25})):
        t1 = time.perf_counter()
        sc = train_fasttext([texts[i] for i in np.concatenate([pos, neg])],
                            [1] * len(pos) + [0] * len(neg), work / f"{name}.bin", **kw)
        t_train = time.perf_counter() - t1
        p = sc.score_texts(texts)
        clf[name] = {
            "scorer": sc, "p": p,
            "train_seconds": t_train,
            "heldout_auc_vs_loss_labels": auc(p[idx_te], y_te),
            "heldout_spearman_with_strength": spearman(p[te], strength[te]),
            "train_auc": auc(p[np.concatenate([pos, neg])],
                             np.r_[np.ones(len(pos)), np.zeros(len(neg))]),
            "p_range": [float(p.min()), float(p.max())],
        }
        print(name, {k: v for k, v in clf[name].items() if k not in ("scorer", "p")})

    # end to end: select() over a JSONL pool with the classifier, top 10% of characters
    pool_path = work / "pool.jsonl"
    data.write_jsonl(pool_path, [{"id": d["id"], "text": d["text"], "kind": d["kind"]}
                                 for d in docs])
    best = max(clf, key=lambda k: clf[k]["heldout_auc_vs_loss_labels"])
    total_chars = sum(len(t) for t in texts)
    t1 = time.perf_counter()
    summ = select(str(pool_path), FastTextScorer(str(work / f"{best}.bin")), work / "sel",
                  keep_tokens=total_chars // 10, token_unit="chars", workers=1, progress=False)
    t_ft = time.perf_counter() - t1
    sel_ids = {json.loads(line)["id"] for f in (work / "sel" / "selected").glob("*.jsonl")
               for line in f.read_text().splitlines()}
    t1 = time.perf_counter()
    loss = LossScorer("smollm2").score_texts(texts)
    t_loss = time.perf_counter() - t1
    k = summ.selected
    loss_top = {docs[i]["id"] for i in np.argsort(-loss, kind="stable")[:k]}
    in_sel = np.array([d["id"] in sel_ids for d in docs])
    res = {
        "machine": data.machine(),
        "quick": a.quick,
        "ladder": [{"spec": s, "benchmark_neg_bpc_on_task": float(b)} for s, b in zip(specs, bench)],
        "pool": {"docs": len(docs), "code": int((kinds == "code").sum()),
                 "prose": int((kinds == "prose").sum()), "train": n_train,
                 "heldout": len(docs) - n_train, "chars_per_doc": 1000},
        "labels": {"train_positives": len(pos), "train_negatives": len(neg),
                   "heldout_positives": len(pos_te), "heldout_negatives": len(neg_te),
                   "strength_hist": {f"{v:.2f}": int(c) for v, c in
                                     zip(*np.unique(np.round(strength, 2), return_counts=True))},
                   "positives_code_fraction": float(np.mean(kinds[tr][pos] == "code")),
                   "negatives_code_fraction": float(np.mean(kinds[tr][neg] == "code"))},
        "classifier": {k2: {kk: vv for kk, vv in v.items() if kk not in ("scorer", "p")}
                       for k2, v in clf.items()},
        "selection": {"classifier": best, "budget": summ.budget, "selected": summ.selected,
                      "records": summ.records, "selected_chars": summ.selected_tokens,
                      "selected_code_fraction": float(np.mean(kinds[in_sel] == "code")),
                      "pool_code_fraction": float(np.mean(kinds == "code")),
                      "mean_strength_selected": float(strength[in_sel].mean()),
                      "mean_strength_pool": float(strength.mean()),
                      "overlap_with_loss_selection": len(sel_ids & loss_top) / max(1, k),
                      "loss_selection_code_fraction": float(np.mean(
                          [d["kind"] == "code" for d in docs if d["id"] in loss_top]))},
        "seconds": {"bpc_all_models": t_bpc, "fasttext_select_pipeline": t_ft,
                    "loss_scorer_smollm2": t_loss},
        "docs_per_s": {"fasttext_select_pipeline": len(docs) / t_ft,
                       "loss_scorer_smollm2": len(docs) / t_loss},
    }
    name = "preselect_e2e_quick" if a.quick else "preselect_e2e"
    out = HERE / "results" / f"{name}.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k2: res[k2] for k2 in ("ladder", "labels", "classifier", "selection",
                                            "docs_per_s")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
