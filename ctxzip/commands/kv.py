"""``ctxzip kv`` - KV-cache compression: evaluate a press on real local text."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PRESS_NAMES = [
    "streaming_llm", "snapkv", "snapkv_adaptive", "h2o", "knorm", "ems", "gear", "lowrank",
    "snapkv+gear", "observed_attention", "observed_attention_adaptive", "tova", "pyramidkv",
    "pyramidkv_adaptive", "razor", "razor+kivi",
]


def register(subparsers: Any) -> None:
    kv = subparsers.add_parser("kv", help="KV-cache compression (presses)")
    sub = kv.add_subparsers(dest="kv_command", metavar="KV_COMMAND")
    ev = sub.add_parser(
        "eval",
        help="context benefit retained by a press on real local documents",
        description="Compress the KV cache of real local documents (pydoc_data prose, CPython "
        "stdlib code) with a press and report the context benefit retained (continuation and "
        "recall targets), the measured cache bytes relative to a bf16 cache, and prefill time.",
    )
    ev.add_argument("--press", default="snapkv", choices=PRESS_NAMES, help="press to evaluate")
    ev.add_argument("--rate", default="0.25",
                    help="budget: kept fraction ('0.25', '25%%', '4x') or tokens per layer ('256')")
    ev.add_argument("--docs", type=int, default=4, help="documents per kind (default 4)")
    ev.add_argument("--kind", choices=["prose", "code", "both"], default="both")
    ev.add_argument("--context-tokens", type=int, default=1024)
    ev.add_argument("--model", default=None, help="HF model id or path (default: offline SmolLM2)")
    ev.add_argument("--bits", type=int, default=None, help="GEAR bits (gear, snapkv+gear)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=_eval)
    kv.set_defaults(func=lambda a: (kv.print_help(), 2)[1])


def _eval(args: argparse.Namespace) -> int:
    from ctxzip.budget import Budget

    try:
        budget = Budget.parse(args.rate)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.docs < 1:
        print("error: --docs must be >= 1", file=sys.stderr)
        return 2
    if args.context_tokens < 64:
        print("error: --context-tokens must be >= 64", file=sys.stderr)
        return 2
    import torch

    from ctxzip.eval import ContextEvaluator, code_documents, prose_documents
    from ctxzip.kvcache.evaluate import evaluate_press, make_press
    from ctxzip.models import ModelNotFoundError

    try:
        evaluator = ContextEvaluator(args.model)
    except ModelNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kw: dict[str, Any] = {}
    if args.bits is not None:
        if args.press not in ("gear", "snapkv+gear"):
            print("error: --bits applies to gear and snapkv+gear", file=sys.stderr)
            return 2
        kw["bits"] = args.bits
    try:
        press = make_press(args.press, budget, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.press == "lowrank":
        # calibrate on documents that the evaluation below does not use
        cal = [d.text for d in prose_documents(args.docs + 4)[args.docs :]]
        cal += [d.text for d in code_documents(args.docs + 4)[args.docs :]]
        press.calibrate(evaluator.model, evaluator.tokenizer, texts=cal)
    docs = []
    if args.kind in ("prose", "both"):
        docs += prose_documents(args.docs)
    if args.kind in ("code", "both"):
        docs += code_documents(args.docs)
    cases, last_err = [], ""
    n_recall = max(1, min(16, args.context_tokens // 64))  # spans must fit in the context
    for d in docs:
        try:
            cases.append(evaluator.make_case(d.text, context_tokens=args.context_tokens,
                                             n_recall=n_recall, doc_id=d.id))
        except ValueError as e:
            last_err = str(e)
    if not cases:
        print(f"error: no usable document for this context length ({last_err})", file=sys.stderr)
        return 1
    with torch.no_grad():
        res = evaluate_press(evaluator, cases, press)
    out = {
        "press": args.press, "budget": str(budget), "docs": len(cases),
        "context_tokens": args.context_tokens,
        "retained_continuation": round(res["continuation"], 4),
        "retained_recall": round(res["recall"], 4),
        "bytes_vs_bf16": round(res["bytes_vs_bf16"], 4),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>22}: {v}")
    return 0
