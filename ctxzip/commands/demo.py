"""``ctxzip demo``: every compressor that exists, on real local text, at a few budgets.

Prints a table of method, budget, rate achieved, context benefit retained (continuation and
recall targets, pooled over documents), and seconds per document, with the offline SmolLM2 as
the target LM: the text compressors (baselines, the distilled LLMLingua-2 classifier, the
perplexity compressor) and KV-cache presses on the same contexts (``kv:`` rows, evicting to the keep rate; their "achieved"
column is the measured cache bytes relative to a bf16 cache). Baselines (random drop, truncation)
are always in the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

DEFAULT_RATES = "0.5,0.33"
DEFAULT_PRESSES = "streaming_llm,snapkv,h2o,snapkv+gear"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run every compressor on real local text and print a quality/speed table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--docs", type=int, default=2, help="prose documents (default 2)")
    p.add_argument("--context-tokens", type=int, default=512, help="context length (default 512)")
    p.add_argument("--rates", default=DEFAULT_RATES, help=f"keep rates (default {DEFAULT_RATES})")
    p.add_argument("--methods", default=None, help="comma-separated subset of method names")
    p.add_argument("--presses", default=DEFAULT_PRESSES,
                   help=f"KV-cache presses to run ('' for none; default {DEFAULT_PRESSES})")
    p.add_argument("--model", default=None, help="target LM id/path (default: offline SmolLM2)")
    p.add_argument("--json", dest="json_out", default=None, help="also write results to this file")
    p.set_defaults(func=run)


def text_methods() -> dict[str, Callable[[], Any]]:
    """Name -> factory of every text compressor the demo runs (baselines first)."""
    from ctxzip.prompt import (
        PerplexityCompressor,
        RandomDropCompressor,
        TokenClassifierCompressor,
        TruncationCompressor,
    )

    methods: dict[str, Callable[[], Any]] = {
        "random-drop": lambda: RandomDropCompressor(seed=0),
        "truncate-tail": lambda: TruncationCompressor("tail"),
        "lingua2-distilled": lambda: TokenClassifierCompressor(),
        "perplexity": lambda: PerplexityCompressor(),
    }
    return methods


def _parse_rates(spec: str) -> list[float]:
    from ctxzip import Budget

    out = []
    for part in spec.split(","):
        b = Budget.parse(part.strip())
        if b.rate is None:
            raise ValueError(f"--rates takes keep rates like 0.5 or 33%, got {part!r}")
        out.append(b.rate)
    return out


def run(args: argparse.Namespace) -> int:
    if args.docs < 1:
        raise ValueError("--docs must be >= 1")
    if args.context_tokens < 64:
        raise ValueError("--context-tokens must be >= 64")
    rates = _parse_rates(args.rates)
    presses = [p.strip() for p in (args.presses or "").split(",") if p.strip()]
    if presses:
        from ctxzip.kvcache.evaluate import PRESSES

        bad = [p for p in presses if p.lower().replace("-", "_") not in PRESSES]
        if bad:
            raise ValueError(f"unknown press(es) {bad}; available: {sorted(PRESSES)}")
    methods = text_methods()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; available: {sorted(methods)}")
        methods = {m: methods[m] for m in wanted}

    from tqdm.auto import tqdm

    from ctxzip import Budget
    from ctxzip.eval import ContextEvaluator, pooled_benefit, prose_documents

    t0 = time.perf_counter()
    print("loading the target LM (first run converts the packaged GGUF once, ~30 s)...",
          file=sys.stderr)
    ev = ContextEvaluator(args.model)
    docs = prose_documents(args.docs)
    cases = [ev.make_case(d.text, context_tokens=args.context_tokens, continuation_tokens=64,
                          n_recall=8, doc_id=d.id) for d in docs]
    rows: list[dict[str, Any]] = []
    work = [(name, rate) for name in methods for rate in rates]
    built: dict[str, Any] = {}
    with tqdm(total=len(work) * len(cases) + len(cases), desc="demo", file=sys.stderr) as bar:
        for case in cases:
            ev.baseline(case)
            bar.update()
        for name, rate in work:
            if name not in built:
                built[name] = methods[name]()
            comp = built[name]
            trip = {"continuation": [], "recall": []}
            secs, achieved = [], []
            for case in cases:
                t = time.perf_counter()
                res = comp.compress(case.context_text, budget=Budget(rate=rate))
                secs.append(time.perf_counter() - t)
                achieved.append(res.rate)
                b = ev.benefit(case, res.text)
                for tgt in trip:
                    n = b[f"nll_{tgt}"]
                    trip[tgt].append((n["none"], n["full"], n["compressed"]))
                bar.update()
            rows.append({
                "method": name,
                "rate": rate,
                "achieved_rate": sum(achieved) / len(achieved),
                "continuation": pooled_benefit(trip["continuation"]),
                "recall": pooled_benefit(trip["recall"]),
                "seconds_per_doc": sum(secs) / len(secs),
            })
    if presses:
        from ctxzip.kvcache.evaluate import evaluate_press, make_press

        for name in tqdm(presses, desc="kv presses", file=sys.stderr):
            for rate in rates:
                r = evaluate_press(ev, cases, make_press(name, Budget(rate=rate)))
                rows.append({
                    "method": f"kv:{name}",
                    "rate": rate,
                    "achieved_rate": r["bytes_vs_bf16"],
                    "continuation": r["continuation"],
                    "recall": r["recall"],
                    "seconds_per_doc": sum(r["prefill_s"]) / max(len(r["prefill_s"]), 1),
                })
    _print_table(rows)
    print(f"\n{len(cases)} prose documents from pydoc_data.topics, {args.context_tokens}-token "
          f"contexts; target LM: {args.model or 'SmolLM2-135M-Instruct (offline)'}; "
          f"total {time.perf_counter() - t0:.0f} s. 'retained' = context benefit retained "
          f"(1 = as good as the full context, 0 = as if there were none); for kv: rows "
          f"'achieved' is the cache bytes relative to a bf16 cache, and s/doc is the prefill with the press.")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "docs": [c.doc_id for c in cases],
                       "context_tokens": args.context_tokens}, f, indent=2)
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'method':<22} {'keep':>5} {'achieved':>8} {'retained:cont':>13} {'retained:recall':>15} {'s/doc':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<22} {r['rate']:>5.2f} {r['achieved_rate']:>8.3f} "
              f"{r['continuation']:>13.3f} {r['recall']:>15.3f} {r['seconds_per_doc']:>7.2f}")
