"""``ctxzip prompt distill``: train (or reproduce) an LLMLingua-2 token classifier."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("prompt", help="prompt-compression tools (distil a token classifier)")
    psub = p.add_subparsers(dest="prompt_command", metavar="SUBCOMMAND")
    d = psub.add_parser(
        "distill",
        help="distil a token classifier from the perplexity teacher or from (original, compressed) pairs",
        description=(
            "Label words with a teacher and fine-tune a token classifier on them. "
            "`ctxzip prompt distill --default` reproduces the shipped default classifier "
            "(teacher: PerplexityCompressor on SmolLM2; data: pydoc_data.topics minus the held-out "
            "topics, plus installed packages' descriptions; base: the packaged all-MiniLM-L6-v2)."
        ),
    )
    d.add_argument("--default", action="store_true", help="rebuild the shipped default (writes ctxzip/assets/lingua2-minilm unless --asset-dir)")
    d.add_argument("--check-corpus", action="store_true",
                   help="only compare the corpus --default would train on here with the shipped default's "
                        "(or with --asset-dir's meta.json; JSON on stdout; exit 0 if identical, 1 if not)")
    d.add_argument("--texts", nargs="*", default=None, help="UTF-8 text files to label with the teacher (instead of the default corpus)")
    d.add_argument("--pairs", default=None, help="JSON/JSONL of {prompt, compressed_prompt} pairs (LLMLingua-2 data format)")
    d.add_argument("--out", default=None, help="save_pretrained directory for the full model")
    d.add_argument("--asset-dir", default=None, help="write partial fp16 weights (trained layers + head) here")
    d.add_argument("--base", default=None, help="base encoder id/path (default: packaged all-MiniLM-L6-v2)")
    d.add_argument("--teacher", default=None, help="teacher causal LM id/path (default: offline SmolLM2)")
    d.add_argument("--teacher-rate", type=float, default=0.5, help="teacher keep rate (hard labels / iterative mode)")
    d.add_argument("--hard", action="store_true", help="hard 0/1 labels at --teacher-rate instead of soft percentile targets")
    d.add_argument("--max-samples", type=int, default=None, help="cap the number of training samples")
    d.add_argument("--metadata-chars", type=int, default=None, help="characters of package descriptions in the default corpus")
    d.add_argument("--docstring-chars", type=int, default=None, help="--default: characters of CPython stdlib docstrings in the corpus")
    d.add_argument("--sentence-weight", type=float, default=None,
                   help="--default: weight of the teacher's sentence ranking in the soft targets (0 = word ranks only)")
    d.add_argument("--word-target", choices=("rank", "score"), default=None,
                   help="--default: per-word soft target, percentile rank or scaled self-information")
    d.add_argument("--sentence-loss", type=float, default=None,
                   help="weight of the pairwise sentence-ranking loss (0 = off)")
    d.add_argument("--storage", choices=("fp16", "int8-delta"), default=None,
                   help="--asset-dir weights: fp16, or int8 differences from the base encoder (half the bytes)")
    d.add_argument("--labels-cache", default=None, help="--default: pickle file for the teacher labels (reused when present)")
    d.add_argument("--labels-only", action="store_true", help="--default: only label (fill --labels-cache), do not train")
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--batch-size", type=int, default=None)
    d.add_argument("--train-layers", type=int, default=None)
    d.add_argument("--lr", type=float, default=None)
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_distill)


def _corpus_warning(rep: dict) -> str:
    def few(xs: list) -> str:
        return ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "") if xs else "none"

    return ("warning: the default corpus here differs from the one the shipped classifier was trained on "
            f"({rep['sources']} sources / {rep['chars']:,} characters here, {rep['shipped_sources']} / "
            f"{rep['shipped_chars'] or 0:,} shipped; missing here: {few(rep['missing'])}; new here: {few(rep['extra'])}). "
            "It includes installed packages' descriptions, so the rebuilt classifier will not be identical "
            "to the shipped one; install the recorded package versions (ctxzip/assets/lingua2-minilm/meta.json) "
            "to reproduce it exactly.")


def _distill(args: argparse.Namespace) -> int:
    import torch

    from ctxzip.prompt import distill as D

    if args.threads:
        torch.set_num_threads(int(args.threads))
    cfg = D.DistillConfig()
    for k in ("epochs", "train_layers", "lr", "batch_size", "sentence_loss"):
        v = getattr(args, k)
        if v is None and args.default:
            v = D.DEFAULT_RECIPE[k]
        if v is not None:
            setattr(cfg, k, v)
    progress = not args.no_progress
    if args.check_corpus:
        rep = D.check_default_corpus(args.asset_dir)
        print(json.dumps(rep, indent=1))
        if not rep["match"]:
            print(_corpus_warning(rep), file=sys.stderr)
        return 0 if rep["match"] else 1
    if args.default:
        if args.texts or args.pairs:
            raise ValueError("--default uses the built-in corpus; drop --texts/--pairs")
        R = D.DEFAULT_RECIPE
        if args.metadata_chars in (None, R["metadata_chars"]) and args.docstring_chars in (None, R["docstring_chars"]):
            try:  # the recipe's corpus: would it be the shipped classifier's?
                rep = D.check_default_corpus()
            except (OSError, ValueError):  # no shipped asset to compare with: nothing to warn about
                rep = {"match": True}
            if not rep["match"]:
                print(_corpus_warning(rep), file=sys.stderr)
        asset = args.asset_dir or str(D.default_asset_dir())
        log = D.distill_default(
            args.out, asset_dir=asset, max_samples=args.max_samples if args.max_samples is not None else R["max_samples"],
            metadata_chars=args.metadata_chars if args.metadata_chars is not None else R["metadata_chars"],
            docstring_chars=args.docstring_chars if args.docstring_chars is not None else R["docstring_chars"],
            sentence_weight=args.sentence_weight if args.sentence_weight is not None else R["sentence_weight"],
            teacher_rate=args.teacher_rate, config=cfg, progress=progress, labels_cache=args.labels_cache,
            labels_only=args.labels_only,
            word_target=args.word_target or R["word_target"], storage=args.storage or R["storage"],
        )
        if args.labels_only:
            print(json.dumps(log, indent=1))
            return 0
        print(json.dumps({k: log[k] for k in ("n_train", "n_eval", "epochs", "total_seconds", "teacher_seconds") if k in log}, indent=1))
        print(f"wrote {asset}", file=sys.stderr)
        return 0
    if not args.out and not args.asset_dir:
        raise ValueError("give --out (save_pretrained directory) and/or --asset-dir, or use --default")
    from pathlib import Path

    from transformers import AutoTokenizer

    from ctxzip.models import encoder_path

    tok = AutoTokenizer.from_pretrained(encoder_path(args.base))
    if args.pairs:
        recs = D.pair_labels(D.load_pairs(args.pairs), tok)
    else:
        if not args.texts:
            raise ValueError("give --texts FILE..., --pairs FILE or --default")
        texts = []
        for f in args.texts:
            p = Path(f)
            if not p.is_file():
                raise FileNotFoundError(f"no such file: {f}")
            texts.append(p.read_bytes().decode("utf-8"))
        smp = D.samples(texts, tok)
        if args.max_samples:
            smp = smp[: args.max_samples]
        from ctxzip.prompt.perplexity import PerplexityCompressor

        recs = D.teacher_labels(smp, tok, PerplexityCompressor(model=args.teacher), teacher_rate=args.teacher_rate, soft=not args.hard, progress=progress)
    if not recs:
        raise ValueError("no training data (empty inputs?)")
    ev = recs[::10] if len(recs) >= 10 else []
    tr = [r for i, r in enumerate(recs) if not (ev and i % 10 == 0)]
    model, _, log = D.train(tr, base=args.base, config=cfg, eval_records=ev or None, out_dir=args.out, progress=progress)
    if args.asset_dir:
        D.export_partial(model, args.asset_dir, log["trained_layers"], meta={"distill_log": log}, storage=args.storage or "fp16")
    print(json.dumps({k: log[k] for k in ("n_train", "n_eval", "epochs") if k in log}, indent=1))
    return 0
