"""Select a corpus subset under one global budget: score and persist, then filter.

Phase 1 (an engine, local or Ray): every shard gets a score file (resumable).
Phase 2 (this process): all scores are read back -- 8 bytes per document, never the texts --
and the budget is applied **exactly over the whole corpus**: keep a fraction or a number of
documents (``Budget``, via :func:`ctxzip.budget.topk_mask`, ties to the earlier document),
keep the best documents until a token budget is used, or keep scores above a threshold.
Phase 3: shards are read again and split into ``selected/`` (the original records + score) and
``rejected/`` (ids + scores); malformed records go to ``malformed.jsonl`` with their reason.
``summary.json`` states the counts, and ``selected + rejected + malformed == records`` is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ctxzip.budget import Budget, topk_mask
from ctxzip.datasel.engines import LocalEngine, RayEngine, Scorer, get_engine, score_path
from ctxzip.datasel.io import ShardSpec, TextLength, plan_shards, read_shard

__all__ = ["select", "SelectionSummary", "load_scores", "decide"]


@dataclass
class SelectionSummary:
    """Counts and settings of one selection run (also written to ``<out>/summary.json``)."""

    records: int
    selected: int
    rejected: int
    malformed: int
    malformed_reasons: dict[str, int]
    threshold: float | None
    budget: str
    selected_tokens: int | None
    total_tokens: int | None
    token_unit: str | None
    scorer: str
    engine: str
    shards: int
    shards_resumed: int
    seconds: dict[str, float] = field(default_factory=dict)
    out_dir: str = ""
    cascade: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fingerprint(scorer: Any) -> str:
    fp = getattr(scorer, "fingerprint", None)
    data = fp().encode() if callable(fp) else pickle.dumps(scorer)
    return hashlib.sha256(data).hexdigest()[:16]


def _plan_key(specs: list[ShardSpec]) -> str:
    h = hashlib.sha256()
    for s in specs:
        h.update(json.dumps(s.key(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def load_scores(out_dir: str, specs: list[ShardSpec], stage: str = "scores") -> dict[str, Any]:
    """Read every shard's score file: scores/tokens of valid records in corpus order,
    per-shard valid counts and the malformed records. Records a cascade's second stage
    skipped get a NaN score and ``scored[g] = False``."""
    scores: list[float] = []
    scored: list[bool] = []
    tokens: list[int] = []
    has_tokens = None
    per_shard: list[int] = []
    malformed: list[dict] = []
    for spec in specs:
        path = score_path(out_dir, spec.index, stage)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"score file missing for shard {spec.index}: {path}")
        n_valid = 0
        n = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec["pos"] != spec.start + n:
                    raise ValueError(f"{path}: record {n} has pos {rec['pos']}, expected "
                                     f"{spec.start + n} (stale scores? rerun with overwrite)")
                n += 1
                if "malformed" in rec:
                    malformed.append({"source": spec.source, "pos": rec["pos"], "id": rec["id"],
                                      "reason": rec["malformed"]})
                    continue
                n_valid += 1
                if rec.get("skipped"):
                    scores.append(float("nan"))
                    scored.append(False)
                    continue
                scores.append(rec["score"])
                scored.append(True)
                t = rec.get("tokens")
                if has_tokens is None:
                    has_tokens = t is not None
                if has_tokens:
                    if t is None:
                        raise ValueError(f"{path}: token counts missing (rerun with overwrite)")
                    tokens.append(t)
        if n != spec.size:
            raise ValueError(f"{path}: {n} records, shard has {spec.size} (rerun with overwrite)")
        per_shard.append(n_valid)
    return {
        "scores": np.asarray(scores, dtype=np.float64),
        "scored": np.asarray(scored, dtype=bool),
        "tokens": np.asarray(tokens, dtype=np.int64) if has_tokens else None,
        "per_shard": per_shard,
        "malformed": malformed,
    }


def decide(
    scores: np.ndarray,
    *,
    keep: Budget | str | float | int | None = None,
    keep_tokens: int | None = None,
    tokens: np.ndarray | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """Boolean mask of kept documents (exactly one of ``keep``, ``keep_tokens``, ``threshold``).

    ``keep``: a :class:`~ctxzip.budget.Budget` (``"10%"``, ``"0.1"``, ``"500"`` documents) --
    the top ``Budget.resolve(n)`` scores, ties to the earlier document.
    ``keep_tokens``: the best-scored documents, in score order, while their total ``tokens``
    stays within the budget (the first document that does not fit ends the selection, so the
    kept set is a score prefix, as in PreSelect's "top 10% of characters").
    ``threshold``: every document with ``score >= threshold``.
    """
    given = sum(x is not None for x in (keep, keep_tokens, threshold))
    if given != 1:
        raise ValueError("give exactly one of keep (fraction/count), keep_tokens, threshold")
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        return scores >= threshold
    if keep is not None:
        k = Budget.parse(keep).resolve(n)
        return topk_mask(scores, k) if n else np.zeros(0, dtype=bool)
    if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, (int, np.integer)) \
            or keep_tokens < 0:
        raise ValueError(f"keep_tokens must be a non-negative integer, got {keep_tokens!r}")
    if tokens is None or len(tokens) != n:
        raise ValueError("keep_tokens needs a token count per document")
    order = np.argsort(-scores, kind="stable")
    cum = np.cumsum(np.asarray(tokens, dtype=np.int64)[order])
    k = int(np.searchsorted(cum, int(keep_tokens), side="right"))
    return topk_mask(scores, k) if n else np.zeros(0, dtype=bool)


def _write_atomic_lines(path: str, lines: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
    os.replace(tmp, path)


def _run_race(race: Any, eng: Any, specs: list[ShardSpec], out: str, keep: Any,
              workers: int | None, text_field: str, id_field: str | None,
              lengths: TextLength | None, run_kw: dict) -> tuple:
    """ZIP-FIT fast mode inside :func:`select`: the race's prefilter streams over the shards
    (parallel, resumable); the best ``pool`` x k documents are raced in memory."""
    pf = race.prefilter_scorer()
    if pf is not None:
        results = eng.run(specs, pf, out, lengths=lengths, stage="prescores", **run_kw)
        loaded = load_scores(out, specs, "prescores")
    else:  # no prefilter: every document races; read lengths/malformed from a cheap pass
        from ctxzip.datasel.zipfit import ZipFit

        results = eng.run(specs, ZipFit(race._exact.targets[:1], codec="isal-0"), out,
                          lengths=lengths, stage="prescores", **run_kw)
        loaded = load_scores(out, specs, "prescores")
    n_valid = loaded["scores"].shape[0]
    k = Budget.parse(keep).resolve(n_valid)
    pool_n = n_valid if pf is None else min(n_valid, int(np.ceil(race.pool * k)))
    cand = decide(loaded["scores"], keep=pool_n) if pool_n < n_valid else \
        np.ones(n_valid, dtype=bool)
    idx = np.flatnonzero(cand)
    texts: list[str] = []
    g = 0
    for spec in specs:
        for rec in read_shard(spec, text_field, id_field):
            if rec.text is None:
                continue
            if cand[g]:
                texts.append(rec.text)
            g += 1
    from dataclasses import replace

    res = replace(race, prefilter=None).select(texts, max(1, k), workers=workers,
                                                progress=run_kw.get("progress", False))
    scores = loaded["scores"].copy()
    scores[idx] = res.scores
    mask = np.zeros(n_valid, dtype=bool)
    if k > 0:
        mask[idx[res.selected]] = True
    loaded = dict(loaded, scored=cand)
    cascade = {"prefilter": getattr(pf, "name", None) and str(race.prefilter),
               "race": True, "candidates": int(cand.sum()), "z": race.z,
               "exact_pairs": res.exact_pairs,
               "exact_pairs_fraction_of_exact_mode": res.exact_pairs / max(
                   1, n_valid * race.n_targets),
               "rounds": res.rounds}
    return results, scores, mask, loaded, loaded, cascade


def select(
    inputs: Any,
    scorer: Scorer,
    out_dir: str | os.PathLike,
    *,
    keep: Budget | str | float | int | None = None,
    keep_tokens: int | None = None,
    threshold: float | None = None,
    token_unit: str | None = None,
    engine: str | LocalEngine | RayEngine = "local",
    workers: int | None = None,
    address: str | None = None,
    shard_size: int = 10_000,
    batch_size: int = 256,
    text_field: str = "text",
    id_field: str | None = "id",
    score_field: str | None = None,
    prefilter: Scorer | None = None,
    margin: float = 3.0,
    overwrite: bool = False,
    write_rejected: bool = True,
    progress: bool = True,
) -> SelectionSummary:
    """Score ``inputs`` with ``scorer`` and write the selected subset to ``out_dir``.

    Args:
        inputs: JSONL/Parquet path(s), glob(s) or directory; a ``datasets.Dataset``; or a list
            of strings/dicts.
        scorer: e.g. :class:`~ctxzip.datasel.ZipFit`, :class:`~ctxzip.datasel.FastTextScorer`,
            :class:`~ctxzip.datasel.LossScorer` (higher score = more wanted).
        keep / keep_tokens / threshold: the budget (exactly one): a fraction or document count
            (``"10%"``, ``0.1``, ``"500"``), a token budget (counted in ``token_unit``), or a
            score threshold.
        token_unit: how ``keep_tokens`` counts (``"default"`` tokenizer, any tokenizer id/path,
            ``"chars"``, ``"bytes"``, ``"words"``); also records token counts when given alone.
        engine: ``"local"`` (process pool) or ``"ray"`` (Ray Data); ``address`` for a cluster.
        workers: processes / Ray actors (``None`` = all CPUs).
        shard_size: records per shard (the unit of work, resume and memory).
        text_field / id_field: record fields (ids default to ``"<file>:<line>"``).
        score_field: field added to selected records (default ``"<scorer.name>_score"``).
        prefilter: a cheap scorer run first on everything (e.g. ``ZipFit(codec="isal")``);
            only the best ``margin`` x budget documents by its score are then scored by
            ``scorer``, and the budget is applied to ``scorer``'s scores among them (a
            cascade: ``keep``/``keep_tokens`` only).
        margin: candidate pool size of the cascade, as a multiple of the budget (>= 1).
        overwrite: discard scores from an earlier run with different settings.
        write_rejected: also write ``rejected/`` (ids and scores of the rest).
    """
    t0 = time.perf_counter()
    given = sum(x is not None for x in (keep, keep_tokens, threshold))
    if given != 1:
        raise ValueError("give exactly one of keep (fraction/count), keep_tokens, threshold")
    budget_str = (str(Budget.parse(keep)) if keep is not None else
                  f"tokens<={keep_tokens}" if keep_tokens is not None else f"score>={threshold}")
    if keep_tokens is not None and token_unit is None:
        token_unit = "default"
    race = scorer if getattr(scorer, "name", None) == "zipfit_fast" else None
    if race is not None:
        if keep is None:
            raise ValueError("ZIP-FIT fast mode (ZipFitRace) selects a top-k: give keep "
                             "(a fraction or a document count)")
        if prefilter is not None:
            raise ValueError("ZipFitRace brings its own prefilter; do not pass prefilter=")
    if prefilter is not None:
        if threshold is not None:
            raise ValueError("a prefilter cascade needs keep or keep_tokens, not a threshold")
        if not (isinstance(margin, (int, float)) and np.isfinite(margin) and margin >= 1):
            raise ValueError(f"margin must be a number >= 1, got {margin!r}")
    lengths = TextLength(token_unit) if token_unit else None
    out = os.fspath(out_dir)
    eng = get_engine(engine, workers=workers, address=address)
    specs = list(plan_shards(inputs, shard_size))
    t_plan = time.perf_counter()
    manifest = {
        "version": 1,
        "scorer": getattr(scorer, "name", type(scorer).__name__),
        "scorer_fingerprint": _fingerprint(scorer),
        "plan": _plan_key(specs),
        "shards": len(specs),
        "shard_size": shard_size,
        "text_field": text_field,
        "id_field": id_field,
        "token_unit": token_unit,
        "prefilter": _fingerprint(prefilter) if prefilter is not None else None,
    }
    mpath = os.path.join(out, "manifest.json")
    if os.path.isfile(mpath):
        with open(mpath, encoding="utf-8") as f:
            old = json.load(f)
        if old != manifest:
            if not overwrite:
                diff = sorted(k for k in manifest if old.get(k) != manifest[k])
                raise ValueError(
                    f"{out} holds a run with other settings ({', '.join(diff)} differ); use a "
                    f"new output directory or overwrite=True (--overwrite)"
                )
            for sub in os.listdir(out):
                if sub.startswith(("scores", "prescores", "candidates", "selected", "rejected")):
                    shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(mpath, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)

    run_kw = dict(text_field=text_field, id_field=id_field, batch_size=batch_size,
                  progress=progress, total=sum(sp.size for sp in specs))
    pre = None
    cascade = None
    if race is not None:
        results, scores, mask, loaded, pre, cascade = _run_race(
            race, eng, specs, out, keep, workers, text_field, id_field, lengths, run_kw)
        toks = loaded["tokens"]
        t_score = time.perf_counter()
    elif prefilter is None:
        # phase 1: score (resumable)
        results = eng.run(specs, scorer, out, lengths=lengths, **run_kw)
        t_score = time.perf_counter()
        # phase 2: global decision
        loaded = load_scores(out, specs)
        scores, toks = loaded["scores"], loaded["tokens"]
        mask = decide(scores, keep=keep, keep_tokens=keep_tokens, tokens=toks,
                      threshold=threshold)
    else:
        # cascade, stage 1: the cheap scorer on everything
        results = eng.run(specs, prefilter, out, lengths=lengths, stage="prescores", **run_kw)
        pre = load_scores(out, specs, "prescores")
        toks = pre["tokens"]
        n_valid = pre["scores"].shape[0]
        if keep is not None:
            k = Budget.parse(keep).resolve(n_valid)
            cand = decide(pre["scores"], keep=min(n_valid, int(np.ceil(margin * k))))
        else:
            cand = decide(pre["scores"], keep_tokens=int(np.ceil(margin * keep_tokens)),
                          tokens=toks)
        stage = "scores-" + _write_candidates(out, specs, pre["per_shard"], cand)
        cascade = {"prefilter": getattr(prefilter, "name", type(prefilter).__name__),
                   "prefilter_fingerprint": manifest["prefilter"], "margin": margin,
                   "candidates": int(cand.sum())}
        # stage 2: the real scorer on the candidates only
        eng.run(specs, scorer, out, stage=stage,
                candidates=os.path.join(out, "candidates-" + stage[7:]), **run_kw)
        t_score = time.perf_counter()
        loaded = load_scores(out, specs, stage)
        final = np.where(loaded["scored"], loaded["scores"], -np.inf)
        if keep is not None:
            mask = decide(final, keep=k) & cand
        else:
            mask = decide(final, keep_tokens=keep_tokens, tokens=toks) & cand
        scores = np.where(loaded["scored"], loaded["scores"], pre["scores"])
    t_decide = time.perf_counter()

    # phase 3: write the split
    field_name = score_field or f"{manifest['scorer']}_score"
    for sub in ("selected", "rejected"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(os.path.join(out, "selected"), exist_ok=True)
    if write_rejected:
        os.makedirs(os.path.join(out, "rejected"), exist_ok=True)
    g = 0
    n_sel = n_rej = n_bad = n_rec = 0
    for spec in specs:
        sel_lines: list[str] = []
        rej_lines: list[str] = []
        for rec in read_shard(spec, text_field, id_field):
            n_rec += 1
            if rec.text is None:
                n_bad += 1
                continue
            if g >= scores.shape[0]:
                raise RuntimeError(f"{spec.source} has more valid records than were scored "
                                   "(input changed during the run?)")
            s = float(scores[g])
            keep_it = bool(mask[g])
            g += 1
            if keep_it:
                obj = dict(rec.raw) if isinstance(rec.raw, dict) else {text_field: rec.raw}
                if id_field and obj.get(id_field) is None:
                    obj[id_field] = rec.id
                obj[field_name] = s
                sel_lines.append(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
                n_sel += 1
            else:
                if write_rejected:
                    r: dict[str, Any] = {"id": rec.id, "score": s}
                    if pre is not None:
                        r["stage"] = "final" if loaded["scored"][g - 1] else "prefilter"
                    rej_lines.append(json.dumps(r) + "\n")
                n_rej += 1
        name = f"{spec.index:06d}.jsonl"
        _write_atomic_lines(os.path.join(out, "selected", name), sel_lines)
        if write_rejected:
            _write_atomic_lines(os.path.join(out, "rejected", name), rej_lines)
    _write_atomic_lines(os.path.join(out, "malformed.jsonl"),
                        (json.dumps(m, ensure_ascii=False) + "\n" for m in loaded["malformed"]))
    t_write = time.perf_counter()
    if g != scores.shape[0] or len(loaded["malformed"]) != n_bad or n_sel + n_rej + n_bad != n_rec or n_rec != sum(s.size for s in specs):
        raise RuntimeError(
            f"record accounting failed: {n_rec} records, {n_sel} selected, {n_rej} rejected, "
            f"{n_bad} malformed, {scores.shape[0]} scores (input changed during the run?)"
        )
    reasons = Counter(_reason_kind(m["reason"]) for m in loaded["malformed"])
    summary = SelectionSummary(
        records=n_rec, selected=n_sel, rejected=n_rej, malformed=n_bad,
        malformed_reasons=dict(sorted(reasons.items())),
        threshold=float(scores[mask].min()) if n_sel else None,
        budget=budget_str,
        selected_tokens=int(toks[mask].sum()) if toks is not None else None,
        total_tokens=int(toks.sum()) if toks is not None else None,
        token_unit=token_unit,
        scorer=manifest["scorer"],
        engine=type(eng).__name__,
        shards=len(specs),
        shards_resumed=sum(r.skipped for r in results),
        seconds={"plan": t_plan - t0, "score": t_score - t_plan, "decide": t_decide - t_score,
                 "write": t_write - t_decide, "total": t_write - t0},
        out_dir=out,
        cascade=cascade,
    )
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary.to_dict(), f, indent=1)
    return summary


def _write_candidates(out: str, specs: list[ShardSpec], per_shard: list[int],
                      cand: np.ndarray) -> str:
    """Write ``candidates-<hash>/<index>.json`` (record positions per shard); returns the hash
    (the second stage's folder is keyed on the candidate set, so resuming stays correct)."""
    lists = []
    g = 0
    for spec, n_valid in zip(specs, per_shard):
        lists.append((spec, cand[g:g + n_valid]))
        g += n_valid
    h = hashlib.sha256(np.packbits(cand).tobytes()).hexdigest()[:12]
    d = os.path.join(out, f"candidates-{h}")
    os.makedirs(d, exist_ok=True)
    for spec, m in lists:
        pos = _valid_positions(out, spec)
        with open(os.path.join(d, f"{spec.index:06d}.json"), "w", encoding="utf-8") as f:
            json.dump([p for p, keep in zip(pos, m) if keep], f)
    return h


def _valid_positions(out: str, spec: ShardSpec) -> list[int]:
    pos = []
    with open(score_path(out, spec.index, "prescores"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "malformed" not in rec:
                pos.append(rec["pos"])
    return pos


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary ("invalid JSON (Expecting ...)" -> "invalid JSON")."""
    return reason.split(" (")[0]
