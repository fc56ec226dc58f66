"""DSIR (PyPI ``data-selection``, HashedNgramDSIR) vs ZIP-FIT on the same data, side by side.

Same data as zipfit_speed.py (stdlib code chunks, 100 held-out test-suite targets). Both pick
1,000 documents: DSIR by its importance weights (``resample(top_k=True)``: hashed word uni+bigram
features, 10k buckets, wordpunct tokenizer -- its defaults), ZIP-FIT exact (gzip-6) and fast
(``ZipFitRace``: gzip-6 pairs raced after an ISA-L-0 prefilter) with ctxzip. Reports docs/s of
each and the overlaps of their selections, and
how much of each selection comes from the test suite (the target's own domain: a crude
"relevance" check, the held-out target files themselves are never in the source).

    python benchmarks/dsir_compare.py [--quick] [--workers 2]
"""

from __future__ import annotations

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


def main() -> None:
    a = data.parse_args(__doc__, "1,500 docs, 20 targets")
    from data_selection import HashedNgramDSIR

    from ctxzip.budget import topk_indices
    from ctxzip.datasel import ZipFit, ZipFitRace

    n_t = 20 if a.quick else 100
    k = 150 if a.quick else 1000
    source, targets = data.build(100, max_source=1500 if a.quick else None)
    targets = targets[:n_t]
    work = Path(tempfile.mkdtemp(prefix="dsir_bench_"))
    data.write_jsonl(work / "source.jsonl", source)
    data.write_jsonl(work / "target.jsonl", targets)
    ids = [r["id"] for r in source]
    texts = [r["text"] for r in source]
    res: dict = {"machine": data.machine(), "quick": a.quick, "docs": len(source),
                 "targets": n_t, "k": k, "workers": a.workers}

    t0 = time.perf_counter()
    dsir = HashedNgramDSIR([str(work / "source.jsonl")], [str(work / "target.jsonl")],
                           cache_dir=str(work / "dsir_cache"), num_proc=a.workers)
    dsir.fit_importance_estimator(num_tokens_to_fit="auto")
    t_fit = time.perf_counter()
    dsir.compute_importance_weights()
    t_w = time.perf_counter()
    dsir.resample(out_dir=str(work / "dsir_out"), num_to_sample=k,
                  cache_dir=str(work / "dsir_tmp"), top_k=True)
    t_end = time.perf_counter()
    dsir_sel = set()
    for f in (work / "dsir_out").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            dsir_sel.add(json.loads(line)["id"])
    res["dsir"] = {"fit_s": t_fit - t0, "weights_s": t_w - t_fit, "resample_s": t_end - t_w,
                   "docs_per_s": len(source) / (t_end - t0), "selected": len(dsir_sel)}
    print("dsir", res["dsir"], flush=True)

    sels = {"dsir": dsir_sel}
    tt = [t["text"] for t in targets]
    t0 = time.perf_counter()
    s = ZipFit(tt, codec="gzip-6").score(texts, workers=a.workers)
    dt = time.perf_counter() - t0
    sels["zipfit_exact_gzip6"] = {ids[i] for i in topk_indices(s, k).tolist()}
    res["zipfit_exact_gzip6"] = {"seconds": dt, "docs_per_s": len(source) / dt}
    print("zipfit_exact_gzip6", res["zipfit_exact_gzip6"], flush=True)
    t0 = time.perf_counter()
    r = ZipFitRace(tt).select(texts, k, workers=a.workers)
    dt = time.perf_counter() - t0
    sels["zipfit_fast_race"] = {ids[i] for i in r.selected.tolist()}
    res["zipfit_fast_race"] = {"seconds": dt, "docs_per_s": len(source) / dt,
                               "exact_pairs_fraction": r.pairs_fraction}
    print("zipfit_fast_race", res["zipfit_fast_race"], flush=True)
    names = list(sels)
    res["overlap"] = {f"{x} & {y}": len(sels[x] & sels[y]) / k
                      for i, x in enumerate(names) for y in names[i + 1:]}
    pool_test = np.mean([d.startswith("test/") for d in ids])
    res["test_suite_fraction"] = {"pool": float(pool_test)} | {
        n: float(np.mean([d.startswith("test/") for d in s])) for n, s in sels.items()}
    res["speed_ratio_dsir_over_zipfit_exact"] = (res["dsir"]["docs_per_s"]
                                                 / res["zipfit_exact_gzip6"]["docs_per_s"])
    res["speed_ratio_dsir_over_zipfit_fast"] = (res["dsir"]["docs_per_s"]
                                                / res["zipfit_fast_race"]["docs_per_s"])
    print(json.dumps({x: res[x] for x in ("overlap", "test_suite_fraction")}, indent=1))
    name = "dsir_compare_quick" if a.quick else "dsir_compare"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {HERE / 'results' / f'{name}.json'}")


if __name__ == "__main__":
    main()
