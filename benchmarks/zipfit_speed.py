"""ZIP-FIT speed, memory and exactness vs the reference implementation, side by side.

Data (real, local, deterministic; see _datasel_data.py): source = CPython stdlib .py files cut
into ~2,000-char chunks (~15k), target = 100 chunks of held-out stdlib test files.

Runs, each in its own subprocess (peak memory = summed PSS of the process tree, sampled):
- ``reference``: stair-lab/ZIP-FIT ``zip_fit/zipfit.py`` run from its source tree (``--ref``),
  ``ZIPFIT(..., compression_algorithm="gzip", compress_level=6).rank_sequences_by_alignment``,
  with its Pool of ``--workers`` processes and of 1 process (its ``cpu_count`` patched);
- ``exact``: ctxzip ``select()`` over the JSONL file with ``ZipFit(codec="gzip", level=6)``,
  ``--workers`` processes and 1 process;
- ``fast``: ctxzip ``ZipFitRace`` (gzip-6 pairs raced over the targets after an ISA-L-0
  prefilter; why this and not a lighter codec: benchmarks/zipfit_codecs.py), both worker counts;
- memory growth: exact mode (10 targets) on the corpus and on the corpus x4.
Plus, in this process: CPU per (doc, target) pair of ctxzip's exact loop vs a bare
``gzip.compress(x + t, 6)`` loop on the same pairs.

    python benchmarks/zipfit_speed.py [--quick] [--ref /work/ref/ZIP-FIT] [--workers 2]

Writes benchmarks/results/zipfit_speed[_quick].json and .png (~6-7 min on an idle 2-core
machine; --quick ~1 min).
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
    out = tempfile.mkdtemp(prefix="zf_out_")
    t0, c0 = time.perf_counter(), _cpu()
    summ = select(a.source, scorer, out, keep=a.keep, workers=a.workers,
                  shard_size=a.shard_size, progress=False, write_rejected=False)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    ids = [r.id for r in iter_records(a.source)]
    index = {d: i for i, d in enumerate(ids)}
    sel = np.zeros(len(ids), dtype=bool)
    for f in Path(out, "selected").glob("*.jsonl"):
        with open(f) as fh:
            for line in fh:
                sel[index[json.loads(line)["id"]]] = True
    scores = []
    for f in sorted(Path(out, "scores").glob("*.jsonl")):
        with open(f) as fh:
            scores.extend(json.loads(line)["score"] for line in fh)
    np.save(a.save, np.asarray(scores))
    np.save(a.save.replace(".npy", "_sel.npy"), sel)
    shutil.rmtree(out)
    return {"wall_s": wall, "cpu_s": cpu, "docs": summ.records, "targets": len(targets),
            "seconds": summ.seconds}


def child_race(a: argparse.Namespace) -> dict:
    from ctxzip.datasel import ZipFitRace
    from ctxzip.datasel.io import iter_records

    t0, c0 = time.perf_counter(), _cpu()
    targets = [r.text for r in iter_records(a.target)][: a.n_targets]
    recs = list(iter_records(a.source))
    res = ZipFitRace(targets, codec=a.codec, z=a.z).select([r.text for r in recs], a.keep,
                                                            workers=a.workers)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    sel = np.zeros(len(recs), dtype=bool)
    sel[res.selected] = True
    np.save(a.save, res.scores)
    np.save(a.save.replace(".npy", "_sel.npy"), sel)
    return {"wall_s": wall, "cpu_s": cpu, "docs": len(recs), "targets": len(targets),
            "exact_pairs_fraction": res.pairs_fraction, "rounds": res.rounds}


def child_ref(a: argparse.Namespace) -> dict:
    sys.path.insert(0, a.ref)
    import zip_fit.zipfit as refmod  # the reference, from its source tree

    refmod.cpu_count = lambda: a.workers  # its Pool(cpu_count()) -> Pool(--workers)
    ZIPFIT = refmod.ZIPFIT

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
            stop.wait(0.25)  # smaps reads cost CPU: keep the sampler off the measured cores

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,500 docs, k=150")
    ap.add_argument("--ref", default="/work/ref/ZIP-FIT",
                    help="path of the reference ZIP-FIT source tree (skipped if absent)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", choices=["ours", "ref", "race"])
    ap.add_argument("--source")
    ap.add_argument("--target")
    ap.add_argument("--codec", default="gzip-6")
    ap.add_argument("--n-targets", type=int, default=100)
    ap.add_argument("--shard-size", type=int, default=250,
                    help="records per shard (small shards: short straggler tail)")
    ap.add_argument("--save")
    ap.add_argument("--keep", type=int, default=1000)
    ap.add_argument("--z", type=float, default=None, help="fast mode z (default: ZipFitRace's)")
    a = ap.parse_args()
    if a.child:
        if a.z is None:
            from ctxzip.datasel import ZipFitRace

            a.z = ZipFitRace.z
        fn = {"ours": child_ours, "ref": child_ref, "race": child_race}[a.child]
        print(json.dumps(fn(a)))
        return

    n_targets = 100
    source, targets = data.build(n_targets=100, max_source=1500 if a.quick else None)
    work = Path(tempfile.mkdtemp(prefix="zipfit_bench_"))
    src, tgt = work / "source.jsonl", work / "target.jsonl"
    data.write_jsonl(src, source)
    data.write_jsonl(tgt, targets)
    src4 = work / "source_x4.jsonl"
    data.write_jsonl(src4, [{"id": f"{r['id']}@{k}", "text": r["text"]}
                            for k in range(4) for r in source])
    W = a.workers
    k = 150 if a.quick else 1000
    print(f"data: {len(source)} source chunks, {len(targets)} targets; workers={W}; k={k}",
          flush=True)
    common = ["--source", str(src), "--target", str(tgt), "--n-targets", str(n_targets)]
    results: dict = {"machine": data.machine(), "quick": a.quick, "workers": W, "k": k,
                     "command": " ".join(["python", "benchmarks/zipfit_speed.py", *sys.argv[1:]]),
                     "data": {"source_docs": len(source), "targets": len(targets),
                              "chunk_chars": data.CHUNK_CHARS,
                              "source_chars": sum(len(r["text"]) for r in source)}}

    print("CPU per pair, bare gzip.compress vs ctxzip exact (same pairs, in-process):")
    sub = [r["text"] for r in source[:: max(1, len(source) // 100)]][:100]
    results["cpu_per_pair"] = bare_vs_ours([t["text"] for t in targets], sub)
    print("  ", {kk: round(v, 3) for kk, v in results["cpu_per_pair"].items()
                 if not kk.startswith("all")}, flush=True)

    runs: dict[str, dict] = {}
    scores: dict[str, np.ndarray] = {}
    selected: dict[str, np.ndarray] = {}

    def ours(label: str, workers: int, source_path: Path = src, n_t: int = n_targets) -> None:
        save = work / f"{label}.npy"
        args = ["ours", "--source", str(source_path), "--target", str(tgt),
                "--n-targets", str(n_t), "--codec", "gzip-6", "--workers", str(workers),
                "--save", str(save), "--keep", str(k), "--shard-size", str(a.shard_size)]
        runs[label] = run_child(args, label)
        runs[label].update(codec="gzip-6", workers=workers)
        scores[label] = np.load(save)
        selected[label] = np.load(str(save).replace(".npy", "_sel.npy"))

    def fast(label: str, workers: int) -> None:
        save = work / f"{label}.npy"
        runs[label] = run_child(["race", *common, "--workers", str(workers), "--save", str(save),
                                 "--keep", str(k)], label)
        runs[label].update(codec="gzip-6 raced (isal-0 prefilter)", workers=workers)
        scores[label] = np.load(save)
        selected[label] = np.load(str(save).replace(".npy", "_sel.npy"))

    def reference(label: str, workers: int) -> None:
        save = work / f"{label}.npy"
        runs[label] = run_child(["ref", *common, "--ref", a.ref, "--save", str(save),
                                 "--workers", str(workers)], label)
        runs[label].update(codec="gzip-6", workers=workers)
        scores[label] = np.load(save)

    print("runs:", flush=True)
    ref_ok = (Path(a.ref) / "zip_fit" / "zipfit.py").is_file()
    name = "zipfit_speed_quick" if a.quick else "zipfit_speed"
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not ref_ok:
        print(f"  reference ZIP-FIT not found at {a.ref}: skipping the reference runs "
              "(fetch stair-lab/ZIP-FIT and pass --ref PATH)", flush=True)
        results["reference_skipped"] = f"not found at {a.ref}"

    # most important first; results are rewritten after every run (partial until the end)
    plan = [lambda: ours(f"exact_{W}proc", W)]
    if ref_ok:
        plan.append(lambda: reference(f"reference_{W}proc", W))
    plan += [lambda: fast(f"fast_{W}proc", W),
             lambda: ours("exact_1proc", 1),
             lambda: fast("fast_1proc", 1)]
    if ref_ok:
        plan.append(lambda: reference("reference_1proc", 1))
    plan += [lambda: ours("mem_x1_10targets", W, src, 10),
             lambda: ours("mem_x4_10targets", W, src4, 10)]
    for i, step in enumerate(plan):
        step()
        results["partial"] = i < len(plan) - 1
        results["runs"] = runs
        results["summary"] = summarize(runs, scores, selected, results, W, k)
        out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"], indent=1), flush=True)
    _plot(results, HERE / "results" / f"{name}.png")
    shutil.rmtree(work)
    print(f"wrote {out}")


def summarize(runs: dict, scores: dict, selected: dict, results: dict, W: int, k: int) -> dict:
    ex, rf, fa = f"exact_{W}proc", f"reference_{W}proc", f"fast_{W}proc"
    summary: dict = {"exact_cpu_per_pair_over_bare_gzip":
                     results["cpu_per_pair"]["ratio_ours_over_bare"]}
    exact_top = set(np.flatnonzero(selected[ex]).tolist())
    # side by side: one row per implementation/mode, ratios against the reference
    table: dict = {}
    for mode, lab2, lab1 in (("reference", rf, "reference_1proc"), ("exact", ex, "exact_1proc"),
                             ("fast", fa, "fast_1proc")):
        if lab2 not in runs:
            continue
        r = runs[lab2]
        row = {"docs_per_s": r["docs_per_s"], "cpu_us_per_pair": r["cpu_us_per_pair"],
               "peak_pss_mb": r["peak_pss_mb"], "load_avg_1m": r["load_avg_1m"]}
        if lab1 in runs:
            row["speedup_2proc_over_1proc"] = r["docs_per_s"] / runs[lab1]["docs_per_s"]
            row["cpu_s_2proc_over_1proc"] = r["cpu_s"] / runs[lab1]["cpu_s"]
        if mode == "reference":
            from ctxzip.budget import topk_indices

            got = set(topk_indices(scores[rf], k).tolist())
        else:
            got = set(np.flatnonzero(selected[lab2]).tolist())
        row[f"top{k}_overlap_with_exact"] = len(got & exact_top) / k
        if rf in runs:
            rr = runs[rf]
            row["docs_per_s_vs_reference"] = r["docs_per_s"] / rr["docs_per_s"]
            row["cpu_per_pair_vs_reference"] = r["cpu_us_per_pair"] / rr["cpu_us_per_pair"]
            row["peak_memory_vs_reference"] = r["peak_pss_mb"] / rr["peak_pss_mb"]
        table[mode] = row
    summary["side_by_side"] = table
    if rf in runs:
        ref = scores[rf]
        summary["exact_vs_reference_scores"] = {
            "bit_identical_fraction": float(np.mean(scores[ex] == ref)),
            "max_abs_diff": float(np.max(np.abs(scores[ex] - ref))),
        }
    if "exact_1proc" in runs:
        summary["exact_1proc_vs_Wproc_identical"] = bool(np.array_equal(scores[ex],
                                                                        scores["exact_1proc"]))
    if "fast_1proc" in runs:
        summary["fast_1proc_vs_Wproc_identical"] = bool(np.array_equal(
            selected[fa], selected["fast_1proc"]))
    if "mem_x4_10targets" in runs:
        summary["memory_x4_over_x1"] = (runs["mem_x4_10targets"]["peak_pss_mb"]
                                        / runs["mem_x1_10targets"]["peak_pss_mb"])
    goals = {}
    if "exact" in table and "reference" in table:
        e, f = table["exact"], table.get("fast", {})
        goals = {
            "exact_cpu_per_pair_within_10pct_of_bare_gzip":
                summary["exact_cpu_per_pair_over_bare_gzip"] <= 1.10,
            "exact_docs_per_s_ge_reference": e["docs_per_s_vs_reference"] >= 1.0,
            "exact_memory_le_fifth_of_reference": e["peak_memory_vs_reference"] <= 0.2,
            "exact_2proc_speedup_ge_1.8": e.get("speedup_2proc_over_1proc", 0) >= 1.8,
            "fast_docs_per_s_ge_10x_reference": f.get("docs_per_s_vs_reference", 0) >= 10,
            f"fast_top{k}_overlap_ge_0.9": f.get(f"top{k}_overlap_with_exact", 0) >= 0.9,
        }
        if "memory_x4_over_x1" in summary:
            goals["exact_memory_flat_x4 (<= 1.2)"] = summary["memory_x4_over_x1"] <= 1.2
    summary["goals_met"] = goals
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
