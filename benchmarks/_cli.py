"""Small command-line helpers shared by the benchmark scripts."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def select_named(named: dict[str, T], only: str | None, what: str = "configs") -> dict[str, T]:
    """The entries of ``named`` listed in ``only`` (comma-separated, in that order), or all of
    them when ``only`` is empty; an unknown name exits with the list of valid ones."""
    if not only:
        return named
    want = [w.strip() for w in only.split(",") if w.strip()]
    bad = [w for w in want if w not in named]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(named)}")
    return {k: named[k] for k in want}
