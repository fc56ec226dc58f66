"""The ``ctxzip`` command.

Each subcommand group lives in its own module under :mod:`ctxzip.commands` and exposes
``register(subparsers)``; this file only discovers them, so adding a group touches nothing else.
Heavy imports (torch, transformers) happen inside the command functions, keeping ``--help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

import ctxzip
import ctxzip.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxzip",
        description="Compress what LLM pipelines read: prompts, code, retrieved documents, "
        "KV caches, visual tokens and pretraining corpora.",
    )
    parser.add_argument("--version", action="version", version=f"ctxzip {ctxzip.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(ctxzip.commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"ctxzip.commands.{mod.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, UnicodeDecodeError) as e:
        # user errors: one clear line, no traceback (use -v for the traceback)
        if args.verbose:
            raise
        print(f"ctxzip: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
