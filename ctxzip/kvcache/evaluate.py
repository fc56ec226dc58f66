"""Build presses by name and score them with the shared "context benefit retained" metric
(``ctxzip.eval``), used by ``ctxzip kv eval`` and ``benchmarks/kvcache_quality.py``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..budget import Budget
from .base import BasePress
from .cache import cache_nbytes, dense_cache_nbytes
from .combo import EvictThenQuantizePress
from .ems import EMSPress
from .gear import GEARPress
from .generate import prefill
from .h2o import H2OPress
from .knorm import KNormPress
from .lowrank import LowRankPress
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress

__all__ = ["PRESSES", "make_press", "evaluate_press"]


def _lowrank(budget: Budget, **kw: Any) -> LowRankPress:
    return LowRankPress(budget=budget, **kw)


#: name -> factory(budget, **kwargs)
PRESSES: dict[str, Callable[..., BasePress]] = {
    "streaming_llm": lambda b, **kw: StreamingLLMPress(budget=b, **kw),
    "snapkv": lambda b, **kw: SnapKVPress(budget=b, **kw),
    "snapkv_adaptive": lambda b, **kw: SnapKVPress(budget=b, head_budget="adaptive", **kw),
    "h2o": lambda b, **kw: H2OPress(budget=b, **kw),
    "knorm": lambda b, **kw: KNormPress(budget=b, **kw),
    "ems": lambda b, **kw: EMSPress(budget=b, **kw),
    "gear": lambda b, **kw: GEARPress(budget=b, **kw),
    "lowrank": _lowrank,
    "snapkv+gear": lambda b, **kw: EvictThenQuantizePress(
        evict=SnapKVPress(budget=b), quant=GEARPress(**kw)
    ),
}


def make_press(name: str, budget: Budget, **kwargs: Any) -> BasePress:
    """A press by its registry name (see :data:`PRESSES`)."""
    key = name.lower().replace("-", "_")
    if key == "streamingllm":
        key = "streaming_llm"
    if key not in PRESSES:
        raise ValueError(f"unknown press {name!r}; choose from {sorted(PRESSES)}")
    return PRESSES[key](budget, **kwargs)


def evaluate_press(
    evaluator: Any,
    cases: Sequence[Any],
    press: BasePress | None,
    *,
    targets: Sequence[str] = ("continuation", "recall"),
) -> dict[str, Any]:
    """Context benefit retained per target (pooled over ``cases``) for ``press`` (``None`` = no
    compression), the measured cache bytes relative to a bf16 cache of the same context, and the
    prefill time relative to no press."""
    from ..eval import pooled_benefit

    rows: dict[str, list[tuple[float, float, float]]] = {t: [] for t in targets}
    rel_bytes, prefill_s = [], []

    def make_cache(m: Any, ids: torch.Tensor) -> tuple[Any, int]:
        t0 = time.perf_counter()
        cache = prefill(m, ids, press)
        prefill_s.append(time.perf_counter() - t0)
        dense = dense_cache_nbytes(m, ids.shape[1], dtype=torch.bfloat16)
        rel_bytes.append(cache_nbytes(cache, float_bytes=2) / dense)
        return cache, ids.shape[1]

    for case in cases:
        base = evaluator.baseline(case, targets=targets)
        comp = evaluator.nll_from_cache(case, make_cache, targets=targets)
        for t in targets:
            rows[t].append((base["none"][t], base["full"][t], comp[t]))
    out: dict[str, Any] = {t: pooled_benefit(rows[t]) for t in targets}
    out["per_doc"] = {
        t: [(n - c) / (n - f) if abs(n - f) > 1e-12 else float("nan") for n, f, c in rows[t]]
        for t in targets
    }
    out["bytes_vs_bf16"] = float(sum(rel_bytes) / max(len(rel_bytes), 1))
    out["prefill_s"] = prefill_s
    return out
