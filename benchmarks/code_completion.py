"""Code-completion benchmark for LongCodeZip (``ctxzip.prompt.CodeCompressor``) on real code.

For each CPython standard-library module with at least ``--min-tokens`` tokens, one function
(with a docstring and a body of 48-256 tokens) is held out:

* context     = the rest of the module (the function's lines removed),
* instruction = the held-out function's signature + docstring (the compressors' query),
* target      = its body.

Metric: context benefit retained (DESIGN.md) of the target LM's mean NLL of the body given
``context + instruction``: ``(NLL_none - NLL_method) / (NLL_none - NLL_full)``, pooled over
modules (``sum(none - method) / sum(none - full)``) and as the median of per-module ratios.

Methods at each rate (fraction of the context's tokens kept): LongCodeZip with the paper's
defaults (coarse + fine), LongCodeZip rank-only (coarse stage only), LongCodeZip with the
documented ``adjacent_fraction=0.5`` option (half the budget first goes to the whole chunks
nearest the hole, passed as ``cursor=``; not in the paper), truncation that keeps the lines
nearest the held-out function, random whole functions, embedding retrieval of functions
(packaged MiniLM, by cosine to the instruction), and no context.

Seconds per file are the cold cost of one call on a file (the ranking pass, shared by the
methods and rates of one file through the compressor's memo, is measured once per file and
added to every LongCodeZip method's own time), wall clock and CPU (``time.process_time``).

The context is capped so that context + instruction + body fit the target LM's window
(``max_position_embeddings``: 8192 for SmolLM2): a longer context is cut to the lines nearest
the held-out function, and that cut *is* the "full" context (the JSON records the uncut size
and whether it was cut). Per-module results are cached under ``--cache-dir`` as they finish, so
an interrupted run resumes where it stopped.

    python benchmarks/code_completion.py            # 8 modules, rates 0.5/0.25, full window
    python benchmarks/code_completion.py --quick    # 2 modules, context capped at 2048 tokens
    # the dev split on two cores: one shard per process, then merge the cached modules
    python benchmarks/code_completion.py --split dev --n-modules 40 --adjacent-sweep 0.75 0.9 --shard 0/2
    python benchmarks/code_completion.py --split dev --n-modules 40 --adjacent-sweep 0.75 0.9 --shard 1/2
    python benchmarks/code_completion.py --split dev --n-modules 40 --adjacent-sweep 0.75 0.9 --from-cache
    # pool finished result files (no LM work)
    python benchmarks/code_completion.py --merge-json benchmarks/results/code_completion.json \
        benchmarks/results/code_completion_dev.json --adjacent-sweep 0.75 0.9 --out benchmarks/results/code_completion_all.json
"""

from __future__ import annotations

import argparse
import ast
import hashlib
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
from ctxzip.prompt import CodeCompressor  # noqa: E402
from ctxzip.prompt.code_chunking import chunk_code, split_units  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "code_completion.json"
#: size of the test split (``--n-modules`` default); ``--split dev`` starts after it
TEST_MODULES = 8


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


def make_case(
    doc: Any, tok: Any, seed: int, max_context: int, window: int | None = None
) -> dict[str, Any] | None:
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
    if window is not None:  # context + "\n\n" + instruction + body must fit the LM's window
        extra = len(tok("\n\n" + instruction + body, add_special_tokens=False)["input_ids"])
        max_context = min(max_context, window - extra - 8)
    cut = n_full > max_context
    if cut:
        keep = nearest_lines(ctx_lines, hole, line_tok, max_context)
        hole = sum(keep[:hole])
        ctx_lines = [x for x, k in zip(ctx_lines, keep) if k]
    return {
        "id": doc.id, "function": fn["name"], "context_lines": ctx_lines, "hole": hole,
        "context": "".join(ctx_lines), "instruction": instruction, "body": body,
        "cursor": sum(len(x) for x in ctx_lines[:hole]),
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
    ap.add_argument("--quick", action="store_true", help="2 modules, context capped at 2048")
    ap.add_argument("--n-modules", type=int, default=TEST_MODULES)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--min-tokens", type=int, default=8000)
    ap.add_argument("--max-module-tokens", type=int, default=16000,
                    help="skip bigger modules (their context would mostly be cut to the window)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="context cap in tokens (default: whatever fits the LM's window)")
    ap.add_argument("--model", default=None, help="target + compression LM (default SmolLM2)")
    ap.add_argument("--fine-ratio", type=float, default=0.8)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--adjacent-fraction", type=float, default=0.5,
                    help="budget share of the longcodezip_adjacent variant (0 = skip it)")
    ap.add_argument("--split", choices=["test", "dev"], default="test",
                    help="test: the first --n-modules qualifying modules (the reported numbers); dev: "
                    f"--n-modules modules after the first {TEST_MODULES} (disjoint from the test "
                    "split's default size), for choosing settings")
    ap.add_argument("--adjacent-sweep", type=float, nargs="*", default=[],
                    help="extra rows longcodezip_cursor@F: CodeCompressor with cursor and "
                    "adjacent_fraction=F (for choosing the default on --split dev)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="run only modules i, i+N, i+2N, ... of the split (0-based I), so N "
                    "processes share the work; each writes the per-module cache only, then "
                    "--from-cache writes the JSON")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--recompute", nargs="*", default=[],
                    help="methods to recompute for modules already in the cache (the others, and "
                    "the none/full NLLs, are read from it); the ranking pass is persisted per "
                    "module next to the cache, so recomputing LongCodeZip variants is cheap")
    ap.add_argument("--only-cached", action="store_true",
                    help="with --recompute: skip modules that are not in the cache yet")
    ap.add_argument("--from-cache", action="store_true",
                    help="only summarise the modules already in the cache into --out")
    ap.add_argument("--merge-json", type=Path, nargs="+", default=None, metavar="JSON",
                    help="summarise the rows of earlier result files together (e.g. the test "
                    "and dev splits) into --out; no LM work")
    ap.add_argument("--only-uncached", action="store_true",
                    help="skip modules that are in the cache already")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="per-module results, for resuming (default: <ctxzip cache>/bench/"
                    "code_completion, keyed by the config; '' to disable)")
    args = ap.parse_args()
    n_modules = 2 if args.quick else args.n_modules
    shard = _parse_shard(args.shard)
    max_context = args.max_context or (2048 if args.quick else 10**9)

    if args.merge_json:  # pool finished result files: no model is loaded
        results = [json.loads(p.read_text()) for p in args.merge_json]
        rows = [r for res in results for r in res["rows"]]
        ids = [r["id"] for r in rows]
        if len(set(ids)) != len(ids):
            raise SystemExit("--merge-json: a module appears in more than one file")
        windows = {res["lm_window"] for res in results}
        if len(windows) != 1:
            raise SystemExit(f"--merge-json: the files were run with different LM windows {windows}")
        _write(args, rows, time.time(), windows.pop())
        return

    import torch
    from tqdm import tqdm

    from ctxzip.models import causal_lm_path, load_causal_lm, load_encoder, load_pretrained

    def lm_window(config: Any) -> int:
        return int(getattr(config, "max_position_embeddings", 8192) or 8192)

    torch.set_num_threads(args.threads)
    if args.from_cache:  # summarise the cached modules of this config (no LM work: config only)
        from transformers import AutoConfig

        window = lm_window(load_pretrained(AutoConfig, causal_lm_path(args.model), "target LM config"))
        _write(args, _cached_rows(args, max_context, n_modules), time.time(), window)
        return
    model, tok = load_causal_lm(args.model)
    window = lm_window(model.config)
    ev = ContextEvaluator(model, tok)
    encoder = load_encoder()

    # modules: >= min tokens, deterministic order (hash of path and seed)
    cases = []
    skip = TEST_MODULES if args.split == "dev" else 0  # dev modules come after the test ones
    for doc in code_documents(None, min_chars=args.min_tokens * 2, seed=args.seed):
        n = len(tok(doc.text, add_special_tokens=False)["input_ids"])
        if not args.min_tokens <= n <= args.max_module_tokens:
            continue
        c = make_case(doc, tok, args.seed, max_context, window)
        if c is not None:
            if skip:
                skip -= 1
                continue
            cases.append(c)
        if len(cases) >= n_modules:
            break

    if shard is not None:
        cases = cases[shard[0] :: shard[1]]
    cfg_key, cache_dir = _cache_key(args, max_context)
    if shard is not None and cache_dir is None:
        raise SystemExit("--shard needs the per-module cache (--cache-dir)")
    if cache_dir is not None:  # run_case saves the ranking state there before the row
        cache_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    t_start = time.time()
    for case in tqdm(cases, desc="modules"):
        cpath = None
        if cache_dir is not None:
            cpath = cache_dir / f"{case['id'].replace('/', '_').replace(':', '_')}-{cfg_key}.json"
            if cpath.exists() and not args.recompute:
                rows.append(json.loads(cpath.read_text()))
                tqdm.write(f"{case['id']}: cached")
                continue
        old = json.loads(cpath.read_text()) if cpath is not None and cpath.exists() else None
        if (old is None and args.only_cached) or (old is not None and args.only_uncached):
            continue
        if old is not None and set(args.recompute) <= set(old.get("recomputed", [])):
            rows.append(old)  # already recomputed with this code
            tqdm.write(f"{case['id']}: cached (recomputed {', '.join(old['recomputed'])})")
            continue
        state = cpath.with_suffix(".state.pt") if cpath is not None else None
        row = run_case(case, args, model, tok, ev, encoder, old, state)
        if args.recompute:  # rows of this code version (skipped by later recomputes)
            done = old.get("recomputed", []) if old is not None else []
            row["recomputed"] = sorted(set(done) | set(args.recompute))
        rows.append(row)
        if cpath is not None:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            cpath.write_text(json.dumps(row, indent=1, default=_json_default))
        last = str(args.rates[-1])
        tqdm.write(f"{case['id']} {case['function']}: ctx {row['context_tokens']} tok, none "
                   f"{row['nll_none']:.3f} full {row['nll_full']:.3f}, " + ", ".join(
                       f"{k} {v[last]['benefit']:.2f}" for k, v in row["methods"].items()
                       if v[last]["benefit"] is not None) + f" ({row['module_seconds']:.0f}s)")
        if shard is None:
            _write(args, rows, t_start, window)
    if shard is None:
        _write(args, rows, t_start, window)
    else:
        print(f"shard {args.shard}: {len(rows)} modules cached in {cache_dir}; when every shard "
              "is done, rerun with --from-cache (same options, no --shard) to write the JSON")


def _parse_shard(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SystemExit(f"--shard wants I/N (e.g. 0/2), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise SystemExit(f"--shard {spec}: need N >= 1 and 0 <= I < N")
    return i, n


def _cache_key(args: argparse.Namespace, max_context: int) -> tuple[str, Path | None]:
    cfg = {k: v for k, v in vars(args).items()
           if k not in ("out", "cache_dir", "quick", "n_modules", "recompute", "only_cached",
                        "only_uncached", "from_cache", "split", "adjacent_sweep", "shard", "merge_json")}
    if args.split != "test":  # the test split keeps the key (and cache) of earlier runs
        cfg["split"] = args.split
    cfg["max_context"] = max_context
    cfg_key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    if args.cache_dir is None:
        from ctxzip.models import cache_dir as ctxzip_cache

        args.cache_dir = ctxzip_cache() / "bench" / "code_completion"
    cache_dir = args.cache_dir if str(args.cache_dir) not in ("", ".") else None
    return cfg_key, cache_dir


def _cached_rows(args: argparse.Namespace, max_context: int, n: int) -> list[dict[str, Any]]:
    key, cache_dir = _cache_key(args, max_context)
    if cache_dir is None:
        raise SystemExit("--from-cache needs a cache directory")
    files = sorted(cache_dir.glob(f"*-{key}.json"))
    rows = [json.loads(p.read_text()) for p in files][:n]
    if args.recompute:
        stale = [r["id"] for r in rows if not set(args.recompute) <= set(r.get("recomputed", []))]
        if stale:
            raise SystemExit(f"not recomputed yet: {', '.join(stale)}")
    return rows


def run_case(case: dict[str, Any], args: argparse.Namespace, model: Any, tok: Any,
             ev: Any, encoder: Any, old: dict[str, Any] | None = None,
             state: Path | None = None) -> dict[str, Any]:
    """All methods on one case; with ``old`` (a cached row) only ``args.recompute`` methods are
    run and the rest copied. ``state`` persists the compressor's ranking pass (AMI, hidden
    states, block scores) so a recompute skips it (its recorded cold cost is reused)."""
    import torch

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
    if old is not None:
        none, full = old["nll_none"], old["nll_full"]
    else:
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
    te, ce = time.perf_counter(), time.process_time()
    with torch.no_grad():
        embs = encoder.encode([case["instruction"]] + chunks, normalize_embeddings=True,
                              convert_to_numpy=True, batch_size=32)
    sims = embs[1:] @ embs[0]
    emb_wall, emb_cpu = time.perf_counter() - te, time.process_time() - ce
    rng = np.random.default_rng(args.seed)
    shuffled = [int(i) for i in rng.permutation(len(chunks))]

    def _evaluate(text: str, secs: float, cpu: float) -> dict[str, Any]:
        n_out = len(ev.encode(text)) if text else 0
        v = nll(text) if text else none
        return {
            "tokens": n_out, "achieved_rate": n_out / n_ctx, "nll": v,
            "benefit": (none - v) / (none - full) if abs(none - full) > 1e-9 else None,
            "seconds": secs, "cpu_seconds": cpu,
        }

    common = dict(model=model, tokenizer=tok, fine_ratio=args.fine_ratio, beta=args.beta)
    lcz = CodeCompressor(**common)
    variants: dict[str, tuple[CodeCompressor, dict[str, Any]]] = {
        "longcodezip": (lcz, {}),
        "longcodezip_rank_only": (lcz, {"rank_only": True}),
    }
    if args.adjacent_fraction > 0:
        adj = CodeCompressor(**common, adjacent_fraction=args.adjacent_fraction)
        variants["longcodezip_adjacent"] = (adj, {"cursor": case["cursor"]})
    for f in args.adjacent_sweep:
        variants[f"longcodezip_cursor@{f:g}"] = (CodeCompressor(**common, adjacent_fraction=f),
                                                 {"cursor": case["cursor"]})
    rank_cold: tuple[float, float] | None = None  # (wall, cpu) of the shared ranking pass
    if old is not None:
        variants = {k: v for k, v in variants.items() if k in args.recompute}
        if old.get("rank_cold") is not None:
            rank_cold = tuple(old["rank_cold"])
    if state is not None and state.exists() and variants:
        saved = torch.load(state, weights_only=False)
        lcz._coarse_cache, lcz._base_cache = saved["coarse"], saved["base"]
        rank_cold = tuple(saved["rank_cold"])

    for rate in args.rates:
        b = Budget(rate=rate).resolve(n_ctx)
        outs: dict[str, tuple[str, float, float]] = {}
        for name, (comp, kw) in variants.items():
            if comp is not lcz and lcz._coarse_cache is not None:
                comp._coarse_cache, comp._base_cache = lcz._coarse_cache, lcz._base_cache
            t, c = time.perf_counter(), time.process_time()
            r = comp.compress(ctx, query=case["instruction"], budget=Budget(tokens=b),
                              language="python", **kw)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            if comp is not lcz:
                lcz._coarse_cache = comp._coarse_cache
            if rank_cold is None:  # the first call ran the ranking pass: its cold cost
                rank_cold = (r.timings.get("rank", 0.0), cpu * r.timings.get("rank", 0.0) / max(wall, 1e-9))
            else:  # later calls reused it: add the measured cold cost back
                wall += rank_cold[0] - r.timings.get("rank", 0.0)
                cpu += rank_cold[1]
            outs[name] = (r.text, wall, cpu)
        for name, (text, secs, cpu) in outs.items():
            row["methods"].setdefault(name, {})[str(rate)] = _evaluate(text, secs, cpu)
        if old is not None:
            for name, per_rate in old["methods"].items():
                if name not in args.recompute:
                    row["methods"].setdefault(name, {})[str(rate)] = per_rate[str(rate)]
            continue
        outs = {}
        t, c = time.perf_counter(), time.process_time()
        txt = fit(truncation_nearest(case, tok, b), tok, b)
        outs["truncation_nearest"] = (txt, time.perf_counter() - t, time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        txt = fit(select_chunks(chunks, sizes, shuffled, b), tok, b)
        outs["random_functions"] = (txt, time.perf_counter() - t, time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        order = [int(i) for i in np.argsort(-sims, kind="stable")]
        txt = fit(select_chunks(chunks, sizes, order, b), tok, b)
        outs["embedding_retrieval"] = (txt, emb_wall + time.perf_counter() - t,
                                       emb_cpu + time.process_time() - c)
        outs["no_context"] = ("", 0.0, 0.0)
        for name, (text, secs, cpu) in outs.items():
            row["methods"].setdefault(name, {})[str(rate)] = _evaluate(text, secs, cpu)
    if variants and rank_cold is not None and state is not None and lcz._coarse_cache is not None:
        torch.save({"coarse": lcz._coarse_cache, "base": lcz._base_cache,
                    "rank_cold": rank_cold}, state)
    if old is not None:  # keep the cached method order
        order = [*old["methods"], *(k for k in row["methods"] if k not in old["methods"])]
        row["methods"] = {k: row["methods"][k] for k in order}
    row["rank_seconds_cold"] = rank_cold[0] if rank_cold else None
    row["rank_cold"] = list(rank_cold) if rank_cold else None
    row["module_seconds"] = time.time() - t0
    return row


def _paired_bootstrap(rows: list[dict[str, Any]], a: str, b: str, rate: str,
                      n: int = 5000, seed: int = 0) -> dict[str, float]:
    """Pooled benefit of ``a`` minus ``b``, with a 95% interval from resampling modules
    (paired: both methods on the same resampled modules) and the share of resamples where
    ``a`` is ahead."""
    from ctxzip.eval import pooled_benefit_diff

    d = pooled_benefit_diff([r["nll_none"] for r in rows], [r["nll_full"] for r in rows],
                            [r["methods"][a][rate]["nll"] for r in rows], [r["methods"][b][rate]["nll"] for r in rows],
                            n_boot=n, seed=seed)
    return {k: d[k] for k in ("diff", "ci95", "p_ahead")}


def _summary(rows: list[dict[str, Any]], rates: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # methods every row has (rows of different runs can carry different sweep rows)
    names = [m for m in rows[0]["methods"] if all(m in r["methods"] for r in rows)] if rows else []
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
                "cpu_seconds_per_file_median": float(
                    np.median([m.get("cpu_seconds", m["seconds"]) for _, _, m in recs])),
                "nll_mean": float(np.mean([m["nll"] for _, _, m in recs])),
            }
        for m in ("longcodezip", "longcodezip_adjacent"):
            if m not in per:
                continue
            val = per[m]["benefit_pooled"]
            others = {k: per[k]["benefit_pooled"] for k in names
                      if not k.startswith("longcodezip")}
            per[f"_{m}_above_every_baseline"] = (
                val is not None and all(v is None or val > v for v in others.values())
            )
            per[f"_{m}_goal_met"] = bool(
                per[f"_{m}_above_every_baseline"] and val is not None and val >= 0.9
                and float(rate) <= 0.25 + 1e-9
            )
        # the two strongest baselines: LongCodeZip variants minus each, resampling modules
        for base, key in (("truncation_nearest", "_vs_truncation_paired_bootstrap"),
                          ("embedding_retrieval", "_vs_embedding_paired_bootstrap")):
            if base in per and len(rows) > 1:
                per[key] = {k: _paired_bootstrap(rows, k, base, str(rate))
                            for k in names if k not in (base, "no_context")}
        out[str(rate)] = per
    if rows:
        out["nll_none_mean"] = float(np.mean([r["nll_none"] for r in rows]))
        out["nll_full_mean"] = float(np.mean([r["nll_full"] for r in rows]))
    return out


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], t_start: float,
           window: int) -> None:
    import torch

    summary = _summary(rows, args.rates)
    res = {
        "benchmark": "code_completion",
        "description": "held-out function body NLL given compressed rest-of-module + "
        "signature/docstring; context benefit retained (pooled over modules and median)",
        "config": vars(args),  # Paths serialised by _json_default
        "target_lm": args.model or "smollm2-135m-instruct (offline default)",
        "lm_window": window,
        "n_modules": len(rows),
        "summary": summary,
        "goal": "longcodezip >= 0.9 retained at rate 0.25 (4x) and above every baseline "
        "(truncation nearest, random functions, embedding retrieval, no context)",
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
    if isinstance(x, Path):
        return str(x)
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
