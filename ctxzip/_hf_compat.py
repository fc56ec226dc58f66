"""The cache keyword across transformers 5 releases.

transformers 5.24 renamed the cache argument of every model, decoder layer and attention module
from ``past_key_values`` to ``cache`` (and the output field likewise); the old name is still
accepted on calls until 5.40, with a warning, but hooks that read the keyword arguments of a
decoder layer or an attention module see only the new name. ctxzip reads both and passes the
one the installed release expects, so it works on 5.0-5.23 and on 5.24 and later alike.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["CACHE_KW", "cache_from_kwargs", "cache_from_output", "with_cache"]


def _version(v: str) -> tuple[int, int]:
    parts = v.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):  # pragma: no cover - unusual version strings
        return (0, 0)


#: the keyword the installed transformers uses for the cache in ``forward`` calls
def _installed() -> str:
    try:
        return version("transformers")
    except PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        return "0.0"


#: the keyword the installed transformers uses for the cache in ``forward`` calls (read from the
#: package metadata, so importing this module does not import transformers)
CACHE_KW: str = "cache" if _version(_installed()) >= (5, 24) else "past_key_values"


def cache_from_kwargs(kwargs: dict) -> Any:
    """The cache passed to a forward call, under either name (``None`` when absent)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def cache_from_output(output: Any) -> Any:
    """The cache a model output carries (``output.cache`` from 5.24, ``past_key_values`` before)."""
    if CACHE_KW == "cache":
        return getattr(output, "cache", None)
    return getattr(output, "past_key_values", None)


def with_cache(cache: Any) -> dict[str, Any]:
    """``model(ids, **with_cache(cache))`` passes ``cache`` under the installed release's name."""
    return {CACHE_KW: cache}
