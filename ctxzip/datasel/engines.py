"""Execution engines: score shards in a local process pool (default) or on Ray Data.

Phase 1 of a selection run (see :mod:`ctxzip.datasel.select`) turns every shard into a score
file ``<out>/scores/<index>.jsonl`` holding one line per input record:
``{"pos", "id", "score"[, "tokens"]}`` for valid records and ``{"pos", "id", "malformed"}`` for
the others. Files are written to a temporary name and renamed when complete, so a re-run skips
the shards already scored (resume) and never reads a half-written file.

Both engines run :func:`score_shard` on the same :class:`~ctxzip.datasel.io.ShardSpec` objects
with the same scorer, so their score files -- and therefore their selections -- are identical.
A scorer is any picklable object with ``score_texts(list[str]) -> numpy array`` that loads its
model lazily (datatrove's pattern), e.g. :class:`~ctxzip.datasel.zipfit.ZipFit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ctxzip.datasel.io import ShardSpec, TextLength, read_shard

__all__ = [
    "Scorer",
    "ShardResult",
    "LocalEngine",
    "RayEngine",
    "get_engine",
    "score_shard",
    "score_path",
    "map_scores",
]


class Scorer(Protocol):
    name: str

    def score_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class ShardResult:
    index: int
    records: int
    scored: int
    malformed: int
    seconds: float
    skipped: bool = False


def score_path(out_dir: str, index: int, stage: str = "scores") -> str:
    return os.path.join(out_dir, stage, f"{index:06d}.jsonl")


def _candidates(candidates: str | None, index: int) -> set[int] | None:
    if candidates is None:
        return None
    with open(os.path.join(candidates, f"{index:06d}.json"), encoding="utf-8") as f:
        return set(json.load(f))


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def score_shard(
    spec: ShardSpec,
    scorer: Scorer,
    out_dir: str,
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    lengths: TextLength | None = None,
    batch_size: int = 256,
    stage: str = "scores",
    candidates: str | None = None,
) -> ShardResult:
    """Score one shard and write its score file atomically. Memory: one batch of texts.

    ``stage`` names the score folder; with ``candidates`` (a folder of ``<index>.json`` lists
    of record positions) only those records are scored and the others are written as
    ``{"pos", "id", "skipped": true}`` (the second stage of a prefilter cascade)."""
    t0 = time.perf_counter()
    path = score_path(out_dir, spec.index, stage)
    only = _candidates(candidates, spec.index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    n = scored = bad = 0
    pending: list[tuple[int, str]] = []  # (pos, id) of valid records in the current batch
    texts: list[str] = []

    def flush(f: Any) -> None:
        nonlocal scored
        if not texts:
            return
        scores = np.asarray(scorer.score_texts(texts), dtype=np.float64).reshape(-1)
        if scores.shape[0] != len(texts):
            raise RuntimeError(
                f"scorer {type(scorer).__name__} returned {scores.shape[0]} scores "
                f"for {len(texts)} texts"
            )
        toks = lengths.count(texts) if lengths is not None else None
        for j, (pos, rid) in enumerate(pending):
            s = float(scores[j])
            if not math.isfinite(s):
                raise ValueError(f"scorer {scorer.name!r} gave a non-finite score ({s}) to "
                                 f"record {rid!r} of {spec.source}")
            rec: dict[str, Any] = {"pos": pos, "id": rid, "score": s}
            if toks is not None:
                rec["tokens"] = int(toks[j])
            f.write(json.dumps(rec) + "\n")
            scored += 1
        pending.clear()
        texts.clear()

    with open(tmp, "w", encoding="utf-8") as f:
        for rec in read_shard(spec, text_field, id_field):
            n += 1
            if rec.text is None:
                flush(f)  # keep file order == input order
                f.write(json.dumps({"pos": rec.pos, "id": rec.id, "malformed": rec.reason}) + "\n")
                bad += 1
                continue
            if only is not None and rec.pos not in only:
                flush(f)
                f.write(json.dumps({"pos": rec.pos, "id": rec.id, "skipped": True}) + "\n")
                continue
            pending.append((rec.pos, rec.id))
            texts.append(rec.text)
            if len(texts) >= batch_size:
                flush(f)
        flush(f)
    if n != spec.size:  # pragma: no cover - read_shard guarantees it
        os.unlink(tmp)
        raise RuntimeError(f"shard {spec.index}: read {n} records, expected {spec.size}")
    os.replace(tmp, path)
    return ShardResult(spec.index, n, scored, bad, time.perf_counter() - t0)


def _is_done(out_dir: str, spec: ShardSpec, stage: str = "scores") -> bool:
    return os.path.isfile(score_path(out_dir, spec.index, stage))


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=not enabled, smoothing=0.1)


@dataclass
class _ShardJob:
    """What every worker needs to score a shard: the scorer and :func:`score_shard`'s options."""

    scorer: Scorer
    out_dir: str
    text_field: str = "text"
    id_field: str | None = "id"
    lengths: TextLength | None = None
    batch_size: int = 256
    stage: str = "scores"
    candidates: str | None = None

    def score(self, spec: ShardSpec) -> ShardResult:
        return score_shard(spec, self.scorer, self.out_dir, text_field=self.text_field,
                           id_field=self.id_field, lengths=self.lengths,
                           batch_size=self.batch_size, stage=self.stage,
                           candidates=self.candidates)


class _Engine:
    """Shared driver: skip shards already scored (resume), keep the bar, sort the results.

    Subclasses implement :meth:`_score`, which scores the pending shards and appends one
    :class:`ShardResult` per shard to ``results``.
    """

    def run(
        self,
        specs: Iterable[ShardSpec],
        scorer: Scorer,
        out_dir: str,
        *,
        text_field: str = "text",
        id_field: str | None = "id",
        lengths: TextLength | None = None,
        batch_size: int = 256,
        progress: bool = True,
        total: int | None = None,
        stage: str = "scores",
        candidates: str | None = None,
    ) -> list[ShardResult]:
        """Score every shard of ``specs`` into ``out_dir`` (shards already there are skipped).

        ``text_field``/``id_field``/``lengths``/``batch_size``/``stage``/``candidates`` are
        passed to :func:`score_shard`; ``total`` sizes the progress bar (records).
        """
        job = _ShardJob(scorer, out_dir, text_field, id_field, lengths, batch_size, stage,
                        candidates)
        results: list[ShardResult] = []
        bar = _progress(total, f"scoring ({scorer.name}, {self._label()})", progress)

        def pending() -> Iterator[ShardSpec]:
            for spec in specs:
                if _is_done(out_dir, spec, stage):
                    results.append(ShardResult(spec.index, spec.size, 0, 0, 0.0, skipped=True))
                    bar.update(spec.size)
                else:
                    yield spec

        def done(r: ShardResult) -> None:
            results.append(r)
            bar.update(r.records)

        self._score(pending(), job, done)
        bar.close()
        return sorted(results, key=lambda r: r.index)

    def _label(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def _score(self, pending: Iterator[ShardSpec], job: _ShardJob,
               done: Callable[[ShardResult], None]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


# ------------------------------------------------------------------------------- local
_WORKER_STATE: dict[str, Any] = {}


def _init_worker(payload: bytes) -> None:
    _WORKER_STATE.update(pickle.loads(payload))


def _pool_score_shard(spec: ShardSpec) -> ShardResult:
    return _WORKER_STATE["job"].score(spec)


def _pool_score_texts(texts: list[str]) -> np.ndarray:
    return np.asarray(_WORKER_STATE["scorer"].score_texts(texts), dtype=np.float64)


@dataclass
class LocalEngine(_Engine):
    """Score shards in a local process pool.

    Args:
        workers: processes (``None``/``0`` = the CPUs this process may use; ``1`` = no pool,
            everything in this process).
        start_method: multiprocessing start method (``spawn`` is safe with torch/threads).
        max_in_flight: shards submitted ahead per worker (bounds memory for in-memory inputs).
    """

    workers: int | None = None
    start_method: str = "spawn"
    max_in_flight: int = 2

    def _label(self) -> str:
        return f"{self.workers or _default_workers()} proc"

    def _score(self, pending: Iterator[ShardSpec], job: _ShardJob,
               done: Callable[[ShardResult], None]) -> None:
        workers = self.workers or _default_workers()
        if workers == 1:
            for spec in pending:
                done(job.score(spec))
            return
        import multiprocessing as mp

        limit = max(1, self.max_in_flight) * workers
        payload = pickle.dumps({"job": job})
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(self.start_method),
                                 initializer=_init_worker, initargs=(payload,)) as ex:
            running: set = set()
            exhausted = False
            while True:
                while not exhausted and len(running) < limit:
                    spec = next(pending, None)
                    if spec is None:
                        exhausted = True
                        break
                    running.add(ex.submit(_pool_score_shard, spec))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(fut.result())


# --------------------------------------------------------------------------------- ray
class _RayShardWorker:
    """Ray Data actor: holds the scorer (model loaded once per actor) and scores shards."""

    def __init__(self, payload: bytes) -> None:
        self.job: _ShardJob = pickle.loads(payload)

    def __call__(self, row: dict) -> dict:
        r = self.job.score(pickle.loads(row["spec"]))
        return {"index": r.index, "records": r.records, "scored": r.scored,
                "malformed": r.malformed, "seconds": r.seconds}


@dataclass
class RayEngine(_Engine):
    """Score shards with Ray Data (an actor pool of ``workers`` scorers).

    Args:
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``); ``None`` starts a
            local Ray instance with ``num_cpus`` CPUs. Workers must be able to read the input
            paths and write ``out_dir`` (a shared filesystem on a real cluster).
        workers: scorer actors (``None`` = the cluster's CPUs).
        num_cpus: CPUs of the local Ray instance when ``address`` is None.
    """

    address: str | None = None
    workers: int | None = None
    num_cpus: int | None = None

    def _init(self) -> Any:
        try:
            import ray
        except ImportError:
            raise ImportError(
                "the Ray engine needs Ray Data: pip install 'ctxzip[ray]' (ray[data])"
            ) from None
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs["num_cpus"] = self.num_cpus or _default_workers()
                # local workers import ctxzip the same way this process does
                pp = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""),
                                                 _package_root()] if p)
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pp}}
            ray.init(**kwargs)
        return ray

    def _label(self) -> str:
        return "ray"

    def _score(self, pending: Iterator[ShardSpec], job: _ShardJob,
               done: Callable[[ShardResult], None]) -> None:
        items = [{"spec": pickle.dumps(spec)} for spec in pending]
        if not items:
            return
        ray = self._init()
        workers = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # workers may run elsewhere: give them absolute paths
        job = dataclasses.replace(
            job, out_dir=os.path.abspath(job.out_dir),
            candidates=os.path.abspath(job.candidates) if job.candidates else None)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(_RayShardWorker, fn_constructor_args=(pickle.dumps(job),),
                    concurrency=min(workers, len(items)), num_cpus=1)
        for row in ds.iter_rows():
            done(ShardResult(int(row["index"]), int(row["records"]), int(row["scored"]),
                             int(row["malformed"]), float(row["seconds"])))


def _package_root() -> str:
    import ctxzip

    return os.path.dirname(os.path.dirname(os.path.abspath(ctxzip.__file__)))


def get_engine(engine: str | LocalEngine | RayEngine = "local", *, workers: int | None = None,
               address: str | None = None) -> LocalEngine | RayEngine:
    """``"local"`` -> :class:`LocalEngine`, ``"ray"`` -> :class:`RayEngine`."""
    if isinstance(engine, (LocalEngine, RayEngine)):
        return engine
    if engine == "local":
        if address:
            raise ValueError("--address is for the ray engine")
        return LocalEngine(workers=workers)
    if engine == "ray":
        return RayEngine(address=address, workers=workers, num_cpus=workers if not address else None)
    raise ValueError(f"unknown engine {engine!r}: use 'local' or 'ray'")


# ----------------------------------------------------------------- in-memory convenience
def map_scores(scorer: Scorer, texts: list[str], *, workers: int | None = 1,
               progress: bool = False, chunk: int | None = None,
               start_method: str = "spawn") -> np.ndarray:
    """Score ``texts`` (in memory) with ``scorer`` in order, optionally in a process pool."""
    n = len(texts)
    workers = workers or _default_workers()
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if chunk is None:
        chunk = max(1, min(256, math.ceil(n / (workers * 8))))
    from tqdm.auto import tqdm

    out = np.empty(n, dtype=np.float64)
    bar = tqdm(total=n, desc=f"scoring ({scorer.name})", unit="doc", disable=not progress)
    if workers == 1 or n <= chunk:
        for a in range(0, n, chunk):
            out[a:a + chunk] = scorer.score_texts(texts[a:a + chunk])
            bar.update(min(chunk, n - a))
    else:
        import multiprocessing as mp

        payload = pickle.dumps({"scorer": scorer})
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(start_method),
                                 initializer=_init_worker, initargs=(payload,)) as ex:
            starts = list(range(0, n, chunk))
            for a, res in zip(starts, ex.map(_pool_score_texts,
                                              (texts[a:a + chunk] for a in starts))):
                out[a:a + len(res)] = res
                bar.update(len(res))
    bar.close()
    return out
