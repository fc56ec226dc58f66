"""PreSelect: data selection by predictive strength (arXiv 2503.00808; hkust-nlp/PreSelect).

A document is "predictive" when the models that compress it better (lower bits per character)
are also the models that score better on the benchmarks. For models ``m`` with benchmark scores
``s_m`` and document losses ``c_m`` (code ``data_processing/fasttext/train_fasttext.py``):

    S(doc) = (1/Z) · Σ_{i<j} 1[(s_i > s_j ∧ c_i < c_j) ∨ (s_i < s_j ∧ c_i > c_j)]

with ``Z`` the number of pairs whose benchmark scores differ (so ``S ∈ [0, 1]``; the reference
uses 6 LLaMA models and keeps the raw count, max 15). Documents with a perfect order (``S = 1``)
are positives, the same number of the lowest-``S`` documents are negatives, and a fastText
classifier (``epoch=3, lr=0.1, wordNgrams=2``, otherwise fastText defaults) learns to tell them
apart; it then scores the whole pool cheaply, and the pool is filtered by ``P(label 1)``.

Deviations from the reference, on purpose (see PAPERS.md §6):
- BPC is computed per document (never across document boundaries), see :mod:`.bpc`.
- Newlines become spaces both when training and when scoring (the reference trains with
  spaces but filters with datatrove's default ``newline_replacement=""``).
- The filtering threshold comes from the global budget over the whole corpus
  (:func:`ctxzip.datasel.select`), not from 3 files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctxzip.datasel.bpc import document_bpc, load_ladder_model

__all__ = [
    "LadderModel",
    "PreSelect",
    "FastTextScorer",
    "predictive_strength",
    "balanced_labels",
    "train_fasttext",
]


def predictive_strength(losses: Any, benchmark: Any) -> np.ndarray:
    """Normalised rank concordance ``S ∈ [0, 1]`` per document.

    Args:
        losses: ``[n_docs, n_models]`` document losses (BPC or total NLL; lower = better).
        benchmark: ``[n_models]`` benchmark scores (higher = better).

    Pairs of models with equal benchmark scores are not counted (``Z`` excludes them); a pair
    with equal losses on a document counts as discordant (0), as in the reference.
    """
    c = np.asarray(losses, dtype=np.float64)
    s = np.asarray(benchmark, dtype=np.float64).reshape(-1)
    if c.ndim != 2 or c.shape[1] != s.shape[0]:
        raise ValueError(f"losses must be [n_docs, {s.shape[0]}], got shape {c.shape}")
    if s.shape[0] < 2:
        raise ValueError("predictive strength needs at least 2 models")
    if not np.all(np.isfinite(s)) or not np.all(np.isfinite(c)):
        raise ValueError("losses and benchmark scores must be finite")
    i, j = np.triu_indices(s.shape[0], k=1)
    ds = np.sign(s[i] - s[j])  # +1: model i is better on the benchmark
    keep = ds != 0
    z = int(keep.sum())
    if z == 0:
        raise ValueError("all benchmark scores are equal: no model pair can be ordered")
    dc = np.sign(c[:, j[keep]] - c[:, i[keep]])  # +1: model i has the lower loss
    return (dc == ds[keep]).sum(axis=1) / z


def balanced_labels(
    strength: Any, *, positive_min: float = 1.0, max_per_class: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of positives (``S >= positive_min``, PreSelect: perfect order) and of as many
    negatives, taken from the lowest ``S`` upward (ties: earlier document first)."""
    s = np.asarray(strength, dtype=np.float64).reshape(-1)
    pos = np.flatnonzero(s >= positive_min - 1e-12)
    if max_per_class is not None:
        pos = pos[:max_per_class]
    if pos.size == 0:
        raise ValueError(
            f"no document reaches predictive strength {positive_min} (max is "
            f"{s.max() if s.size else float('nan'):.3f}); score more documents or lower "
            "positive_min"
        )
    rest = np.flatnonzero(s < positive_min - 1e-12)
    order = rest[np.argsort(s[rest], kind="stable")]
    neg = order[: pos.size]
    if neg.size < pos.size:
        pos = pos[: neg.size]
    if pos.size == 0:
        raise ValueError("every document is a positive: no negatives to train against")
    return pos, neg


def _clean(text: str, newline: str = " ") -> str:
    return text.replace("\r", " ").replace("\n", newline)


def train_fasttext(
    texts: Sequence[str],
    labels: Sequence[int],
    path: str | os.PathLike,
    *,
    epoch: int = 3,
    lr: float = 0.1,
    word_ngrams: int = 2,
    threads: int = 1,
    seed: int = 0,
    **kwargs: Any,
) -> FastTextScorer:
    """Train PreSelect's fastText classifier (``__label__1`` = predictive) and save it.

    ``epoch``, ``lr``, ``word_ngrams`` are the reference's settings; other fastText parameters
    keep fastText's defaults unless passed in ``kwargs``. ``threads=1`` makes training
    deterministic (fastText's multi-threaded SGD is not).
    """
    ft = _fasttext()
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if len(set(int(x) for x in labels)) < 2:
        raise ValueError("fastText training needs both labels (0 and 1)")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        train_file = f.name
        for t, y in zip(texts, labels):
            f.write(f"__label__{int(y)} {_clean(t)}\n")
    try:
        model = ft.train_supervised(input=train_file, epoch=epoch, lr=lr, wordNgrams=word_ngrams,
                                    thread=threads, seed=seed, verbose=0, **kwargs)
    finally:
        os.unlink(train_file)
    model.save_model(path)
    return FastTextScorer(path)


def _fasttext() -> Any:
    try:
        import fasttext
    except ImportError:
        raise ImportError(
            "PreSelect's classifier needs fastText: pip install fasttext-numpy2 "
            "(or 'ctxzip[datasel]'; the plain 'fasttext' 0.9.3 wheel breaks under numpy 2)"
        ) from None
    return fasttext


@dataclass
class FastTextScorer:
    """Score documents with a fastText classifier: ``P(label)`` (PreSelect: ``__label__1``).

    Works with a classifier trained by :func:`train_fasttext` / :meth:`PreSelect.fit` or a
    released PreSelect ``.bin``.

    Args:
        path: the fastText ``.bin`` model.
        label: the label whose probability is the score.
        newline: what newlines become before scoring (must match training: a space).
    """

    path: str
    label: str = "__label__1"
    newline: str = " "
    name: str = field(default="preselect", init=False)

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"fastText model not found: {self.path}")
        self._model: Any = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "label": self.label, "newline": self.newline}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.name = "preselect"
        self._model = None

    def fingerprint(self) -> str:
        st = os.stat(self.path)
        return f"fasttext|{os.path.abspath(self.path)}|{st.st_size}|{st.st_mtime_ns}|{self.label}"

    def _load(self) -> Any:
        if self._model is None:
            self._model = _fasttext().load_model(self.path)
            if self.label not in self._model.get_labels():
                raise ValueError(f"{self.path} has labels {self._model.get_labels()}, "
                                 f"not {self.label!r}")
        return self._model

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        k = len(model.get_labels())
        labels, probs = model.predict([_clean(t, self.newline) for t in texts], k=k)
        out = np.empty(len(texts), dtype=np.float64)
        for i, (ls, ps) in enumerate(zip(labels, probs)):
            d = dict(zip(ls, ps))
            out[i] = float(d.get(self.label, 0.0))
        return np.clip(out, 0.0, 1.0)  # fastText's softmax can exceed 1 by ~1e-5


@dataclass
class LadderModel:
    """One rung of PreSelect's model ladder.

    Args:
        spec: model spec for :func:`~ctxzip.datasel.bpc.load_ladder_model` (``"smollm2"``,
            ``"gemma3-270m"``, ``"smollm2@layers=20"``, an HF id or path).
        benchmark: the model's benchmark score (higher = better); ``None`` = measure it with
            :meth:`PreSelect.measure_benchmarks` on held-out task text.
    """

    spec: str
    benchmark: float | None = None


@dataclass
class PreSelect:
    """PreSelect pipeline: BPC under a model ladder -> predictive strength -> balanced labels ->
    fastText classifier.

    Args:
        ladder: the models (at least 2; the paper uses 6 LLaMA models of 7B-65B with their
            average benchmark scores). Benchmarks may be given or measured.
        window / stride: sliding window inside each document (reference: 1900 / 512).
        batch_tokens: padded tokens per forward pass.
        positive_min: predictive strength a positive needs (1.0 = perfect order, as the paper).
        epoch / lr / word_ngrams: fastText training (reference: 3 / 0.1 / 2).
        device: torch device for the LMs.
    """

    ladder: list[LadderModel]
    window: int = 1900
    stride: int = 512
    batch_tokens: int = 4096
    positive_min: float = 1.0
    epoch: int = 3
    lr: float = 0.1
    word_ngrams: int = 2
    device: str | None = None

    def __post_init__(self) -> None:
        self.ladder = [m if isinstance(m, LadderModel) else LadderModel(str(m))
                       for m in self.ladder]
        if len(self.ladder) < 2:
            raise ValueError("PreSelect needs a ladder of at least 2 models")

    def losses(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """``[n_docs, n_models]`` bits per character of every document under every model."""
        from tqdm.auto import tqdm

        out = np.empty((len(texts), len(self.ladder)), dtype=np.float64)
        for m, rung in enumerate(tqdm(self.ladder, desc="BPC per model", disable=not progress)):
            model, tok = load_ladder_model(rung.spec, device=self.device)
            out[:, m] = document_bpc(model, tok, texts, window=self.window, stride=self.stride,
                                     batch_tokens=self.batch_tokens)
        return out

    def measure_benchmarks(self, task_texts: Sequence[str], *, progress: bool = True
                           ) -> np.ndarray:
        """Benchmark score of each rung measured as ``−BPC`` on held-out task text
        (character-weighted mean), stored into the ladder and returned."""
        bpc = self.losses(task_texts, progress=progress)
        chars = np.array([len(t) for t in task_texts], dtype=np.float64)
        scores = -(bpc * chars[:, None]).sum(axis=0) / chars.sum()
        for rung, s in zip(self.ladder, scores):
            rung.benchmark = float(s)
        return scores

    def benchmarks(self) -> np.ndarray:
        missing = [r.spec for r in self.ladder if r.benchmark is None]
        if missing:
            raise ValueError(f"benchmark scores missing for {missing}: give them or call "
                             "measure_benchmarks(task_texts)")
        return np.array([r.benchmark for r in self.ladder], dtype=np.float64)

    def label(self, losses: Any) -> dict[str, Any]:
        """Predictive strength, positives and negatives from a loss matrix."""
        strength = predictive_strength(losses, self.benchmarks())
        pos, neg = balanced_labels(strength, positive_min=self.positive_min)
        return {"strength": strength, "positives": pos, "negatives": neg}

    def fit(self, texts: Sequence[str], path: str | os.PathLike, *,
            losses: Any = None, progress: bool = True) -> tuple[FastTextScorer, dict[str, Any]]:
        """Score ``texts`` under the ladder, label them, train and save the fastText classifier.

        Returns the scorer and a report (losses, strength, label indices)."""
        if losses is None:
            losses = self.losses(texts, progress=progress)
        info = self.label(losses)
        idx = np.concatenate([info["positives"], info["negatives"]])
        y = np.concatenate([np.ones(info["positives"].size, dtype=int),
                            np.zeros(info["negatives"].size, dtype=int)])
        scorer = train_fasttext([texts[i] for i in idx], y, path, epoch=self.epoch, lr=self.lr,
                                word_ngrams=self.word_ngrams)
        info["losses"] = np.asarray(losses)
        return scorer, info
