"""KV-cache presses at equal bytes: context benefit retained vs measured cache memory.

One command: ``python benchmarks/kvcache_memory.py`` (``--quick`` for a small run). Writes
``benchmarks/results/kvcache_memory.json`` and ``kvcache_memory.png``.

Eviction (H2O, SnapKV), quantization (KIVI layout with pre-RoPE keys, GEAR), low-rank (PCA)
and evict-then-quantize combinations on one axis: the bytes ``cache_nbytes(cache,
float_bytes=2)`` reports (codes, scales, zeros, positions, low-rank factors, outliers and the
full-precision sink/window, floats counted as bf16) over a bf16 cache of the same context.
Quality: ``ctxzip.eval`` context benefit retained (SmolLM2-135M, 1,024-token contexts, both
targets: 128-token continuation and uniform cued recall) on real prose (``pydoc_data.topics``)
and real code (CPython stdlib), pooled over documents. Each (press, document) row is written
to the JSON as soon as it is measured, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _cli import select_named  # noqa: E402

from ctxzip.budget import Budget  # noqa: E402
from ctxzip.eval import ContextEvaluator, code_documents, pooled_benefit, prose_documents  # noqa: E402
from ctxzip.kvcache import (  # noqa: E402
    EMSPress,
    EvictThenQuantizePress,
    GEARPress,
    H2OPress,
    KIVIPress,
    LowRankPress,
    ObservedAttentionPress,
    RazorAttentionPress,
    SnapKVPress,
    cache_nbytes,
    dense_cache_nbytes,
    prefill,
)
from ctxzip.kvcache.evaluate import razor_kivi  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("continuation", "recall")


def configs(cal_fn) -> dict:
    """name -> (family, factory). Ordered by importance (a stopped run has the key rows)."""
    e = EvictThenQuantizePress

    def kivi(g=128):
        return KIVIPress(key_bits=4, value_bits=2, key_group=g)

    out: dict = {}
    out["h2o0.43+kivi_k4v2_w0"] = ("evict+quantize", lambda: e(
        evict=H2OPress(budget=Budget(rate=0.43)), quant=KIVIPress(key_bits=4, value_bits=2, key_group=128, window=0)))
    out["h2o0.38+kivi_k4v2"] = ("evict+quantize", lambda: e(evict=H2OPress(budget=Budget(rate=0.38)), quant=kivi()))
    out["h2o0.1"] = ("evict", lambda: H2OPress(budget=Budget(rate=0.1)))
    out["kivi_k4v2"] = ("quantize", lambda: kivi())
    out["snapkv0.38+kivi_k4v2"] = ("evict+quantize", lambda: e(
        evict=SnapKVPress(budget=Budget(rate=0.38)), quant=kivi()))
    out["h2o0.2+kivi_k4v2"] = ("evict+quantize", lambda: e(evict=H2OPress(budget=Budget(rate=0.2)), quant=kivi()))
    out["gear_2bit"] = ("quantize", lambda: GEARPress(bits=2, sink=4))
    out["h2o0.25"] = ("evict", lambda: H2OPress(budget=Budget(rate=0.25)))
    out["kivi_k2v2"] = ("quantize", lambda: KIVIPress(key_bits=2, value_bits=2, key_group=64))
    out["snapkv0.1"] = ("evict", lambda: SnapKVPress(budget=Budget(rate=0.1)))
    out["h2o0.5+kivi_k4v2"] = ("evict+quantize", lambda: e(evict=H2OPress(budget=Budget(rate=0.5)), quant=kivi()))
    out["snapkv0.5+gear2"] = ("evict+quantize", lambda: e(
        evict=SnapKVPress(budget=Budget(rate=0.5)),
        quant=GEARPress(bits=2, group_size=32, buffer=32, chunk=256, sink=4)))
    # session 3: spend the 10 % on less eviction / other scores (screened on 1 + 1 documents)
    def k4v2w0(kg=128):
        return KIVIPress(key_bits=4, value_bits=2, key_group=kg, window=0)

    out["obs0.43+kivi_k4v2_w0"] = ("evict+quantize", lambda: e(
        evict=ObservedAttentionPress(budget=Budget(rate=0.43)), quant=k4v2w0()))
    out["ems0.43+kivi_k4v2_w0"] = ("evict+quantize", lambda: e(
        evict=EMSPress(budget=Budget(rate=0.43), head_budget="uniform"), quant=k4v2w0()))
    out["snapkv0.43+kivi_k4v2_w0"] = ("evict+quantize", lambda: e(
        evict=SnapKVPress(budget=Budget(rate=0.43)), quant=k4v2w0()))
    out["h2o_r0.25_0.43+kivi_k4v2_w0"] = ("evict+quantize", lambda: e(
        evict=H2OPress(budget=Budget(rate=0.43), recent_fraction=0.25), quant=k4v2w0()))
    out["h2o0.44+kivi_k4v2_kg256_w0"] = ("evict+quantize", lambda: e(
        evict=H2OPress(budget=Budget(rate=0.44)), quant=k4v2w0(256)))
    out["h2o0.58+kivi_k2v2_w0"] = ("evict+quantize", lambda: e(
        evict=H2OPress(budget=Budget(rate=0.58)),
        quant=KIVIPress(key_bits=2, value_bits=2, key_group=64, window=0)))
    # session 5: RazorAttention - retrieval heads keep every token, the rest sinks + a 64-token
    # buffer + a compensation token; both parts KIVI (4-bit pre-RoPE keys, 2-bit values after a
    # Hadamard rotation). Chosen on 2 + 2 documents (the "razor screen" rows below; written to
    # results/kvcache_razor_screen.json with --docs 2), then run on 20 + 20.
    def rz(frac=0.38, buf=64, echo=0.1, kb=4, vb=2, kg=128, vg=64, rot=True, comp=True, fp=False, lvg=64):
        def q(v):
            return KIVIPress(key_bits=kb, value_bits=vb, key_group=kg, value_group=v, window=0, rotate_values=rot)
        return RazorAttentionPress(
            budget=Budget(tokens=buf), retrieval_fraction=frac, echo_fraction=echo, min_buffer=0,
            compensation=comp, quant=None if fp else q(vg), local_quant=None if fp else q(lvg))

    # the final choice = ctxzip.kvcache.evaluate.razor_kivi (`ctxzip kv eval --press razor+kivi`),
    # picked on the dev documents (--doc-offset 20 --docs 6) among the rows below
    out["razor0.36_b96+kivi_k4v2_rot_vg32_ind0.05"] = ("head-split+quantize", lambda: razor_kivi())
    # the first choice (from the 2 + 2 screen, the paper's echo-then-induction order), run on 20 + 20
    out["razor0.38_b64+kivi_k4v2_rot_vg32"] = ("head-split+quantize", lambda: razor_kivi(
        Budget(tokens=64), retrieval_fraction=0.38, induction_fraction=None))
    # the same, beyond 10% echo + `ind` induction heads choosing the rest by the probe's long-range
    # mass (tuned on the dev documents: --doc-offset 20 --docs 6)
    for ind in (0.05, 0.10):
        out[f"razor0.38_b64+kivi_k4v2_rot_vg32_ind{ind}"] = ("head-split+quantize", lambda ind=ind: razor_kivi(
            Budget(tokens=64), retrieval_fraction=0.38, induction_fraction=ind))
    # ... with a longer buffer for continuation, paid by coarser values on the retrieval heads
    out["razor0.38_b96+kivi_k4v2_rot_ind0.05"] = ("head-split+quantize", lambda: razor_kivi(
        retrieval_fraction=0.38, quant=KIVIPress(
            key_bits=4, value_bits=2, key_group=128, value_group=64, window=0, rotate_values=True)))
    screen = {
        # full precision (bytes ~0.42): what the head split alone costs
        "fp_e0.01": dict(fp=True, echo=0.01), "fp_e0.01_nocomp": dict(fp=True, echo=0.01, comp=False),
        "fp_e0.10_nocomp": dict(fp=True, comp=False), "fp_e0.19_nocomp": dict(fp=True, echo=0.19, comp=False),
        # KIVI, no value rotation
        "k4v2_e0.01": dict(echo=0.01, rot=False), "k4v2_e0.01_nocomp": dict(echo=0.01, rot=False, comp=False),
        "k8v2_e0.01": dict(echo=0.01, rot=False, kb=8), "k4v4_e0.01": dict(echo=0.01, rot=False, vb=4, lvg=64),
        "k4v2_f0.38": dict(rot=False), "k4v2_f0.40": dict(frac=0.40, rot=False),
        "k4v2_f0.42_kg256": dict(frac=0.42, rot=False, kg=256), "k4v2_f0.44_kg256": dict(frac=0.44, rot=False, kg=256),
        # rotated values
        "rot_f0.38": dict(), "rot_f0.40": dict(frac=0.40), "rot_f0.38_vg32": dict(vg=32),
        "rot_f0.38_b80_kg256_vg32": dict(buf=80, kg=256, vg=32),
    }
    for name, kw in screen.items():
        out[f"razor screen/{name}"] = ("head-split" if kw.get("fp") else "head-split+quantize", lambda kw=kw: rz(**kw))
    out["lowrank0.25"] = ("low-rank", lambda: LowRankPress(budget=Budget(rate=0.25), calibration=cal_fn()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 doc per kind, 512-token contexts, 3 presses")
    ap.add_argument("--docs", type=int, default=None, help="documents per kind (default 6)")
    ap.add_argument("--context-tokens", type=int, default=None, help="default 1024")
    ap.add_argument("--continuation-tokens", type=int, default=128)
    ap.add_argument("--recall-spans", type=int, default=16)
    ap.add_argument("--only", default=None, help="comma-separated config names")
    ap.add_argument("--doc-offset", type=int, default=0,
                    help="skip the first K documents of each kind (a dev set after the evaluated ones: "
                         "--doc-offset 20 --docs 6 --out results/kvcache_memory_dev.json)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default results/kvcache_memory[_quick].json)")
    ap.add_argument("--fresh", action="store_true", help="ignore rows of a previous run")
    ap.add_argument("--report-only", action="store_true",
                    help="recompute the summary and plot from the stored rows (no model)")
    args = ap.parse_args()
    if args.report_only:
        path = Path(args.out) if args.out else RESULTS / f"kvcache_memory{'_quick' if args.quick else ''}.json"
        result = json.loads(path.read_text())
        summarize(result, {})
        path.write_text(json.dumps(result, indent=1))
        plot(result, path.with_suffix(".png"))
        print(json.dumps(result["summary"], indent=1))
        return 0
    torch.set_num_threads(args.threads)
    n_docs = args.docs or (1 if args.quick else 6)
    ctx_tokens = args.context_tokens or (512 if args.quick else 1024)
    suffix = "_quick" if args.quick else ""
    out_path = Path(args.out) if args.out else RESULTS / f"kvcache_memory{suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)

    ev = ContextEvaluator()
    model = ev.model
    off = args.doc_offset
    docs = {"prose": prose_documents(off + n_docs)[off:], "code": code_documents(off + n_docs)[off:]}
    cases = {
        kind: [ev.make_case(d.text, context_tokens=ctx_tokens, continuation_tokens=args.continuation_tokens,
                            n_recall=args.recall_spans, doc_id=d.id) for d in ds]
        for kind, ds in docs.items()
    }
    used = {d.id for ds in docs.values() for d in ds}
    cal_cache: dict = {}

    def calibration():
        # PCA on local documents the evaluation does not use (the next ones in each corpus)
        if "cal" not in cal_cache:
            extra = prose_documents(off + n_docs + 3)[off + n_docs:] + code_documents(off + n_docs + 3)[off + n_docs:]
            texts = [d.text for d in extra if d.id not in used]
            cal_cache["cal"] = LowRankPress(budget=Budget(rate=0.5)).calibrate(
                model, ev.tokenizer, texts=texts, max_tokens=ctx_tokens).calibration
        return cal_cache["cal"]

    cfgs = configs(calibration)
    if args.quick:
        cfgs = {k: cfgs[k] for k in ("h2o0.38+kivi_k4v2", "h2o0.1", "kivi_k4v2")}
    cfgs = select_named(cfgs, args.only, "configs")

    result: dict = {}
    if out_path.exists() and not args.fresh:
        result = json.loads(out_path.read_text())
        if result.get("context_tokens") != ctx_tokens:
            result = {}
    result.update({
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "threads": args.threads, "loadavg": os.getloadavg()},
        "model": "SmolLM2-135M-Instruct (offline GGUF, fp32; cache bytes counted as bf16)",
        "context_tokens": ctx_tokens, "docs_per_kind": n_docs,
        "continuation_tokens": args.continuation_tokens, "recall_spans": args.recall_spans,
        "doc_ids": {k: [d.id for d in v] for k, v in docs.items()},
        "metric": "context benefit retained, pooled over docs: sum(none-comp)/sum(none-full); "
                  "bytes = cache_nbytes(float_bytes=2) / bf16 cache of the same context",
    })
    rows = result.setdefault("rows", {})
    baselines = result.setdefault("baselines", {})

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=1))

    t_start = time.time()
    for name, (family, factory) in cfgs.items():
        press = None
        for kind, cs in cases.items():
            for case in cs:
                key = f"{kind}/{case.doc_id}"
                if key in rows.get(name, {}):
                    continue
                if key not in baselines:
                    b = ev.baseline(case, targets=TARGETS)
                    baselines[key] = {"none": b["none"], "full": b["full"]}
                case._baseline = {"none": dict(baselines[key]["none"]), "full": dict(baselines[key]["full"])}
                press = press or factory()
                rel, secs = [], []

                def make_cache(m, ids, press=press, rel=rel, secs=secs):
                    t0 = time.process_time()
                    cache = prefill(m, ids, press)
                    secs.append(time.process_time() - t0)
                    rel.append(cache_nbytes(cache, float_bytes=2) / dense_cache_nbytes(m, ids.shape[1]))
                    return cache, ids.shape[1]

                comp = ev.nll_from_cache(case, make_cache, targets=TARGETS)
                rows.setdefault(name, {})[key] = {
                    "family": family, "nll": comp, "bytes_vs_bf16": rel[0], "prefill_cpu_s": secs[0]}
                save()
        summarize(result, cfgs)
        s = result["summary"][name]
        print(f"{name:24s} " + "  ".join(
            f"{k}: cont {s[k]['continuation']:.3f} recall {s[k]['recall']:.3f} @ {s[k]['bytes_vs_bf16']:.3f}"
            for k in cases) + f"  ({time.time() - t_start:.0f}s)", flush=True)
        save()
    summarize(result, cfgs)
    result["wall_s_last_run"] = time.time() - t_start
    save()
    plot(result, out_path.with_suffix(".png"))
    print("wrote", out_path)
    return 0


def summarize(result: dict, cfgs: dict) -> None:
    summ = {}
    for name, per_doc in result["rows"].items():
        by_kind: dict = {}
        for key, r in per_doc.items():
            kind = key.split("/", 1)[0]
            b = result["baselines"][key]
            g = by_kind.setdefault(kind, {"rows": {t: [] for t in TARGETS}, "bytes": [], "family": r["family"]})
            for t in TARGETS:
                g["rows"][t].append((b["none"][t], b["full"][t], r["nll"][t]))
            g["bytes"].append(r["bytes_vs_bf16"])
        summ[name] = {
            kind: {t: pooled_benefit(g["rows"][t]) for t in TARGETS}
            | {"bytes_vs_bf16": sum(g["bytes"]) / len(g["bytes"]), "docs": len(g["bytes"]), "family": g["family"]}
            for kind, g in by_kind.items()
        }
    result["summary"] = summ
    best = {}
    for kind in ("prose", "code"):
        for t in TARGETS:
            cand = [(v[kind][t], n) for n, v in summ.items() if kind in v and v[kind]["bytes_vs_bf16"] <= 0.1 + 1e-9]
            best[f"{kind}/{t}"] = max(cand) if cand else None
    result["best_at_or_below_10pct_bytes"] = best


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    marker = {"evict": "o", "quantize": "s", "evict+quantize": "*", "low-rank": "^", "head-split+quantize": "P",
              "head-split": "P"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for i, kind in enumerate(("prose", "code")):
        for j, t in enumerate(TARGETS):
            ax = axes[j][i]
            for name, v in result["summary"].items():
                if kind not in v:
                    continue
                ax.scatter(v[kind]["bytes_vs_bf16"], v[kind][t], marker=marker.get(v[kind]["family"], "x"), s=50)
                ax.annotate(name, (v[kind]["bytes_vs_bf16"], v[kind][t]), fontsize=6)
            ax.axvline(0.1, color="grey", ls=":")
            ax.axhline(0.9, color="grey", ls=":")
            ax.set_title(f"{kind} - {t}")
            ax.set_ylim(-0.1, 1.1)
            ax.set_xscale("log")
            ax.set_xlim(0.03, 1.2)
            ax.set_xticks([0.05, 0.1, 0.2, 0.5, 1.0], ["5%", "10%", "20%", "50%", "100%"])
            ax.minorticks_off()
            ax.set_xlabel("cache bytes / bf16 cache")
            ax.set_ylabel("context benefit retained")
    n = sorted({v[k]["docs"] for v in result["summary"].values() for k in v})
    docs = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
    fig.suptitle(f"KV cache at equal bytes (SmolLM2-135M, {result['context_tokens']} tokens, "
                 f"{docs} docs per kind; o evict, s quantize, * evict+quantize, ^ low-rank, "
                 "P head-split(+quantize))", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
