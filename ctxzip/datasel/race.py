"""ZIP-FIT fast mode: the exact top-k by racing exact NCD over the targets.

ZIP-FIT (Obbad, Miranda et al., arXiv 2410.18194, Algorithm 1) keeps the top-k source documents
by ``align(x) = 1 − (1/n) Σ_j NCD(x, t_j)``. Exact mode pays one gzip-6 compression of
``x⊕t_j`` for every (document, target) pair. Measured on this repo's benchmark data (stdlib
code, ``benchmarks/zipfit_codecs.py``), no cheaper codec reproduces gzip-6's top-1,000: the
fastest ones (ISA-L 0, lz4, zlib-ng 1) keep only 35-60% of it, because the documents near the
cut differ by less than the codecs' disagreement on a pair. So fast mode keeps gzip-6 as ``C``
(NCD's definition and codec unchanged, every pair it computes is an exact pair) and instead
computes far fewer pairs, the way a top-k "race" (successive elimination) does:

1. **Prefilter.** A cheap codec (ISA-L level 0 by default, the fastest deflate measured here)
   scores every document against a few targets; only the best ``pool`` x k go on. Its job is
   recall, not ranking.
2. **Race.** Targets are visited in a fixed random order, so the mean of a document's exact
   similarities over the first ``j`` targets is an unbiased estimate of its alignment. After
   each step of ``schedule`` every document still racing gets ``m`` (its mean over the targets
   so far, minus the per-target mean of all racing documents: the paired comparison removes
   the targets' own difficulty) and a standard error ``se`` (finite-population corrected). With
   ``tau`` the score between the places still free and the rest, a document with
   ``m − z·se > tau`` is kept, one with ``m + z·se < tau`` is dropped, the others race on.
3. Documents still racing after the last target have exact scores; the free places go to the
   best of them.

``z`` trades speed for agreement with exact mode (the curve is in ``docs/datasel.md``). The
documents kept early or dropped have estimated scores (``stage`` says which); the ones that ran
the whole race have exactly the exact-mode score.
"""

from __future__ import annotations

import math
import os
import pickle
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctxzip.datasel.codecs import Codec
from ctxzip.datasel.zipfit import ZipFit

__all__ = ["ZipFitRace", "RaceResult"]

STAGE_PREFILTER, STAGE_PARTIAL, STAGE_EXACT = 0, 1, 2


@dataclass
class RaceResult:
    """What :meth:`ZipFitRace.select` returns.

    Attributes:
        selected: indices of the k selected documents, best first.
        scores: per document, the best estimate of its alignment available: the exact one for
            ``stage == 2``, the mean exact similarity over the targets it was raced on for
            ``stage == 1`` and the prefilter codec's mean similarity over the prefilter targets
            for ``stage == 0`` (another codec: not comparable with the others).
        stage: per document, 0 = stopped by the prefilter, 1 = decided during the race,
            2 = raced over every target (exact score).
        targets_used: per document, exact (document, target) pairs computed.
        exact_pairs: total exact pairs computed; ``prefilter_pairs``: cheap-codec pairs.
    """

    selected: np.ndarray
    scores: np.ndarray
    stage: np.ndarray
    targets_used: np.ndarray
    exact_pairs: int
    prefilter_pairs: int
    rounds: list[dict] = field(default_factory=list)

    @property
    def pairs_fraction(self) -> float:
        """Exact pairs computed / the N x n pairs of exact mode."""
        n = self.targets_used.shape[0]
        return self.exact_pairs / max(1, n * self._n_targets)

    _n_targets: int = 1


# ---------------------------------------------------------------------- pair similarities
def _pair_sims(scorer: ZipFit, xb: bytes, cx: int, cols: np.ndarray) -> np.ndarray:
    """``1 − NCD(x, t_j)`` for the targets ``cols`` (one compression of ``x⊕t_j`` each)."""
    tb = scorer._tb
    codec = scorer.codec
    assert isinstance(codec, Codec)
    if codec.name == "gzip":
        comp, lvl = zlib.compress, int(codec.level)  # type: ignore[arg-type]
        cxy = np.fromiter((len(comp(xb + tb[j], lvl, -15)) for j in cols), np.int64,
                          len(cols)) + 18
    else:
        length = codec.length
        cxy = np.fromiter((length(xb + tb[j]) for j in cols), np.int64, len(cols))
    ct = scorer._ct[cols]
    return 1 - (cxy - np.minimum(cx, ct)) / np.maximum(cx, ct)


def _sims_block(scorer: ZipFit, texts: Sequence[bytes], cx: Sequence[int],
                cols: np.ndarray) -> np.ndarray:
    out = np.empty((len(texts), len(cols)), dtype=np.float64)
    for i, (xb, c) in enumerate(zip(texts, cx)):
        out[i] = _pair_sims(scorer, xb, c, cols)
    return out


_STATE: dict[str, Any] = {}


def _init(payload: bytes) -> None:
    _STATE.clear()
    _STATE.update(pickle.loads(payload))


def _work(task: tuple[str, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(which scorer, document indices, target columns) -> (C(x) of the docs, sims block)."""
    which, idx, cols = task
    scorer: ZipFit = _STATE[which]
    texts = _STATE["texts"]
    xbs = [texts[i] for i in idx]
    length = scorer.codec.length  # type: ignore[union-attr]
    cx = np.array([length(x) for x in xbs], dtype=np.int64)
    return cx, _sims_block(scorer, xbs, cx, cols)


@dataclass
class ZipFitRace:
    """Fast top-k ZIP-FIT: the exact codec's NCD, raced over the targets (see module doc).

    Args:
        targets: the target examples (as for :class:`ZipFit`).
        codec: the codec whose top-k is wanted (default gzip-6, exact mode's).
        level: its level (``None`` = the codec default).
        prefilter: cheap codec for step 1 (default ISA-L level 0; ``None`` = no prefilter, the
            race starts on every document).
        prefilter_targets: targets the prefilter compares each document with.
        pool: documents passing the prefilter, as a multiple of k.
        schedule: fractions of the targets after which the race takes decisions (the last one
            must be 1.0).
        z: width of the keep/drop bounds in standard errors: higher = closer to exact mode,
            slower. 1.5 kept >= 90% of exact mode's top-1,000 on the benchmark data.
        seed: seed of the target order (results are deterministic given it).
    """

    targets: Sequence[str]
    codec: str | Codec = "gzip"
    level: int | None = None
    prefilter: str | Codec | None = "isal-0"
    prefilter_targets: int = 10
    pool: float = 4.0
    schedule: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
    z: float = 1.5
    seed: int = 0
    name: str = field(default="zipfit_fast", init=False)

    def __post_init__(self) -> None:
        self._exact = ZipFit(self.targets, codec=self.codec, level=self.level)
        self._pre = (ZipFit(self.targets, codec=self.prefilter)
                     if self.prefilter is not None else None)
        if not (isinstance(self.prefilter_targets, int) and self.prefilter_targets >= 1):
            raise ValueError(f"prefilter_targets must be an int >= 1, got {self.prefilter_targets!r}")
        if not (isinstance(self.pool, (int, float)) and math.isfinite(self.pool)
                and self.pool >= 1):
            raise ValueError(f"pool must be a number >= 1, got {self.pool!r}")
        sched = tuple(float(s) for s in self.schedule)
        if (not sched or sched[-1] != 1.0 or any(b <= a for a, b in zip(sched, sched[1:]))
                or sched[0] <= 0):
            raise ValueError(f"schedule must increase strictly in (0, 1] and end at 1.0, got "
                             f"{self.schedule!r}")
        if not (isinstance(self.z, (int, float)) and math.isfinite(self.z) and self.z >= 0):
            raise ValueError(f"z must be a number >= 0, got {self.z!r}")

    @property
    def n_targets(self) -> int:
        return self._exact.n_targets

    def target_order(self) -> np.ndarray:
        """The fixed random order in which the race visits the targets."""
        return np.random.default_rng(self.seed).permutation(self.n_targets)

    def prefilter_scorer(self) -> ZipFit | None:
        """Step 1 as a plain scorer (the prefilter codec on the first ``prefilter_targets``
        targets of the race order), so :func:`~ctxzip.datasel.select` can stream it over
        shards; ``None`` without a prefilter."""
        if self.prefilter is None:
            return None
        order = self.target_order()[: min(self.n_targets, self.prefilter_targets)]
        return ZipFit([self._exact.targets[i] for i in order], codec=self.prefilter)

    def fingerprint(self) -> str:
        return repr((self._exact.targets, str(self._exact.codec), str(self.prefilter),
                     self.prefilter_targets, self.pool, tuple(self.schedule), self.z,
                     self.seed))

    # ------------------------------------------------------------------------ engine
    def select(self, texts: Sequence[str], k: int, *, workers: int | None = 1,
               progress: bool = False, chunk_pairs: int = 4000,
               start_method: str | None = None) -> RaceResult:
        """The (approximate) top-``k`` of ``texts`` by exact-codec ZIP-FIT alignment.

        Args:
            texts: the source documents.
            k: how many to keep (``1 <= k``; ``k >= len(texts)`` keeps everything).
            workers: processes (1 = in this process; ``None``/``0`` = all CPUs).
            progress: show a progress bar per round.
            chunk_pairs: (document, target) pairs per task sent to a worker.
            start_method: multiprocessing start method; default ``fork`` where available
                (the workers only run zlib/ISA-L and numpy; a fork costs milliseconds where
                ``spawn`` re-imports numpy in each worker, ~1 s of a ~5 s run), else ``spawn``.
        """
        if isinstance(texts, str):
            raise ValueError("ZipFitRace.select takes a list of strings, not one string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"text {i} is not a string ({type(t).__name__})")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        n, T = len(texts), self.n_targets
        xbs = [t.encode("utf-8") for t in texts]
        scores = np.full(n, np.nan)
        stage = np.zeros(n, dtype=np.int8)
        used = np.zeros(n, dtype=np.int32)
        if k >= n:  # nothing to race for: score everything exactly
            k = n
        order = np.random.default_rng(self.seed).permutation(T)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or workers < 0):
            raise ValueError(f"workers must be an int >= 0 or None, got {workers!r}")
        if not workers:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else (os.cpu_count() or 1)
        if start_method is None:
            import multiprocessing as mp

            start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        runner = _Runner(self, xbs, workers, chunk_pairs, progress, start_method)
        try:
            return self._race(runner, n, T, k, order, scores, stage, used)
        finally:
            runner.close()

    def _race(self, runner: _Runner, n: int, T: int, k: int, order: np.ndarray,
              scores: np.ndarray, stage: np.ndarray, used: np.ndarray) -> RaceResult:
        rounds: list[dict] = []
        pre_pairs = 0
        active = np.arange(n)
        pool_n = min(n, math.ceil(self.pool * k))
        if self._pre is not None and pool_n < n:
            cols = order[: min(T, self.prefilter_targets)]
            _, sims = runner.run("pre", active, cols)
            pre_pairs = n * len(cols)
            scores[:] = sims.mean(axis=1)
            keep = np.sort(np.argsort(-scores, kind="stable")[:pool_n])
            active = keep
            rounds.append({"round": "prefilter", "docs": n, "targets": len(cols),
                           "kept": len(keep)})
        # exact sims of the racing documents, column by column in race order
        S = np.empty((n, T), dtype=np.float64)
        cx_exact = np.zeros(n, dtype=np.int64)
        accepted: list[int] = []
        done = 0
        stops = sorted({max(1, math.ceil(f * T)) for f in self.schedule})
        for j in stops:
            if len(active) == 0:
                break
            cols = order[done:j]
            cx, sims = runner.run("exact", active, cols)
            cx_exact[active] = cx
            S[np.ix_(active, cols)] = sims
            used[active] = j
            done = j
            stage[active] = STAGE_PARTIAL
            P = S[np.ix_(active, order[:j])]
            scores[active] = P.mean(axis=1)
            need = k - len(accepted)
            info = {"round": f"race@{j}", "docs": len(active), "targets": len(cols)}
            if j == T or need <= 0:
                rounds.append(info)
                break
            if j < 2:  # no spread to judge from yet
                rounds.append(info)
                continue
            R = P - P.mean(axis=0, keepdims=True)
            m = R.mean(axis=1)
            se = R.std(axis=1, ddof=1) / math.sqrt(j)
            se *= math.sqrt(max(0.0, 1 - j / T))
            if need < len(active):
                srt = np.sort(m)[::-1]
                tau = (srt[need - 1] + srt[need]) / 2
            else:
                tau = -np.inf
            acc = m - self.z * se > tau
            rej = m + self.z * se < tau
            # never accept more than the free places (ties of bounds): best first
            acc_idx = np.flatnonzero(acc)
            if len(acc_idx) > need:
                acc_idx = acc_idx[np.argsort(-m[acc_idx], kind="stable")[:need]]
                acc = np.zeros_like(acc)
                acc[acc_idx] = True
            accepted.extend(active[acc_idx[np.argsort(-m[acc_idx], kind="stable")]].tolist())
            info.update(accepted=int(acc.sum()), dropped=int(rej.sum()))
            rounds.append(info)
            active = active[~acc & ~rej]
            if len(active) <= k - len(accepted):
                accepted.extend(active[np.argsort(-scores[active], kind="stable")].tolist())
                active = active[:0]
                break
        full = used == T
        stage[full] = STAGE_EXACT
        need = k - len(accepted)
        if need > 0 and len(active):
            best = active[np.argsort(-scores[active], kind="stable")[:need]]
            accepted.extend(best.tolist())
        res = RaceResult(selected=np.asarray(accepted[:k], dtype=np.int64), scores=scores,
                         stage=stage, targets_used=used, exact_pairs=int(used.sum()),
                         prefilter_pairs=pre_pairs, rounds=rounds)
        res._n_targets = T
        return res


class _Runner:
    """Computes similarity blocks in this process or a persistent process pool."""

    def __init__(self, race: ZipFitRace, xbs: list[bytes], workers: int, chunk_pairs: int,
                 progress: bool, start_method: str) -> None:
        self.race, self.xbs, self.progress = race, xbs, progress
        self.chunk_pairs = max(1, int(chunk_pairs))
        self.workers = workers or 1
        self.ex: ProcessPoolExecutor | None = None
        if self.workers > 1:
            import multiprocessing as mp

            payload = pickle.dumps({"exact": race._exact, "pre": race._pre, "texts": xbs})
            self.ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(start_method),
                                          initializer=_init, initargs=(payload,))
        else:
            _init(pickle.dumps({"exact": race._exact, "pre": race._pre, "texts": xbs}))

    def run(self, which: str, idx: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from tqdm.auto import tqdm

        per = max(1, self.chunk_pairs // max(1, len(cols)))
        # at least 4 tasks per worker so no worker idles at the end of a round
        per = max(1, min(per, math.ceil(len(idx) / (4 * self.workers))))
        parts = [idx[a:a + per] for a in range(0, len(idx), per)]
        tasks = [(which, p, cols) for p in parts]
        cx = np.empty(len(idx), dtype=np.int64)
        sims = np.empty((len(idx), len(cols)), dtype=np.float64)
        bar = tqdm(total=len(idx), desc=f"zipfit race ({which}, {len(cols)} targets)",
                   unit="doc", disable=not self.progress)
        results = map(_work, tasks) if self.ex is None else self.ex.map(_work, tasks)
        a = 0
        for c, s in results:
            cx[a:a + len(c)] = c
            sims[a:a + len(c)] = s
            a += len(c)
            bar.update(len(c))
        bar.close()
        return cx, sims

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()
        _STATE.clear()
