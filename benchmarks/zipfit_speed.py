"""ZIP-FIT speed, memory and exactness vs the reference implementation, side by side.

Data (real, local, deterministic; see _datasel_data.py): source = CPython stdlib .py files cut
into ~2,000-char chunks (~15k), target = 100 chunks of held-out stdlib test files.

Runs, each in its own subprocess (peak memory = summed PSS of the process tree, sampled):
- ``reference``: stair-lab/ZIP-FIT ``zip_fit/zipfit.py`` run from its source tree (``--ref``),
  ``ZIPFIT(..., compression_algorithm="gzip", compress_level=6).rank_sequences_by_alignment``
  (its own Pool(cpu_count()) parallelism);
- ``exact``: ctxzip ``select()`` over the JSONL file with ``ZipFit(codec="gzip", level=6)``,
  1 process and ``--workers`` processes;
- ``fast``: the same with faster codecs; the fastest one with >= 90% top-1,000 overlap with
  exact mode is reported as fast mode;
- memory growth: exact mode (10 targets) on the corpus and on the corpus x4.
Plus, in this process: CPU per (doc, target) pair of ctxzip's exact loop vs a bare
``gzip.compress(x + t, 6)`` loop on the same pairs.

    python benchmarks/zipfit_speed.py [--quick] [--ref /work/ref/ZIP-FIT] [--workers 2]

Writes benchmarks/results/zipfit_speed[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _datasel_data as data  # noqa: E402

# single faster codecs (every pair compressed with it)
FAST_CANDIDATES = ["isal-0", "gzip-1", "lz4-0", "isal-1"]
# cascades: (label, prefilter codec, prefilter targets, margin): the prefilter scores every
# document (optionally against a subset of the targets), exact gzip-6 rescores the best
# margin x 1,000, and the 1,000 are taken by exact score among them.
CASCADES = [("isal-0/50t>gzip-6 m3", "isal-0", 50, 3.0),
            ("isal-0/25t>gzip-6 m3", "isal-0", 25, 3.0),
            ("isal-0>gzip-6 m3", "isal-0", 100, 3.0)]


# ------------------------------------------------------------------------------ children
def _cpu() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def child_ours(a: argparse.Namespace) -> dict:
    from ctxzip.datasel import ZipFit, select
    from ctxzip.datasel.io import iter_records

    targets = [r.text for r in iter_records(a.target)][: a.n_targets]
    scorer = ZipFit(targets, codec=a.codec)
    kw = {}
    if a.prefilter:
        kw = {"prefilter": ZipFit(targets[: a.prefilter_targets], codec=a.prefilter),
              "margin": a.margin}
    out = tempfile.mkdtemp(prefix="zf_out_")
    t0, c0 = time.perf_counter(), _cpu()
    summ = select(a.source, scorer, out, keep=a.keep, workers=a.workers,
                  shard_size=a.shard_size, progress=False, write_rejected=False, **kw)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    ids = [r.id for r in iter_records(a.source)]
    index = {d: i for i, d in enumerate(ids)}
    sel = np.zeros(len(ids), dtype=bool)
    for f in Path(out, "selected").glob("*.jsonl"):
        with open(f) as fh:
            for line in fh:
                sel[index[json.loads(line)["id"]]] = True
    scores = []
    if not a.prefilter:
        for f in sorted(Path(out, "scores").glob("*.jsonl")):
            with open(f) as fh:
                scores.extend(json.loads(line)["score"] for line in fh)
    np.save(a.save, np.asarray(scores))
    np.save(a.save.replace(".npy", "_sel.npy"), sel)
    shutil.rmtree(out)
    return {"wall_s": wall, "cpu_s": cpu, "docs": summ.records, "targets": len(targets),
            "seconds": summ.seconds, "cascade": summ.cascade}


def child_ref(a: argparse.Namespace) -> dict:
    sys.path.insert(0, a.ref)
    from zip_fit.zipfit import ZIPFIT  # the reference, from its source tree

    z = ZIPFIT(a.source, a.target, k=10**9, output_file=os.devnull,
               compression_algorithm="gzip", compress_level=6)
    src = z.load_and_process_datasets(a.source, None, None)
    tgt = z.load_and_process_datasets(a.target, None, None)[: a.n_targets]
    t0, c0 = time.perf_counter(), _cpu()
    top = z.rank_sequences_by_alignment(src, tgt)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    by_text = {t: s for t, s in top}
    np.save(a.save, np.asarray([by_text[t] for t in src]))
    return {"wall_s": wall, "cpu_s": cpu, "docs": len(src), "targets": len(tgt)}


# ------------------------------------------------------------------------------- parent
def _tree_pss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss
    return total


def run_child(args: list[str], label: str) -> dict:
    import psutil

    load = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    ps = psutil.Process(proc.pid)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_pss(ps))
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode})")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res.update(label=label, peak_pss_mb=peak[0] / 2**20, load_avg_1m=load)
    res["docs_per_s"] = res["docs"] / res["wall_s"]
    res["cpu_us_per_pair"] = res["cpu_s"] / (res["docs"] * res["targets"]) * 1e6
    print(f"  {label:28s} {res['docs_per_s']:8.1f} docs/s  {res['cpu_us_per_pair']:6.1f} us CPU/pair"
          f"  peak {res['peak_pss_mb']:7.1f} MB  (load {load:.1f})", flush=True)
    return res


def bare_vs_ours(targets: list[str], docs: list[str], repeats: int = 3) -> dict:
    """CPU per pair: bare gzip.compress(x+t, 6) vs ctxzip's exact loop, alternating."""
    from ctxzip.datasel import ZipFit

    z = ZipFit(targets, codec="gzip", level=6)
    tb = [t.encode() for t in targets]
    pairs = len(docs) * len(targets)
    bare, ours = [], []
    for _ in range(repeats):
        c0 = time.process_time()
        for d in docs:
            xb = d.encode()
            for t in tb:
                gzip.compress(xb + t, compresslevel=6)
        bare.append((time.process_time() - c0) / pairs * 1e6)
        c0 = time.process_time()
        z.score_texts(docs)
        ours.append((time.process_time() - c0) / pairs * 1e6)
    return {"pairs": pairs, "bare_gzip_us_per_pair": statistics.median(bare),
            "ctxzip_exact_us_per_pair": statistics.median(ours),
            "ratio_ours_over_bare": statistics.median(ours) / statistics.median(bare),
            "all_bare": bare, "all_ours": ours}


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    from ctxzip.budget import topk_indices

    k = min(k, a.shape[0])
    return len(set(topk_indices(a, k).tolist()) & set(topk_indices(b, k).tolist())) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,500 docs, 20 targets")
    ap.add_argument("--ref", default="/work/ref/ZIP-FIT",
                    help="path of the reference ZIP-FIT source tree (skipped if absent)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", choices=["ours", "ref"])
    ap.add_argument("--source")
    ap.add_argument("--target")
    ap.add_argument("--codec", default="gzip-6")
    ap.add_argument("--n-targets", type=int, default=100)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--save")
    ap.add_argument("--keep", type=int, default=1000)
    ap.add_argument("--prefilter", default=None)
    ap.add_argument("--prefilter-targets", type=int, default=100)
    ap.add_argument("--margin", type=float, default=3.0)
    a = ap.parse_args()
    if a.child:
        res = child_ours(a) if a.child == "ours" else child_ref(a)
        print(json.dumps(res))
        return

    n_targets = 20 if a.quick else 100
    source, targets = data.build(n_targets=100, max_source=1500 if a.quick else None)
    targets = targets[:n_targets]
    work = Path(tempfile.mkdtemp(prefix="zipfit_bench_"))
    src, tgt = work / "source.jsonl", work / "target.jsonl"
    data.write_jsonl(src, source)
    data.write_jsonl(tgt, targets)
    src4 = work / "source_x4.jsonl"
    data.write_jsonl(src4, [{"id": f"{r['id']}@{k}", "text": r["text"]}
                            for k in range(4) for r in source])
    W = a.workers
    print(f"data: {len(source)} source chunks, {len(targets)} targets; workers={W}", flush=True)
    common = ["--source", str(src), "--target", str(tgt), "--n-targets", str(n_targets)]
    results: dict = {"machine": data.machine(), "quick": a.quick, "workers": W,
                     "data": {"source_docs": len(source), "targets": len(targets),
                              "chunk_chars": data.CHUNK_CHARS,
                              "source_chars": sum(len(r["text"]) for r in source)}}

    print("CPU per pair, bare gzip.compress vs ctxzip exact (same pairs, in-process):")
    sub = [r["text"] for r in source[:: max(1, len(source) // 150)]][:150]
    results["cpu_per_pair"] = bare_vs_ours([t["text"] for t in targets], sub)
    print("  ", {k: round(v, 3) for k, v in results["cpu_per_pair"].items()
                 if not k.startswith("all")}, flush=True)

    runs: dict[str, dict] = {}
    scores: dict[str, np.ndarray] = {}
    selected: dict[str, np.ndarray] = {}
    k = 150 if a.quick else 1000

    def ours(label: str, codec: str, workers: int, source_path: Path = src,
             n_t: int = n_targets, cascade: tuple | None = None) -> None:
        save = work / f"{label.replace('/', '_').replace(' ', '_').replace('>', '_')}.npy"
        args = ["ours", "--source", str(source_path), "--target", str(tgt),
                "--n-targets", str(n_t), "--codec", codec, "--workers", str(workers),
                "--save", str(save), "--keep", str(k)]
        if cascade:
            args += ["--prefilter", cascade[0], "--prefilter-targets",
                     str(min(n_t, cascade[1])), "--margin", str(cascade[2])]
        runs[label] = run_child(args, label)
        runs[label].update(codec=codec, workers=workers)
        scores[label] = np.load(save)
        selected[label] = np.load(str(save).replace(".npy", "_sel.npy"))

    print("runs:", flush=True)
    ref_ok = (Path(a.ref) / "zip_fit" / "zipfit.py").is_file()
    name = "zipfit_speed_quick" if a.quick else "zipfit_speed"
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not ref_ok:
        print(f"  reference ZIP-FIT not found at {a.ref}: skipping the reference runs "
              "(fetch stair-lab/ZIP-FIT and pass --ref PATH)", flush=True)
        results["reference_skipped"] = f"not found at {a.ref}"

    def reference() -> None:
        save = work / "reference.npy"
        runs["reference"] = run_child(["ref", *common, "--ref", a.ref, "--save", str(save)],
                                      "reference gzip-6")
        runs["reference"].update(codec="gzip-6", workers=os.cpu_count())
        scores["reference"] = np.load(save)

    # most important first; results are rewritten after every run (partial until the end)
    plan = [lambda: ours(f"exact_{W}proc", "gzip-6", W)]
    if ref_ok:
        plan.append(reference)
    cascades = CASCADES[:2] if a.quick else CASCADES
    fasts = FAST_CANDIDATES[:2] if a.quick else FAST_CANDIDATES
    plan.append(lambda: ours(f"cascade_{cascades[0][0]}", "gzip-6", W,
                             cascade=cascades[0][1:]))
    plan.append(lambda: ours(f"fast_{fasts[0]}", fasts[0], W))
    plan.append(lambda: ours("mem_x1_10targets", "gzip-6", W, src, 10))
    plan.append(lambda: ours("mem_x4_10targets", "gzip-6", W, src4, 10))
    plan.append(lambda: ours("exact_1proc", "gzip-6", 1))
    for c in fasts[1:]:
        plan.append(lambda c=c: ours(f"fast_{c}", c, W))
    for lab, pc, pt, m in cascades[1:]:
        plan.append(lambda lab=lab, pc=pc, pt=pt, m=m: ours(f"cascade_{lab}", "gzip-6", W,
                                                          cascade=(pc, pt, m)))
    for i, step in enumerate(plan):
        step()
        results["partial"] = i < len(plan) - 1
        results["runs"] = runs
        results["summary"] = summarize(runs, scores, selected, results, W, k, ref_ok)
        out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"], indent=1), flush=True)
    _plot(results, HERE / "results" / f"{name}.png")
    shutil.rmtree(work)
    print(f"wrote {out}")


def summarize(runs: dict, scores: dict, selected: dict, results: dict, W: int, k: int,
              ref_ok: bool) -> dict:
    ex = f"exact_{W}proc"
    exact = scores[ex]
    exact_top = set(np.flatnonzero(selected[ex]).tolist())
    summary: dict = {}
    if "exact_1proc" in runs:
        summary["exact_1proc_vs_Wproc_identical"] = bool(np.array_equal(exact,
                                                                        scores["exact_1proc"]))
        summary["exact_parallel_speedup"] = runs[ex]["docs_per_s"] / runs["exact_1proc"]["docs_per_s"]
        summary["exact_Wproc_cpu_per_pair_over_1proc"] = (runs[ex]["cpu_us_per_pair"]
                                                          / runs["exact_1proc"]["cpu_us_per_pair"])
    if "reference" in runs:
        ref = scores["reference"]
        summary["exact_vs_reference"] = {
            "bit_identical_fraction": float(np.mean(exact == ref)),
            "max_abs_diff": float(np.max(np.abs(exact - ref))),
            f"top{k}_overlap": top_overlap(exact, ref, k),
        }
        rr = runs["reference"]
        summary["exact_speed_vs_reference"] = runs[ex]["docs_per_s"] / rr["docs_per_s"]
        summary["exact_cpu_per_pair_vs_reference"] = runs[ex]["cpu_us_per_pair"] / rr["cpu_us_per_pair"]
        summary["exact_peak_memory_fraction_of_reference"] = runs[ex]["peak_pss_mb"] / rr["peak_pss_mb"]
    summary["exact_cpu_per_pair_over_bare_gzip"] = results["cpu_per_pair"]["ratio_ours_over_bare"]
    if "mem_x4_10targets" in runs:
        summary["memory_x4_over_x1"] = (runs["mem_x4_10targets"]["peak_pss_mb"]
                                        / runs["mem_x1_10targets"]["peak_pss_mb"])
    fast = {}
    for lab in runs:
        if not lab.startswith(("fast_", "cascade_")):
            continue
        c = lab.split("_", 1)[1]
        got = set(np.flatnonzero(selected[lab]).tolist())
        fast[c] = {"docs_per_s": runs[lab]["docs_per_s"],
                   "cpu_us_per_pair": runs[lab]["cpu_us_per_pair"],
                   f"top{k}_overlap_with_exact": len(got & exact_top) / k,
                   "speed_vs_exact": runs[lab]["docs_per_s"] / runs[ex]["docs_per_s"],
                   "cpu_per_pair_vs_exact": runs[lab]["cpu_us_per_pair"] / runs[ex]["cpu_us_per_pair"]}
        if "reference" in runs:
            rr = runs["reference"]
            fast[c]["speed_vs_reference"] = runs[lab]["docs_per_s"] / rr["docs_per_s"]
            fast[c]["cpu_per_pair_vs_reference"] = runs[lab]["cpu_us_per_pair"] / rr["cpu_us_per_pair"]
    summary["fast_candidates"] = fast
    ok = [c for c, v in fast.items() if v[f"top{k}_overlap_with_exact"] >= 0.9]
    # the cheapest in CPU per pair (wall-clock docs/s depends on the shared machine's load)
    summary["fast_mode"] = min(ok, key=lambda c: fast[c]["cpu_us_per_pair"]) if ok else None
    return summary


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = {k: v for k, v in results["runs"].items() if not k.startswith("mem_")}
    labels = list(runs)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ax[0].barh(labels, [runs[k]["docs_per_s"] for k in labels], color="tab:blue")
    ax[0].set_xlabel("docs/s (x100 targets)")
    ax[0].set_xscale("log")
    ax[1].barh(labels, [runs[k]["peak_pss_mb"] for k in labels], color="tab:orange")
    ax[1].set_xlabel("peak memory (PSS of the process tree, MB)")
    fig.suptitle(f"ZIP-FIT on {results['data']['source_docs']} stdlib chunks, "
                 f"{results['workers']} workers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
