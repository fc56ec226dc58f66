"""``ctxzip code``: compress a source file for a query with LongCodeZip."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "code",
        help="compress a long code file for a query/instruction (LongCodeZip)",
        description="Keep the functions (and, inside them, the blocks) of FILE that most reduce "
        "the perplexity of --query under a causal LM, within a token budget (LongCodeZip, "
        "Shi et al. 2025). Prints the compressed code.",
    )
    p.add_argument("file", help="source file, or - for standard input")
    p.add_argument("--query", "-q", default=None,
                   help="instruction/query the kept code should help with (e.g. the signature "
                   "and docstring of the function to write); without it functions keep file order")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, default=None,
                   help="fraction of tokens kept, 0 < rate <= 1 (default 0.25 = 4x)")
    g.add_argument("--tokens", type=int, default=None, help="number of tokens kept")
    g.add_argument("--budget", default=None, help="budget as '25%%', '0.25', '4x' or '500'")
    p.add_argument("--rank-only", action="store_true",
                   help="coarse stage only: keep whole functions")
    p.add_argument("--language", default="auto",
                   help="python, javascript, typescript, java, go, rust, c, cpp, ..., text "
                   "(default: from the file name or the content)")
    p.add_argument("--model", default=None,
                   help="causal LM id or local path (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--fine-ratio", type=float, default=0.8,
                   help="R_fine: the coarse stage keeps budget/R_fine tokens of whole functions")
    p.add_argument("--beta", type=float, default=0.5, help="importance sensitivity of the "
                   "per-function budget (0 = same rate for every function)")
    p.add_argument("--alpha", type=float, default=0.2,
                   help="block boundary threshold: perplexity spike above mean + alpha*std")
    p.add_argument("--block-values", choices=["normalized", "raw"], default="normalized",
                   help="knapsack value of a block: AMI min-max normalised within its function "
                   "(paper, default) or the raw AMI (reference code)")
    p.add_argument("--spike-rule", choices=["paper", "reference"], default="reference",
                   help="block boundary test (see docs/code.md)")
    p.add_argument("--no-coarse-overflow", dest="coarse_overflow", action="store_false",
                   help="coarse stage skips a chunk that does not fit and back-fills with "
                   "smaller lower-ranked ones (default: stop at the chunk crossing the coarse "
                   "budget, as the reference code)")
    p.add_argument("--cursor-line", type=int, default=None,
                   help="1-based line the model continues from (e.g. a completion point); "
                   "used with --adjacent-fraction")
    p.add_argument("--adjacent-fraction", type=float, default=0.0,
                   help="share of the budget first given to whole chunks nearest --cursor-line "
                   "(not in the paper; default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON object (text, token counts, rate, ratio, timings, ranking)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=run)


def _read(path: str) -> tuple[bytes, str | None]:
    if path == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        return (data.encode("utf-8") if isinstance(data, str) else data), None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return p.read_bytes(), p.name


def run(args: argparse.Namespace) -> int:
    from ctxzip.budget import Budget
    from ctxzip.prompt.code import CodeCompressor

    if args.tokens is not None:
        budget = Budget(tokens=args.tokens)
    elif args.budget is not None:
        budget = Budget.parse(args.budget)
    else:
        budget = Budget(rate=0.25 if args.rate is None else args.rate)
    data, name = _read(args.file)
    cc = CodeCompressor(
        model=args.model, language=args.language, fine_ratio=args.fine_ratio, beta=args.beta,
        alpha=args.alpha, block_values=args.block_values, spike_rule=args.spike_rule,
        adjacent_fraction=args.adjacent_fraction, coarse_overflow=args.coarse_overflow,
        device=args.device, show_progress=args.progress,
    )
    cursor = None
    if args.cursor_line is not None:
        text = data.decode("utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        if not 1 <= args.cursor_line <= len(lines) + 1:
            raise ValueError(f"--cursor-line must be in [1, {len(lines) + 1}], got {args.cursor_line}")
        cursor = len("".join(lines[: args.cursor_line - 1]))
    res = cc.compress(data, query=args.query, budget=budget, filename=name,
                      rank_only=args.rank_only, cursor=cursor)
    if args.json:
        d = res.to_dict()
        det = res.details
        d["language"] = det.get("language")
        d["budget"] = str(budget)
        if "chunk_ranges" in det:
            d["chunks"] = [
                {"start_line": a + 1, "end_line": b, "kind": k, "name": n, "ami": s,
                 "kept": i in det.get("coarse_kept", [])}
                for i, ((a, b, k, n), s) in enumerate(zip(det["chunk_ranges"], det["chunk_scores"]))
            ]
        print(json.dumps(d, indent=2))
    else:
        sys.stdout.write(res.text)
        if res.text and not res.text.endswith("\n"):
            sys.stdout.write("\n")
        print(
            f"[ctxzip code] {res.original_tokens} -> {res.compressed_tokens} tokens "
            f"(rate {res.rate:.3f}, {res.ratio:.2f}x, {res.timings.get('total', 0):.1f}s)",
            file=sys.stderr,
        )
    return 0
