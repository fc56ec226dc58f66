"""``ctxzip compress FILE|-``: compress a prompt with LLMLingua-2 or the perplexity method."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="compress a text (prompt) file",
        description="Compress text read from FILE (or stdin with '-') and print the result.",
    )
    p.add_argument("file", help="UTF-8 text file, or '-' for stdin")
    p.add_argument("--rate", default="0.33", help="budget: rate kept ('0.33'), percentage ('33%%'), ratio ('3x') or token count ('500'); default 0.33")
    p.add_argument("--method", choices=["lingua2", "perplexity", "perplexity-sentence"], default="lingua2")
    p.add_argument("--query", default=None, help="question for question-aware compression (perplexity: LongLLMLingua contrastive scores)")
    p.add_argument("--model", default=None, help="token classifier (lingua2) or causal LM (perplexity) id/path; default: offline defaults")
    p.add_argument("--mode", choices=["global", "chunk"], default="global", help="lingua2 selection: global budget or the anchor's per-chunk percentile")
    p.add_argument("--fast", nargs="?", const=True, default=False, metavar="KIND",
                   help="lingua2: faster inference; bare --fast = approximate (ONNX Runtime int8 if installed, else torch "
                        "bf16/int8); or one of onnx-int8, onnx, onnx-exact (with --mode chunk: same decisions as exact), bf16, int8")
    p.add_argument(
        "--sentence-filter", action=argparse.BooleanOptionalAction, default=None,
        help="sentence-level coarse stage first (LLMLingua's budget controller): rank sentences, keep the best up to "
             "--token-budget-ratio x the budget, then trim words/tokens to the exact budget. Default: on for lingua2 "
             "with the distilled default classifier (it is how that classifier was distilled), off for a --model "
             "classifier and for perplexity (anchor default); `--method perplexity --sentence-filter` is the "
             "distilled classifier's teacher",
    )
    p.add_argument("--token-budget-ratio", type=float, default=1.0,
                   help="with --sentence-filter: sentence-stage budget as a multiple of the final budget (default 1.0; the anchor's is 1.4)")
    p.add_argument("--whitespace", choices=["keep", "collapse"], default="keep",
                   help="lingua2: keep the original gaps between neighbouring kept words (default) or "
                        "collapse every gap to one space / line break like llmlingua")
    p.add_argument("--force-tokens", default="", help="lingua2: comma-separated words always kept")
    p.add_argument("--json", action="store_true", help="print a JSON object (text, tokens, rate, ratio, timings)")
    p.add_argument("--details", action="store_true", help="with --json: include method details and the keep mask")
    p.set_defaults(func=_run)


def _read(path: str) -> str:
    data = sys.stdin.buffer.read() if path == "-" else _read_file(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 (byte {e.start}); convert it first, e.g. iconv -t utf-8") from None


def _read_file(path: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return p.read_bytes()


def _run(args: argparse.Namespace) -> int:
    from ctxzip.budget import Budget

    budget = Budget.parse(args.rate)
    text = _read(args.file)
    if args.method == "lingua2":
        from ctxzip.prompt import TokenClassifierCompressor

        force = tuple(t for t in args.force_tokens.split(",") if t) if args.force_tokens else ()
        if args.sentence_filter and args.mode != "global":
            raise ValueError("--sentence-filter needs --mode global")
        comp: Any = TokenClassifierCompressor(model=args.model, mode=args.mode, fast=args.fast, force_tokens=force,
                                              sentence_filter=args.sentence_filter,
                                              token_budget_ratio=args.token_budget_ratio,
                                              whitespace=args.whitespace)
        sentence_filter = comp.mode == "global" and (args.sentence_filter if args.sentence_filter is not None else args.model is None)
    else:
        from ctxzip.prompt import PerplexityCompressor

        unit = "sentence" if args.method == "perplexity-sentence" else "token"
        if args.sentence_filter and unit == "sentence":
            raise ValueError("--sentence-filter applies to --method perplexity (perplexity-sentence keeps whole sentences only)")
        sentence_filter = bool(args.sentence_filter)
        comp = PerplexityCompressor(model=args.model, unit=unit, sentence_filter=sentence_filter,
                                    token_budget_ratio=args.token_budget_ratio)
    res = comp.compress(text, budget=budget, query=args.query)
    if args.json:
        d = res.to_dict(with_details=args.details)
        d["settings"] = {"method": args.method, "sentence_filter": sentence_filter,
                         "token_budget_ratio": args.token_budget_ratio if sentence_filter else None}
        if args.method == "lingua2":
            d["settings"]["whitespace"] = args.whitespace  # how kept words were joined
        print(json.dumps(d, ensure_ascii=False))
    else:
        sys.stdout.write(res.text)
        if not res.text.endswith("\n"):
            sys.stdout.write("\n")
    return 0
