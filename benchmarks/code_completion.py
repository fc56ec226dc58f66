"""Code-completion benchmark for LongCodeZip (``ctxzip.prompt.CodeCompressor``) on real code.

For each CPython standard-library module with at least ``--min-tokens`` tokens, one function
(with a docstring and a body of 48-256 tokens) is held out:

* context     = the rest of the module (the function's lines removed),
* instruction = the held-out function's signature + docstring (the compressors' query),
* target      = its body.

Metric: context benefit retained (DESIGN.md) of the target LM's mean NLL of the body given
``context + instruction``: ``(NLL_none - NLL_method) / (NLL_none - NLL_full)``, pooled over
modules (``sum(none - method) / sum(none - full)``) and as the median of per-module ratios.

Methods at each rate (fraction of the context's tokens kept): LongCodeZip (coarse + fine),
LongCodeZip rank-only (coarse stage only), truncation that keeps the lines nearest the held-out
function, random whole functions, embedding retrieval of functions (packaged MiniLM, by cosine
to the instruction), random token drop, and no context. Seconds per file are reported for the
compressors (the same process, side by side).

A context longer than ``--max-context`` tokens is first cut to the lines nearest the held-out
function; that cut *is* the "full" context everything else is compared to (the JSON records the
uncut size). SmolLM2's window is 8192 tokens, so 7600 keeps whole 8k modules; the default 4096
is what fits this shared 2-core CPU in about half an hour for 8 modules (every method needs a
forward pass over its context, the compressor several).

    python benchmarks/code_completion.py                      # 8 modules, context 4096, rates 0.5/0.25
    python benchmarks/code_completion.py --max-context 7600   # whole 8k-token modules (slower)
    python benchmarks/code_completion.py --quick              # 2 modules
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ctxzip.budget import Budget  # noqa: E402
from ctxzip.eval import ContextEvaluator  # noqa: E402
from ctxzip.eval.corpora import code_documents  # noqa: E402
from ctxzip.prompt import CodeCompressor, RandomDropCompressor  # noqa: E402
from ctxzip.prompt.code_chunking import chunk_code, split_units  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "code_completion.json"


# ---------------------------------------------------------------------- cases
def pick_function(text: str, tok: Any, rng: random.Random) -> dict[str, Any] | None:
    """A function or method with a docstring and a 48-256-token body (not nested in a
    function), chosen at random; returns its line ranges."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    lines = text.splitlines(keepends=True)
    cands = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            is_fn = isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_fn and not in_func and ast.get_docstring(ch) and len(ch.body) >= 2:
                start = min([ch.lineno] + [d.lineno for d in ch.decorator_list]) - 1
                doc_end = ch.body[0].end_lineno
                end = ch.end_lineno
                body = "".join(lines[doc_end:end])
                n_body = len(tok(body, add_special_tokens=False)["input_ids"])
                if 48 <= n_body <= 256 and ch.body[1].lineno - 1 >= doc_end:
                    cands.append({"name": ch.name, "start": start, "doc_end": doc_end,
                                  "end": end, "body_tokens": n_body})
            visit(ch, in_func or is_fn)

    visit(tree, False)
    if not cands:
        return None
    return rng.choice(cands)


def nearest_lines(lines: list[str], hole: int, line_tok: list[int], budget: int) -> list[bool]:
    """Keep whole lines by distance to the hole (the line index where the held-out function
    was), above first on ties, until ``budget`` tokens are used."""
    order = sorted(range(len(lines)), key=lambda i: (hole - 1 - i if i < hole else i - hole, i >= hole))
    keep = [False] * len(lines)
    used = 0
    for i in order:
        if used + line_tok[i] <= budget:
            keep[i] = True
            used += line_tok[i]
        elif used >= budget:
            break
    return keep


def make_case(doc: Any, tok: Any, seed: int, max_context: int) -> dict[str, Any] | None:
    rng = random.Random(f"{seed}:{doc.id}")
    fn = pick_function(doc.text, tok, rng)
    if fn is None:
        return None
    lines = doc.text.splitlines(keepends=True)
    instruction = "".join(lines[fn["start"] : fn["doc_end"]])
    body = "".join(lines[fn["doc_end"] : fn["end"]])
    ctx_lines = lines[: fn["start"]] + lines[fn["end"] :]
    hole = fn["start"]
    line_tok = [len(x) for x in tok(ctx_lines, add_special_tokens=False)["input_ids"]]
    n_full = sum(line_tok)
    cut = n_full > max_context
    if cut:
        keep = nearest_lines(ctx_lines, hole, line_tok, max_context)
        hole = sum(keep[:hole])
        ctx_lines = [x for x, k in zip(ctx_lines, keep) if k]
    return {
        "id": doc.id, "function": fn["name"], "context_lines": ctx_lines, "hole": hole,
        "context": "".join(ctx_lines), "instruction": instruction, "body": body,
        "module_tokens": len(tok(doc.text, add_special_tokens=False)["input_ids"]),
        "context_tokens_uncut": n_full, "cut_to_window": cut,
    }


# ---------------------------------------------------------------------- baselines
def truncation_nearest(case: dict[str, Any], tok: Any, budget: int) -> str:
    lines = case["context_lines"]
    line_tok = [len(x) for x in tok(lines, add_special_tokens=False)["input_ids"]]
    keep = nearest_lines(lines, case["hole"], line_tok, budget)
    return "".join(x for x, k in zip(lines, keep) if k)


def function_chunks(text: str) -> list[str]:
    units = split_units(text)
    return ["".join(units[c.start : c.end]) for c in chunk_code(units, "python")]


def select_chunks(chunks: list[str], sizes: list[int], order: list[int], budget: int) -> str:
    keep = set()
    used = 0
    for i in order:
        if used + sizes[i] <= budget:
            keep.add(i)
            used += sizes[i]
    return "".join(chunks[i] for i in sorted(keep))


def fit(text: str, tok: Any, budget: int) -> str:
    """Cut a baseline's output at a line end so it is within the budget (joins can add a token)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text
    lines = text.splitlines(keepends=True)
    while lines and len(tok("".join(lines), add_special_tokens=False)["input_ids"]) > budget:
        lines.pop()
    return "".join(lines)


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 modules")
    ap.add_argument("--n-modules", type=int, default=8)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--min-tokens", type=int, default=8000)
    ap.add_argument("--max-module-tokens", type=int, default=16000,
                    help="skip bigger modules (their context would mostly be cut to the window)")
    ap.add_argument("--max-context", type=int, default=4096,
                    help="context cap in tokens (nearest lines to the held-out function)")
    ap.add_argument("--model", default=None, help="target + compression LM (default SmolLM2)")
    ap.add_argument("--fine-ratio", type=float, default=0.8)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    n_modules = 2 if args.quick else args.n_modules

    import torch
    from tqdm import tqdm

    from ctxzip.models import load_causal_lm, load_encoder

    model, tok = load_causal_lm(args.model)
    ev = ContextEvaluator(model, tok)
    encoder = load_encoder()

    # modules: >= min tokens, deterministic order (hash of path and seed)
    cases = []
    for doc in code_documents(None, min_chars=args.min_tokens * 2, seed=args.seed):
        n = len(tok(doc.text, add_special_tokens=False)["input_ids"])
        if not args.min_tokens <= n <= args.max_module_tokens:
            continue
        c = make_case(doc, tok, args.seed, args.max_context)
        if c is not None:
            cases.append(c)
        if len(cases) >= n_modules:
            break

    lcz = CodeCompressor(model=model, tokenizer=tok, fine_ratio=args.fine_ratio, beta=args.beta)
    rows = []
    t_start = time.time()
    for case in tqdm(cases, desc="modules"):
        ctx = case["context"]
        ctx_ids = ev.encode(ctx)
        n_ctx = len(ctx_ids)
        prompt = ev.encode("\n\n" + case["instruction"])
        target = ev.encode(case["body"])

        def nll(text: str | None, prompt: list[int] = prompt, target: list[int] = target) -> float:
            ids = ev.encode(text) if text else []
            total, cnt = ev.score_items(ids, [(prompt, target)])[0]
            return total / cnt

        t0 = time.time()
        none, full = nll(None), nll(ctx)
        row: dict[str, Any] = {
            k: case[k] for k in ("id", "function", "module_tokens", "context_tokens_uncut",
                                 "cut_to_window")
        }
        row.update(context_tokens=n_ctx, instruction_tokens=len(prompt), body_tokens=len(target),
                   nll_none=none, nll_full=full, methods={})
        chunks = function_chunks(ctx)
        sizes = [len(x) for x in tok(chunks, add_special_tokens=False)["input_ids"]]
        # embedding retrieval scores (MiniLM), computed once per module
        te = time.perf_counter()
        with torch.no_grad():
            embs = encoder.encode([case["instruction"]] + chunks, normalize_embeddings=True,
                                  convert_to_numpy=True, batch_size=32)
        sims = embs[1:] @ embs[0]
        emb_seconds = time.perf_counter() - te
        rng = np.random.default_rng(args.seed)
        shuffled = [int(i) for i in rng.permutation(len(chunks))]

        for rate in args.rates:
            b = Budget(rate=rate).resolve(n_ctx)
            outs: dict[str, tuple[str, float]] = {}
            t = time.perf_counter()
            r = lcz.compress(ctx, query=case["instruction"], budget=Budget(tokens=b),
                             language="python")
            outs["longcodezip"] = (r.text, time.perf_counter() - t)
            t = time.perf_counter()
            r = lcz.compress(ctx, query=case["instruction"], budget=Budget(tokens=b),
                             language="python", rank_only=True)
            outs["longcodezip_rank_only"] = (r.text, time.perf_counter() - t)
            t = time.perf_counter()
            outs["truncation_nearest"] = (fit(truncation_nearest(case, tok, b), tok, b),
                                          time.perf_counter() - t)
            t = time.perf_counter()
            outs["random_functions"] = (fit(select_chunks(chunks, sizes, shuffled, b), tok, b),
                                        time.perf_counter() - t)
            t = time.perf_counter()
            order = [int(i) for i in np.argsort(-sims, kind="stable")]
            outs["embedding_retrieval"] = (fit(select_chunks(chunks, sizes, order, b), tok, b),
                                           emb_seconds + time.perf_counter() - t)
            t = time.perf_counter()
            rd = RandomDropCompressor(seed=args.seed, tokenizer=tok).compress(ctx, budget=Budget(tokens=b))
            outs["random_token_drop"] = (rd.text, time.perf_counter() - t)
            for name, (text, secs) in outs.items():
                n_out = len(ev.encode(text))
                v = nll(text)
                row["methods"].setdefault(name, {})[str(rate)] = {
                    "tokens": n_out, "achieved_rate": n_out / n_ctx, "nll": v,
                    "benefit": (none - v) / (none - full) if abs(none - full) > 1e-9 else None,
                    "seconds": secs,
                }
        row["module_seconds"] = time.time() - t0
        rows.append(row)
        tqdm.write(f"{case['id']} {case['function']}: ctx {n_ctx} tok, none {none:.3f} full "
                   f"{full:.3f}, lcz@{args.rates[-1]} "
                   f"{row['methods']['longcodezip'][str(args.rates[-1])]['nll']:.3f} "
                   f"({row['module_seconds']:.0f}s)")
        _write(args, rows, t_start)
    _write(args, rows, t_start)


def _summary(rows: list[dict[str, Any]], rates: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = list(rows[0]["methods"]) if rows else []
    for rate in rates:
        per = {}
        for name in names:
            recs = [(r["nll_none"], r["nll_full"], r["methods"][name][str(rate)]) for r in rows]
            num = sum(none - m["nll"] for none, _, m in recs)
            den = sum(none - full for none, full, _ in recs)
            ratios = [m["benefit"] for _, _, m in recs if m["benefit"] is not None]
            per[name] = {
                "benefit_pooled": num / den if abs(den) > 1e-12 else None,
                "benefit_median": float(np.median(ratios)) if ratios else None,
                "achieved_rate_mean": float(np.mean([m["achieved_rate"] for _, _, m in recs])),
                "seconds_per_file_median": float(np.median([m["seconds"] for _, _, m in recs])),
                "nll_mean": float(np.mean([m["nll"] for _, _, m in recs])),
            }
        lcz = per.get("longcodezip", {}).get("benefit_pooled")
        others = {k: v["benefit_pooled"] for k, v in per.items() if k != "longcodezip"}
        per["_longcodezip_above_every_baseline"] = (
            lcz is not None and all(v is None or lcz > v for v in others.values())
        )
        out[str(rate)] = per
    if rows:
        out["nll_none_mean"] = float(np.mean([r["nll_none"] for r in rows]))
        out["nll_full_mean"] = float(np.mean([r["nll_full"] for r in rows]))
    return out


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], t_start: float) -> None:
    import torch

    summary = _summary(rows, args.rates)
    res = {
        "benchmark": "code_completion",
        "description": "held-out function body NLL given compressed rest-of-module + "
        "signature/docstring; context benefit retained (pooled over modules and median)",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_lm": args.model or "smollm2-135m-instruct (offline default)",
        "n_modules": len(rows),
        "summary": summary,
        "goal": "longcodezip >= 0.9 retained at rate 0.25 (4x) and above every baseline",
        "rows": rows,
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "wall_seconds": time.time() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=_json_default))
    _plot(res, args.out.with_suffix(".png"))


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x))


def _plot(res: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    summ = res["summary"]
    rates = [k for k in summ if not k.startswith("nll")]
    if not rates:
        return
    names = [k for k in summ[rates[0]] if not k.startswith("_")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / len(rates)
    for j, rate in enumerate(rates):
        vals = [summ[rate][n]["benefit_pooled"] or 0.0 for n in names]
        ax.bar(np.arange(len(names)) + j * w, vals, w, label=f"rate {rate} ({1 / float(rate):.0f}x)")
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    ax.axhline(0.0, color="gray", lw=0.5)
    ax.set_xticks(np.arange(len(names)) + w * (len(rates) - 1) / 2)
    ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("context benefit retained (pooled)")
    ax.set_title(f"Held-out function completion, {res['n_modules']} CPython modules, "
                 f"SmolLM2-135M NLL of the body")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
