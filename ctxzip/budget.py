"""The token budget every ctxzip method shares, and the allocation/selection helpers.

A *unit* is whatever a method counts: tokenizer tokens, KV entries, visual tokens, corpus
documents. Every method is the same three steps - score units, allocate a budget over groups of
units, select - and this module holds the last two so no method keeps a private copy:

* :class:`Budget` - ``Budget(rate=...)`` (fraction of units kept) or ``Budget(tokens=...)``
  (absolute number kept); :meth:`Budget.resolve` turns it into a unit count.
* :func:`allocate` - split one integer budget over groups (functions of a file, documents of a
  retrieval, crops of an image, heads of a KV layer) from their sizes and scores, with floors and
  ceilings. ``method="longcodezip"`` is LongCodeZip's rule
  ``R_i = R_base * (1 + beta * (2 * s_norm_i - 1))``; ``"proportional"`` keeps the same rate in
  every group; ``"score"`` shares the budget in proportion to the scores.
* :func:`topk_mask` / :func:`topk_indices` - deterministic top-k over numpy arrays or torch
  tensors (ties go to the earlier unit).
* :func:`knapsack` - 0/1 knapsack: exact dynamic programming when ``n * capacity`` is small,
  greedy by value/weight otherwise.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["Budget", "allocate", "topk_mask", "topk_indices", "knapsack", "fill_until"]

_EPS = 1e-9


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class Budget:
    """How much of something to keep: a fraction (``rate``) or an absolute count (``tokens``).

    Exactly one of the two is given.

    Args:
        rate: fraction of units **kept**, ``0 < rate <= 1`` (``rate=0.25`` is 4x compression).
        tokens: number of units kept, an integer ``>= 0``. A count larger than the input keeps
            everything (the identity).

    ``Budget(rate=0.5).resolve(10) == 5``; ``Budget(tokens=3).resolve(10) == 3``.
    """

    rate: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.tokens is None):
            raise ValueError("Budget needs exactly one of rate=... or tokens=...")
        if self.rate is not None:
            if not _is_number(self.rate) or not math.isfinite(float(self.rate)):
                raise ValueError(f"Budget rate must be a finite number, got {self.rate!r}")
            if not 0.0 < float(self.rate) <= 1.0:
                raise ValueError(
                    f"Budget rate is the fraction of units kept and must satisfy 0 < rate <= 1, "
                    f"got {self.rate!r} (for a compression ratio of 4x use rate=0.25 or "
                    f"Budget.from_ratio(4))"
                )
            object.__setattr__(self, "rate", float(self.rate))
        else:
            t = self.tokens
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                if _is_number(t) and float(t).is_integer():
                    t = int(t)  # 3.0 -> 3
                else:
                    raise ValueError(f"Budget tokens must be a whole number, got {t!r}")
            if t < 0:
                raise ValueError(f"Budget tokens must be >= 0, got {t!r}")
            object.__setattr__(self, "tokens", int(t))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_ratio(cls, ratio: float) -> Budget:
        """Budget for a compression ratio ``original / compressed`` (``4`` -> ``rate=0.25``)."""
        if not _is_number(ratio) or not math.isfinite(float(ratio)) or float(ratio) < 1.0:
            raise ValueError(f"compression ratio must be a finite number >= 1, got {ratio!r}")
        return cls(rate=1.0 / float(ratio))

    @classmethod
    def parse(cls, spec: str | float | int | Budget) -> Budget:
        """Parse a command-line budget.

        ``"10%"`` -> rate 0.1; ``"0.25"`` -> rate 0.25; ``"4x"`` -> rate 0.25;
        ``"500"`` -> 500 units. A bare number ``<= 1`` with a decimal point is a rate.
        """
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, bool):
            raise ValueError(f"cannot parse a budget from {spec!r}")
        if isinstance(spec, numbers.Integral):
            return cls(tokens=int(spec))
        if _is_number(spec):
            return cls(rate=float(spec))
        if not isinstance(spec, str):
            raise ValueError(f"cannot parse a budget from {spec!r}")
        s = spec.strip().lower()
        try:
            if s.endswith("%"):
                return cls(rate=float(s[:-1]) / 100.0)
            if s.endswith("x"):
                return cls.from_ratio(float(s[:-1]))
            if re.fullmatch(r"[+-]?\d+", s):
                return cls(tokens=int(s))
            return cls(rate=float(s))
        except ValueError as e:
            raise ValueError(
                f"cannot parse budget {spec!r}: use a percentage ('10%'), a rate ('0.25'), "
                f"a ratio ('4x') or a unit count ('500') ({e})"
            ) from None

    # ------------------------------------------------------------------ use
    def resolve(self, n: int) -> int:
        """Number of units to keep out of ``n``: ``floor(rate * n)`` or ``min(tokens, n)``.

        The result never exceeds ``n`` (a budget larger than the input is the identity).
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"unit count must be a non-negative integer, got {n!r}")
        n = int(n)
        if self.tokens is not None:
            return min(self.tokens, n)
        assert self.rate is not None
        return min(n, int(math.floor(self.rate * n + _EPS)))

    def is_identity(self, n: int) -> bool:
        """True when this budget keeps all ``n`` units."""
        return self.resolve(n) >= n

    def __str__(self) -> str:
        return f"rate={self.rate:g}" if self.rate is not None else f"tokens={self.tokens}"


# ---------------------------------------------------------------------- allocation
def _as_float_array(x: Any, n: int, name: str, default: float) -> np.ndarray:
    if x is None:
        return np.full(n, default, dtype=np.float64)
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.shape[0] == 1 and n != 1:
        a = np.full(n, a[0], dtype=np.float64)
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries for {n} groups")
    return a


def _waterfill(total: float, weights: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Real-valued ``x_i = clip(lam * w_i, lo_i, hi_i)`` with ``sum(x) = total`` (lo <= total <= hi)."""
    if total <= lo.sum() + _EPS:
        return lo.copy()
    if total >= hi.sum() - _EPS:
        return hi.copy()
    w = np.maximum(weights, 0.0)
    if not np.any(w > 0):
        w = np.ones_like(w)
    # f(lam) = sum clip(lam*w, lo, hi) is continuous and non-decreasing: bisection.
    pos = w > 0
    lam_hi = float(np.max(hi[pos] / w[pos])) if np.any(pos) else 1.0
    lam_lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        s = np.clip(mid * w, lo, hi).sum()
        if s < total:
            lam_lo = mid
        else:
            lam_hi = mid
        if lam_hi - lam_lo <= 1e-12 * max(1.0, lam_hi):
            break
    x = np.clip(lam_hi * w, lo, hi)
    # groups with zero weight only take budget when everything else is full
    rest = total - x.sum()
    if rest > _EPS:
        room = hi - x
        x = x + room * (rest / room.sum())
    return x


def _integerize(x: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Round ``x`` to integers within [lo, hi] summing to ``total`` (largest remainder, ties to
    the earlier group)."""
    base = np.clip(np.floor(x + _EPS), lo, hi).astype(np.int64)
    short = int(total - base.sum())
    if short > 0:
        frac = x - base
        room = hi - base
        order = np.lexsort((np.arange(len(x)), -frac))  # by remainder desc, then index
        for i in order:
            if short == 0:
                break
            if room[i] > 0:
                add = min(int(room[i]), short, 1)
                base[i] += add
                short -= add
        if short > 0:  # still short (all remainders consumed): fill any room left, in order
            for i in order:
                take = min(int(hi[i] - base[i]), short)
                base[i] += take
                short -= take
                if short == 0:
                    break
    elif short < 0:
        frac = x - base
        order = np.lexsort((-np.arange(len(x)), frac))
        for i in order:
            if short == 0:
                break
            give = min(int(base[i] - lo[i]), -short)
            base[i] -= give
            short += give
    return base


def allocate(
    total: int,
    sizes: Any,
    scores: Any = None,
    *,
    method: Literal["proportional", "longcodezip", "score"] = "proportional",
    beta: float = 0.5,
    floors: Any = None,
    ceilings: Any = None,
) -> np.ndarray:
    """Split an integer budget of ``total`` units over groups.

    Args:
        total: units to hand out over all groups (e.g. ``Budget.resolve(sum(sizes))``).
        sizes: units in each group; a group never gets more than its size.
        scores: one importance score per group (used by ``"longcodezip"`` and ``"score"``).
        method:
            ``"proportional"`` - the same keep rate in every group (weights = sizes);
            ``"longcodezip"`` - LongCodeZip (Shi et al., 2025) adaptive rate
            ``R_i = R_base * (1 + beta * (2 * s_norm_i - 1))`` with ``s_norm`` the min-max
            normalised scores and ``R_base = total / sum(sizes)``, clamped to ``[0, 1]`` and then
            rescaled so the allocation hits ``total``;
            ``"score"`` - budget in proportion to (non-negative) scores.
        beta: LongCodeZip's importance sensitivity (paper default 0.5).
        floors: minimum units per group (scalar or per group); clipped to the group's size.
        ceilings: maximum units per group (scalar or per group).

    Returns:
        int64 array, one allocation per group, each within ``[floor_i, min(ceiling_i, size_i)]``.
        The sum is ``total`` when that is feasible; when the floors alone exceed ``total`` the
        floors are returned (the caller asked for them), and when ``total`` exceeds the room the
        ceilings are returned. Deterministic.
    """
    if isinstance(total, bool) or not _is_number(total) or total < 0 or not math.isfinite(total):
        raise ValueError(f"total must be a non-negative number, got {total!r}")
    total = int(total)
    size = np.asarray(sizes, dtype=np.float64).reshape(-1)
    n = size.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if np.any(~np.isfinite(size)) or np.any(size < 0):
        raise ValueError("group sizes must be finite and non-negative")
    size = np.floor(size)
    hi = np.minimum(_as_float_array(ceilings, n, "ceilings", np.inf), size)
    lo = np.minimum(np.maximum(_as_float_array(floors, n, "floors", 0.0), 0.0), hi)
    lo, hi = np.floor(lo), np.floor(hi)

    if method == "proportional":
        weights = size.copy()
    elif method in ("longcodezip", "score"):
        if scores is None:
            raise ValueError(f"method={method!r} needs scores")
        s = _as_float_array(scores, n, "scores", 0.0)
        if np.any(~np.isfinite(s)):
            raise ValueError("scores must be finite")
        if method == "score":
            weights = np.maximum(s, 0.0)
        else:
            if not beta >= 0.0 or not math.isfinite(beta):
                raise ValueError(f"beta must be >= 0, got {beta!r}")
            span = s.max() - s.min()
            s_norm = (s - s.min()) / span if span > 0 else np.full(n, 0.5)
            r_base = total / max(size.sum(), 1.0)
            rates = np.clip(r_base * (1.0 + beta * (2.0 * s_norm - 1.0)), 0.0, 1.0)
            weights = rates * size
    else:
        raise ValueError(f"unknown allocation method {method!r}")

    if total <= lo.sum():
        return lo.astype(np.int64)
    if total >= hi.sum():
        return hi.astype(np.int64)
    x = _waterfill(float(total), weights, lo, hi)
    return _integerize(x, total, lo, hi)


# ---------------------------------------------------------------------- selection
def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def topk_indices(scores: Any, k: int, *, dim: int = -1, sort_by_position: bool = True) -> Any:
    """Indices of the ``k`` highest scores along ``dim``; ties go to the earlier position.

    Works on numpy arrays and torch tensors (returns the same kind). With
    ``sort_by_position=True`` the indices come back in increasing position order, ready for a
    gather that keeps the original order of the kept units.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if _is_torch(scores):
        import torch

        n = scores.shape[dim]
        k = min(int(k), n)
        order = torch.argsort(scores, dim=dim, descending=True, stable=True)
        idx = order.narrow(dim, 0, k)
        if sort_by_position:
            idx = torch.sort(idx, dim=dim).values
        return idx
    a = np.asarray(scores)
    n = a.shape[dim]
    k = min(int(k), n)
    # stable descending: argsort of -a with kind="stable" keeps earlier index first on ties
    order = np.argsort(-a, axis=dim, kind="stable")
    idx = np.take(order, np.arange(k), axis=dim)
    if sort_by_position:
        idx = np.sort(idx, axis=dim)
    return idx


def topk_mask(scores: Any, k: int, *, dim: int = -1, force_keep: Any = None) -> Any:
    """Boolean keep-mask with the ``k`` highest scores along ``dim`` set (ties: earlier first).

    ``force_keep``: boolean mask of units that must be kept; they count toward ``k`` (if more
    units are forced than ``k`` allows, all forced units are kept and nothing else).
    """
    if _is_torch(scores):
        import torch

        s = scores.float()
        if force_keep is not None:
            s = torch.where(force_keep, torch.full_like(s, float("inf")), s)
        idx = topk_indices(s, k, dim=dim, sort_by_position=False)
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        mask.scatter_(dim, idx, True)
        if force_keep is not None:
            mask |= force_keep
        return mask
    s = np.asarray(scores, dtype=np.float64)
    if force_keep is not None:
        fk = np.asarray(force_keep, dtype=bool)
        s = np.where(fk, np.inf, s)
    idx = topk_indices(s, k, dim=dim, sort_by_position=False)
    mask = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=dim)
    if force_keep is not None:
        mask |= fk
    return mask


def knapsack(
    values: Any,
    weights: Any,
    capacity: int,
    *,
    force: Any = None,
    exact_limit: int = 2_000_000,
) -> np.ndarray:
    """0/1 knapsack: choose items maximising total value with total weight <= ``capacity``.

    Args:
        values: value of each item (items with value <= 0 are never chosen unless forced).
        weights: non-negative integer weight of each item.
        capacity: maximum total weight (integer >= 0).
        force: boolean mask of items that must be chosen; their weight is taken first. If the
            forced items alone exceed the capacity they are still all chosen (the caller's
            constraint wins) and nothing else is added.
        exact_limit: run the exact O(n * capacity) dynamic program when
            ``n * capacity <= exact_limit``; otherwise greedy by value/weight (ties by index),
            compared against the best single item that fits (the classic 1/2-approximation).

    Returns:
        boolean mask of chosen items. Deterministic.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.asarray(weights).reshape(-1)
    if v.shape != w.shape:
        raise ValueError(f"values and weights differ in length ({v.shape[0]} vs {w.shape[0]})")
    if np.any(~np.isfinite(v)):
        raise ValueError("knapsack values must be finite")
    if w.size and (np.any(w < 0) or not np.all(np.equal(np.mod(w, 1), 0))):
        raise ValueError("knapsack weights must be non-negative integers")
    w = w.astype(np.int64)
    if isinstance(capacity, bool) or not _is_number(capacity) or capacity < 0:
        raise ValueError(f"capacity must be a non-negative integer, got {capacity!r}")
    cap = int(capacity)
    n = v.shape[0]
    chosen = np.zeros(n, dtype=bool)
    if n == 0:
        return chosen
    if force is not None:
        f = np.asarray(force, dtype=bool).reshape(-1)
        if f.shape[0] != n:
            raise ValueError("force mask has the wrong length")
        chosen |= f
        cap -= int(w[f].sum())
        if cap < 0:
            return chosen
    cand = np.flatnonzero(~chosen & (v > 0) & (w <= cap))
    if cand.size == 0:
        return chosen
    # zero-weight items with positive value are free
    free = cand[w[cand] == 0]
    chosen[free] = True
    cand = cand[w[cand] > 0]
    if cand.size == 0 or cap == 0:
        return chosen
    if int(w[cand].sum()) <= cap:
        chosen[cand] = True
        return chosen
    if cand.size * cap <= exact_limit:
        chosen[cand[_knapsack_dp(v[cand], w[cand], cap)]] = True
        return chosen
    # greedy by density, ties by index; then compare with the best single item
    dens = v[cand] / w[cand]
    order = np.lexsort((cand, -dens))
    take = np.zeros(cand.size, dtype=bool)
    used = 0
    for j in order:
        if used + w[cand[j]] <= cap:
            take[j] = True
            used += int(w[cand[j]])
    best = int(np.argmax(v[cand]))
    if v[cand][best] > v[cand][take].sum():
        take[:] = False
        take[best] = True
    chosen[cand[take]] = True
    return chosen


def _knapsack_dp(v: np.ndarray, w: np.ndarray, cap: int) -> np.ndarray:
    """Exact 0/1 knapsack by DP over capacities, vectorised per item; returns a boolean mask."""
    n = v.shape[0]
    best = np.zeros(cap + 1, dtype=np.float64)
    took = np.zeros((n, cap + 1), dtype=bool)
    for i in range(n):
        wi = int(w[i])
        cand = best[: cap + 1 - wi] + v[i]
        better = cand > best[wi:] + 1e-12
        took[i, wi:] = better
        best[wi:] = np.where(better, cand, best[wi:])
    mask = np.zeros(n, dtype=bool)
    c = cap
    for i in range(n - 1, -1, -1):
        if took[i, c]:
            mask[i] = True
            c -= int(w[i])
    return mask


def fill_until(scores: Any, sizes: Any, cap: float) -> np.ndarray:
    """Best-first selection that stops once ``cap`` is crossed: items in decreasing ``scores``
    (stable order) are kept while the running size stays ``<= cap``, and the item that crosses
    ``cap`` is kept too (LLMLingua's sentence-level budget controller). Items of size ``<= 0``
    are skipped. Returns a boolean keep mask."""
    scores = np.asarray(scores, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    if scores.shape != sizes.shape or scores.ndim != 1:
        raise ValueError("scores and sizes must be 1-D arrays of the same length")
    keep = np.zeros(len(scores), dtype=bool)
    left = float(cap)
    for i in np.argsort(-scores, kind="stable"):
        if sizes[i] <= 0:
            continue
        keep[i] = True
        left -= sizes[i]
        if left < 0:
            break
    return keep
