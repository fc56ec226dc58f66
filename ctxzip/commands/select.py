"""``ctxzip select``: data selection over corpora (ZIP-FIT, PreSelect, loss-based)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", action="append", required=True, metavar="PATH",
                   help="JSONL (.gz/.zst) or Parquet file, glob ('data/*.jsonl') or directory; "
                        "repeatable")
    p.add_argument("--out", "-o", required=True, metavar="DIR",
                   help="output directory (scores/, selected/, rejected/, malformed.jsonl, "
                        "summary.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", metavar="BUDGET",
                   help="fraction or count of documents kept: '10%%', '0.1', '5000'")
    g.add_argument("--keep-tokens", type=int, metavar="N",
                   help="keep the best documents until N tokens (see --token-unit)")
    g.add_argument("--threshold", type=float, metavar="S", help="keep documents with score >= S")
    p.add_argument("--token-unit", default=None,
                   help="how tokens are counted: 'default' (SmolLM2 tokenizer), a tokenizer "
                        "id/path, 'chars', 'bytes' or 'words'")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=None,
                   help="processes / Ray actors (default: all CPUs)")
    p.add_argument("--address", default=None, help="Ray cluster address (engine ray)")
    p.add_argument("--shard-size", type=int, default=10_000, help="records per shard")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--overwrite", action="store_true",
                   help="discard scores of an earlier run with other settings")
    p.add_argument("--no-rejected", action="store_true", help="do not write rejected/")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def register(subparsers: Any) -> None:
    top = subparsers.add_parser(
        "select", help="select corpus data under a global budget (ZIP-FIT, PreSelect, loss)",
        description="Score a corpus in shards (local process pool or Ray), then keep a "
                    "fraction, a document count or a token budget over the whole corpus.")
    sub = top.add_subparsers(dest="select_command", metavar="METHOD")
    top.set_defaults(func=lambda a: (top.print_help(), 2)[1])

    z = sub.add_parser("zipfit", help="ZIP-FIT: compression alignment to a target set")
    z.add_argument("--target", "-t", action="append", required=True, metavar="PATH",
                   help="target examples (JSONL/Parquet with a text field); repeatable")
    z.add_argument("--codec", default="gzip",
                   help="gzip (paper, exact), zlib, isal, zlib-ng, lz4, zstd")
    z.add_argument("--level", type=int, default=None, help="compression level (gzip: 6)")
    z.add_argument("--max-targets", type=int, default=None,
                   help="use only the first N target examples")
    z.add_argument("--fast", action="store_true",
                   help="fast mode (ZipFitRace): an ISA-L-0 prefilter, then exact --codec pairs "
                        "raced over the targets; ~10x less CPU, >= 90%% of the exact top-k "
                        "on the benchmark (needs --keep)")
    z.add_argument("--z", type=float, default=None,
                   help="fast mode: keep/drop bound width in standard errors (default 1.5; "
                        "higher = closer to exact, slower)")
    z.add_argument("--prefilter", default=None, metavar="CODEC",
                   help="cascade: score everything with this codec first (e.g. isal-0), then "
                        "rescore the best --margin x budget with --codec")
    z.add_argument("--prefilter-targets", type=int, default=None, metavar="N",
                   help="the prefilter uses only the first N targets (default: all)")
    z.add_argument("--margin", type=float, default=3.0,
                   help="cascade candidate pool, as a multiple of the budget (default 3)")
    _common(z)
    z.set_defaults(func=_run_zipfit)

    ps = sub.add_parser("preselect", help="PreSelect: filter with a fastText classifier")
    ps.add_argument("--model", "-m", required=True, help="fastText .bin (trained or released)")
    ps.add_argument("--label", default="__label__1")
    _common(ps)
    ps.set_defaults(func=_run_preselect)

    lo = sub.add_parser("loss", help="keep the documents with the lowest BPC under one LM")
    lo.add_argument("--model", "-m", default="smollm2",
                    help="smollm2 (default), gemma3-270m, HF id/path, 'smollm2@layers=20'")
    lo.add_argument("--window", type=int, default=1900)
    lo.add_argument("--stride", type=int, default=512)
    _common(lo)
    lo.set_defaults(func=_run_loss)

    tr = sub.add_parser("train-preselect",
                        help="train PreSelect's fastText classifier from a model ladder")
    tr.add_argument("--input", "-i", action="append", required=True,
                    help="documents to label (JSONL/Parquet, glob); repeatable")
    tr.add_argument("--ladder", required=True,
                    help="comma-separated model specs, e.g. "
                         "'smollm2,smollm2@layers=20,smollm2@layers=12,gemma3-270m'")
    b = tr.add_mutually_exclusive_group(required=True)
    b.add_argument("--benchmark-scores", help="comma-separated benchmark score per model")
    b.add_argument("--benchmark-text", action="append",
                   help="held-out task text (JSONL/Parquet); each model's benchmark score is "
                        "measured as -BPC on it")
    tr.add_argument("--out", "-o", required=True, help="fastText model path (.bin)")
    tr.add_argument("--max-docs", type=int, default=None, help="label only the first N docs")
    tr.add_argument("--text-field", default="text")
    tr.add_argument("--window", type=int, default=1900)
    tr.add_argument("--stride", type=int, default=512)
    tr.add_argument("--positive-min", type=float, default=1.0,
                    help="predictive strength a positive needs (1.0 = perfect order)")
    tr.add_argument("--quiet", "-q", action="store_true")
    tr.set_defaults(func=_run_train)


def _texts(paths: list[str], text_field: str, limit: int | None = None) -> list[str]:
    from ctxzip.datasel.io import iter_records

    out = []
    for rec in iter_records(paths, text_field=text_field, id_field=None):
        if rec.text is not None:
            out.append(rec.text)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"no usable texts in {paths} (field {text_field!r})")
    return out


def _run(args: argparse.Namespace, scorer: Any, **extra: Any) -> int:
    from ctxzip.datasel.select import select

    summary = select(
        args.input, scorer, args.out, keep=args.keep, keep_tokens=args.keep_tokens,
        threshold=args.threshold, token_unit=args.token_unit, engine=args.engine,
        workers=args.workers, address=args.address, shard_size=args.shard_size,
        text_field=args.text_field, id_field=args.id_field or None, overwrite=args.overwrite,
        write_rejected=not args.no_rejected, progress=not args.quiet, **extra,
    )
    d = summary.to_dict()
    print(json.dumps({k: d[k] for k in ("records", "selected", "rejected", "malformed",
                                         "malformed_reasons", "threshold", "budget",
                                         "cascade", "out_dir")}, indent=1))
    return 0


def _run_zipfit(args: argparse.Namespace) -> int:
    from ctxzip.datasel.zipfit import ZipFit

    targets = _texts(args.target, args.text_field, args.max_targets)
    if args.fast:
        from ctxzip.datasel.race import ZipFitRace

        if args.prefilter:
            raise SystemExit("error: --fast brings its own prefilter; drop --prefilter")
        kw = {} if args.z is None else {"z": args.z}
        return _run(args, ZipFitRace(targets, codec=args.codec, level=args.level, **kw))
    extra: dict[str, Any] = {}
    if args.prefilter:
        extra["prefilter"] = ZipFit(targets[: args.prefilter_targets], codec=args.prefilter)
        extra["margin"] = args.margin
    return _run(args, ZipFit(targets, codec=args.codec, level=args.level), **extra)


def _run_preselect(args: argparse.Namespace) -> int:
    from ctxzip.datasel.preselect import FastTextScorer

    return _run(args, FastTextScorer(args.model, label=args.label))


def _run_loss(args: argparse.Namespace) -> int:
    from ctxzip.datasel.bpc import LossScorer

    return _run(args, LossScorer(args.model, window=args.window, stride=args.stride))


def _run_train(args: argparse.Namespace) -> int:
    import numpy as np

    from ctxzip.datasel.preselect import LadderModel, PreSelect

    specs = [s.strip() for s in args.ladder.split(",") if s.strip()]
    if args.benchmark_scores:
        scores = [float(x) for x in args.benchmark_scores.split(",")]
        if len(scores) != len(specs):
            raise ValueError(f"{len(specs)} models but {len(scores)} benchmark scores")
        ladder = [LadderModel(s, b) for s, b in zip(specs, scores)]
    else:
        ladder = [LadderModel(s) for s in specs]
    ps = PreSelect(ladder, window=args.window, stride=args.stride,
                   positive_min=args.positive_min)
    if args.benchmark_text:
        ps.measure_benchmarks(_texts(args.benchmark_text, args.text_field),
                              progress=not args.quiet)
    texts = _texts(args.input, args.text_field, args.max_docs)
    _, info = ps.fit(texts, args.out, progress=not args.quiet)
    report = {
        "model": args.out,
        "ladder": [{"spec": r.spec, "benchmark": r.benchmark} for r in ps.ladder],
        "documents": len(texts),
        "positives": int(info["positives"].size),
        "negatives": int(info["negatives"].size),
        "strength_histogram": {f"{k:.3f}": int(v) for k, v in zip(
            *np.unique(np.round(info["strength"], 3), return_counts=True))},
    }
    with open(args.out + ".report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0
