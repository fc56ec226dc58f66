"""Shared real data for the data-selection benchmarks (deterministic, built from this
interpreter's CPython standard library; nobody here wrote it).

- source: every stdlib ``.py`` file (test suite included, site-packages excluded) except the
  held-out target files, cut at line boundaries into chunks of ~2,000 characters;
- target: 100 chunks of held-out files of the stdlib test suite (``Lib/test``), i.e. the
  "task" ZIP-FIT / DSIR are asked to find data for.
The held-out target files are picked by a hash of their path, so no target text is in the source.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

CHUNK_CHARS = 2000


def _h(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if n >= size // 4:
        out.append("".join(cur))
    return out


def stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "__pycache__" in rel:
            continue
        files.append((rel, p))
    return sorted(files)


def build(n_targets: int = 100, max_source: int | None = None) -> tuple[list[dict], list[dict]]:
    """(source records, target records) as ``{"id", "text"}`` dicts."""
    source, target_pool = [], []
    for rel, p in stdlib_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        held_out = rel.startswith("test/") and int(_h(rel), 16) % 10 == 0
        for i, c in enumerate(chunk_text(text)):
            rec = {"id": f"{rel}#{i}", "text": c}
            (target_pool if held_out else source).append(rec)
    target_pool.sort(key=lambda r: _h(r["id"]))
    targets = target_pool[:n_targets]
    if max_source is not None:
        source.sort(key=lambda r: _h(r["id"]))
        source = sorted(source[:max_source], key=lambda r: r["id"])
    return source, targets


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def machine() -> dict:
    import psutil

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def parse_args(doc: str, quick_help: str, workers: int = 2,
               argv: list[str] | None = None) -> argparse.Namespace:
    """The command line every data-selection benchmark shares: ``--quick`` and ``--workers``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--workers", type=int, default=workers)
    return ap.parse_args(argv)
