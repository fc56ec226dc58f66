"""Real local corpora that every machine with CPython has, nobody here wrote, and that are
built deterministically: English reference prose from ``pydoc_data.topics`` (~465k chars) and
code from the CPython standard library.

Selections depend only on the arguments and the interpreter's own files, so two runs on the
same Python version see the same documents (the Python version is recorded by benchmarks).
"""

from __future__ import annotations

import hashlib
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "prose_documents", "code_documents", "stdlib_python_files"]


@dataclass(frozen=True)
class Document:
    """A real local document: ``id`` (stable), ``text``, ``source`` (file path or topic)."""

    id: str
    text: str
    source: str


def _stable_key(s: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{s}".encode()).hexdigest()


def _split_paragraphs(text: str, max_chars: int) -> Iterator[str]:
    """Cut ``text`` at blank lines into pieces of at most ``max_chars`` (a longer paragraph is
    its own piece)."""
    buf: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        if buf and size + len(para) + 2 > max_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
        buf.append(para)
        size += len(para) + 2
    if buf:
        yield "\n\n".join(buf)


def prose_documents(
    n: int | None = None, *, min_chars: int = 6000, max_chars: int = 12000, seed: int = 0
) -> list[Document]:
    """English prose documents from ``pydoc_data.topics``.

    Long topics are cut at paragraph boundaries into pieces of ``min_chars..max_chars``
    characters; pieces shorter than ``min_chars`` are dropped. The order is round-robin over
    topics (shuffled by a hash of ``seed``), so the first ``n`` documents span many topics.
    """
    from pydoc_data.topics import topics

    if min_chars > max_chars:
        raise ValueError("min_chars must be <= max_chars")
    per_topic: list[list[Document]] = []
    for name in sorted(topics, key=lambda k: _stable_key(k, seed)):
        pieces = [p for p in _split_paragraphs(topics[name], max_chars) if len(p) >= min_chars]
        per_topic.append(
            [Document(f"topic:{name}:{i}", p, f"pydoc_data.topics[{name!r}]") for i, p in enumerate(pieces)]
        )
    docs: list[Document] = []
    depth = 0
    while any(depth < len(t) for t in per_topic):
        docs.extend(t[depth] for t in per_topic if depth < len(t))
        depth += 1
    return docs if n is None else docs[:n]


_EXCLUDE_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3", "ensurepip", "turtledemo", "tkinter", "idlelib", "pydoc_data"}


def stdlib_python_files() -> list[Path]:
    """All ``.py`` files of this interpreter's standard library (tests, IDLE, tkinter and
    site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).parts
        if any(part in _EXCLUDE_DIRS for part in rel[:-1]):
            continue
        out.append(p)
    return sorted(out)


def code_documents(
    n: int | None = None,
    *,
    min_chars: int = 6000,
    max_chars: int | None = None,
    seed: int = 0,
) -> list[Document]:
    """Python source files of the CPython standard library, shuffled by a hash of ``seed``.

    Files shorter than ``min_chars`` are skipped; with ``max_chars`` the text is cut at a line
    boundary to at most that many characters. Files that are not valid UTF-8 are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib_python_files() if p.stat().st_size >= min_chars]
    files.sort(key=lambda p: _stable_key(str(p.relative_to(root)), seed))
    docs: list[Document] = []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < min_chars:
            continue
        if max_chars is not None and len(text) > max_chars:
            cut = text.rfind("\n", 0, max_chars)
            text = text[: cut + 1 if cut > 0 else max_chars]
        rel = str(p.relative_to(root))
        docs.append(Document(f"stdlib:{rel}", text, str(p)))
        if n is not None and len(docs) >= n:
            break
    return docs
