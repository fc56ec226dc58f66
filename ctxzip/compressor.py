"""The text-compressor interface shared by every text method (prompt, code, retrieved docs).

A compressor is an object with ``compress(text, *, budget, query=None) -> CompressionResult``.
Token counts in the result use the tokenizer the caller names (default: the offline target LM's,
SmolLM2), so rates from different methods are comparable.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctxzip.budget import Budget

__all__ = ["CompressionResult", "TextCompressor", "ensure_text", "check_budget", "TokenCounter"]


@dataclass
class CompressionResult:
    """What a text compressor returns.

    Attributes:
        text: the compressed text.
        original_tokens: tokens of the input under the counting tokenizer.
        compressed_tokens: tokens of ``text`` under the same tokenizer.
        method: name of the compressor.
        kept: optional boolean keep-mask over the method's units (tokens, words, sentences...).
        details: method-specific extras (word labels, per-chunk choices, scores...).
        timings: seconds per stage.
    """

    text: str
    original_tokens: int
    compressed_tokens: int
    method: str = ""
    kept: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Compression ratio ``original / compressed`` (``inf`` when nothing is kept)."""
        if self.compressed_tokens == 0:
            return math.inf if self.original_tokens > 0 else 1.0
        return self.original_tokens / self.compressed_tokens

    @property
    def rate(self) -> float:
        """Achieved rate ``compressed / original`` (1.0 for an empty input)."""
        if self.original_tokens == 0:
            return 1.0
        return self.compressed_tokens / self.original_tokens

    def to_dict(self, *, with_details: bool = False) -> dict[str, Any]:
        """JSON-ready dict (``ratio`` is ``None`` when infinite)."""
        d: dict[str, Any] = {
            "text": self.text,
            "method": self.method,
            "original_tokens": self.original_tokens,
            "compressed_tokens": self.compressed_tokens,
            "rate": self.rate,
            "ratio": None if math.isinf(self.ratio) else self.ratio,
            "timings": dict(self.timings),
        }
        if with_details:
            d["details"] = _jsonable(self.details)
            if self.kept is not None:
                d["kept"] = np.asarray(self.kept).astype(int).tolist()
        return d


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def ensure_text(text: Any, *, name: str = "text") -> str:
    """Return ``text`` as ``str``; bytes must be valid UTF-8. Raises ``TypeError``/``ValueError``
    with a clear message otherwise."""
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{name} is not valid UTF-8 (byte {e.start}: {bytes(text)[e.start:e.start + 4]!r}); "
                f"decode it yourself, e.g. data.decode('latin-1')"
            ) from None
    raise TypeError(f"{name} must be str or UTF-8 bytes, got {type(text).__name__}")


def check_budget(budget: Any) -> Budget:
    """Accept a :class:`Budget`, or a float rate / int count for convenience."""
    if isinstance(budget, Budget):
        return budget
    if budget is None:
        raise ValueError("a budget is required: Budget(rate=...) or Budget(tokens=...)")
    return Budget.parse(budget)


class TokenCounter:
    """Counts tokens with a named tokenizer (default: the offline target LM's), lazily loaded."""

    def __init__(self, tokenizer: Any = None) -> None:
        self._tok = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tok is None or isinstance(self._tok, str):
            from ctxzip.models import load_tokenizer

            self._tok = load_tokenizer(self._tok)
        return self._tok

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def __getstate__(self) -> dict[str, Any]:  # picklable: ship the name, not the object
        tok = self._tok
        name = getattr(tok, "name_or_path", tok) if tok is not None else None
        return {"_tok": name}


class TextCompressor(ABC):
    """Base class: subclasses implement :meth:`_compress`; :meth:`compress` validates input,
    handles the empty/identity cases and fills in token counts and timings.

    Args:
        tokenizer: tokenizer (object, id or path) used to count tokens in results and to resolve
            token budgets; default: the offline target LM's tokenizer.
    """

    name: str = "compressor"

    def __init__(self, tokenizer: Any = None) -> None:
        self.counter = TokenCounter(tokenizer)

    def compress(
        self, text: Any, *, budget: Budget | float | int, query: str | None = None, **kwargs: Any
    ) -> CompressionResult:
        """Compress ``text`` to ``budget`` (counted in the counting tokenizer's tokens)."""
        text = ensure_text(text)
        if query is not None:
            query = ensure_text(query, name="query")
        budget = check_budget(budget)
        t0 = time.perf_counter()
        n = self.counter.count(text)
        if n == 0 or not text.strip():
            return CompressionResult(text, n, n, method=self.name, timings={"total": 0.0})
        if budget.is_identity(n):
            return CompressionResult(
                text, n, n, method=self.name, details={"identity": True},
                timings={"total": time.perf_counter() - t0},
            )
        res = self._compress(text, budget=budget, n_tokens=n, query=query, **kwargs)
        if not res.method:
            res.method = self.name
        res.original_tokens = n
        res.compressed_tokens = self.counter.count(res.text)
        res.timings.setdefault("total", time.perf_counter() - t0)
        return res

    @abstractmethod
    def _compress(
        self, text: str, *, budget: Budget, n_tokens: int, query: str | None, **kwargs: Any
    ) -> CompressionResult:
        """Compress non-empty ``text`` of ``n_tokens`` tokens to ``budget`` (not the identity)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
