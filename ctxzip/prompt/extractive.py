"""RECOMP extractive compressor: keep the retrieved sentences a dual encoder ranks highest.

Xu, Shi & Choi, "RECOMP: Improving Retrieval-Augmented LMs with Compression and Selective
Augmentation" (ICLR 2024, arXiv 2310.04408; reference code carriex/recomp). The extractive
compressor splits the retrieved documents into sentences, embeds the query and every sentence
independently with a dual (bi-)encoder, scores each sentence by the inner product of the two
embeddings, and prepends the top-scoring sentences to the input of the target LM. RECOMP trains
the encoder contrastively on sentences labelled by their end-task gain (see
:mod:`ctxzip.rag.train_extractive`); untrained, any sentence-transformers model works.

What this file adds around the paper's scorer:

* a :class:`~ctxzip.budget.Budget` counted in **sentences** (RECOMP's top-k) or in **tokens** of
  the target LM (fill by rank until the token budget is spent);
* kept sentences are emitted in their **original order** (document order, then position);
* **selective augmentation** - when no sentence scores at least ``threshold`` the compressor
  returns an empty context (the LM then reads no retrieved text at all). The threshold is
  calibrated on held-out data by :func:`calibrate_threshold` (``ctxzip rag train-extractive``
  stores it next to the trained encoder);
* multi-document input with **per-document attribution** in ``result.details["documents"]``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ctxzip.budget import Budget, topk_indices, topk_mask
from ctxzip.compressor import CompressionResult, TextCompressor, check_budget, ensure_text

__all__ = [
    "ExtractiveCompressor",
    "Sentence",
    "split_sentences",
    "calibrate_threshold",
    "as_documents",
    "CONFIG_NAME",
]

CONFIG_NAME = "ctxzip_extractive.json"

# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) and whitespace, when
# the next character starts a new sentence. Blank lines always end a unit; indented blocks (code,
# grammar productions) stay whole so a kept "sentence" is never half a code sample.
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9*`])")
_PARA = re.compile(r"\n[ \t]*\n+")


@dataclass(frozen=True)
class Sentence:
    """One extractive unit: ``text`` found at ``start:end`` of document ``doc``; ``newline`` is
    True when a line break separates it from the previous unit in the source."""

    doc: int
    index: int
    text: str
    start: int
    end: int
    newline: bool


def split_sentences(text: str, *, doc: int = 0, max_chars: int = 2000) -> list[Sentence]:
    """Split ``text`` into sentences (regex rules, no model download needed).

    Paragraphs (blank-line separated) are split at sentence-final punctuation; indented
    paragraphs (code, grammar) are kept whole. Units longer than ``max_chars`` are cut at line
    breaks (then hard-cut) so no unit dwarfs the budget.
    """
    out: list[Sentence] = []
    pos = 0
    paras: list[tuple[int, int]] = []
    for m in _PARA.finditer(text):
        paras.append((pos, m.start()))
        pos = m.end()
    paras.append((pos, len(text)))
    for ps, pe in paras:
        para = text[ps:pe]
        if not para.strip():
            continue
        indented = para.startswith((" ", "\t"))
        cuts = [0]
        if not indented:
            cuts += [m.end() for m in _SENT_END.finditer(para)]
        cuts.append(len(para))
        for a, b in zip(cuts[:-1], cuts[1:]):
            for s, e in _cut_long(para, a, b, max_chars):
                chunk = para[s:e]
                lead = len(chunk) - len(chunk.lstrip())
                trail = len(chunk.rstrip())
                if trail <= lead:
                    continue
                if indented:  # keep indentation of code blocks
                    lead = len(chunk) - len(chunk.lstrip("\n"))
                start, end = ps + s + lead, ps + s + trail
                prev_end = out[-1].end if out else 0
                gap = text[prev_end:start]
                out.append(
                    Sentence(doc, len(out), text[start:end], start, end,
                             newline=bool(out) and "\n" in gap)
                )
    return out


def _cut_long(para: str, a: int, b: int, max_chars: int) -> list[tuple[int, int]]:
    if b - a <= max_chars:
        return [(a, b)]
    pieces: list[tuple[int, int]] = []
    s = a
    while b - s > max_chars:
        nl = para.rfind("\n", s + 1, s + max_chars)
        e = nl + 1 if nl > s else s + max_chars
        pieces.append((s, e))
        s = e
    pieces.append((s, b))
    return pieces


def as_documents(documents: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Normalise compressor input to ``(texts, metadata)``.

    Accepts one string (one document), UTF-8 bytes, or a sequence whose items are strings,
    bytes, or mappings with a ``"text"`` (or ``"page_content"``) key and optional
    ``"metadata"``/``"id"``.
    """
    if isinstance(documents, (str, bytes, bytearray, memoryview)):
        return [ensure_text(documents, name="documents")], [{}]
    if isinstance(documents, dict) or not isinstance(documents, Sequence):
        raise TypeError(
            "documents must be a string or a list of strings / {'text': ...} mappings, "
            f"got {type(documents).__name__}"
        )
    texts: list[str] = []
    metas: list[dict[str, Any]] = []
    for i, d in enumerate(documents):
        if isinstance(d, dict):
            body = d.get("text", d.get("page_content"))
            if body is None:
                raise ValueError(f"documents[{i}] has no 'text' field")
            meta = dict(d.get("metadata") or {})
            if "id" in d and "id" not in meta:
                meta["id"] = d["id"]
            texts.append(ensure_text(body, name=f"documents[{i}].text"))
            metas.append(meta)
        else:
            texts.append(ensure_text(d, name=f"documents[{i}]"))
            metas.append({})
    return texts, metas


def calibrate_threshold(best_scores: Any, gains: Any) -> float | None:
    """Selective-augmentation threshold from held-out examples.

    ``best_scores[i]`` is the top sentence score of example ``i`` and ``gains[i]`` what the
    compressed context gained for the target LM (``NLL_none - NLL_with_context``; positive means
    it helped). Returns the score threshold ``t`` maximising the total gain when examples with
    ``best_score < t`` get no context, i.e. the threshold that makes selective augmentation never
    worse than "no docs" on the calibration set. ``None`` (keep everything) when no threshold
    beats keeping all.
    """
    s = np.asarray(best_scores, dtype=np.float64).reshape(-1)
    g = np.asarray(gains, dtype=np.float64).reshape(-1)
    if s.shape != g.shape:
        raise ValueError(f"best_scores and gains differ in length ({s.size} vs {g.size})")
    if s.size == 0:
        return None
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(g))):
        raise ValueError("best_scores and gains must be finite")
    order = np.argsort(s, kind="stable")
    s, g = s[order], g[order]
    # total gain when keeping examples with score >= s[j] (dropping 0..j-1): suffix sums
    suffix = np.concatenate([np.cumsum(g[::-1])[::-1], [0.0]])
    best_j = int(np.argmax(suffix))  # ties -> the lowest threshold (keep more)
    if best_j == 0:
        return None
    if best_j == s.size:
        return float(s[-1] + 1e-6)  # nothing helps: never augment
    return float(0.5 * (s[best_j - 1] + s[best_j]))


@dataclass(repr=False)
class ExtractiveCompressor(TextCompressor):
    """RECOMP extractive compressor (dual-encoder sentence selection).

    Args:
        encoder: sentence-transformers model id or local path, or a loaded
            ``SentenceTransformer``; ``None`` = the packaged all-MiniLM-L6-v2 (RECOMP used
            Contriever; any dual encoder works, a trained one via :meth:`from_pretrained`).
        unit: what a :class:`Budget` counts - ``"tokens"`` (target-LM tokens of the kept text,
            filled by rank) or ``"sentences"`` (RECOMP's top-k sentences).
        threshold: selective augmentation - return an empty context when the best sentence
            scores below this (``None`` = always augment). Calibrate with
            :func:`calibrate_threshold`.
        query_prefix: text prepended to the query before encoding (e.g. ``"query: "`` for E5).
        passage_prefix: text prepended to each sentence before encoding.
        batch_size: encoder batch size. Small batches of length-sorted sentences waste
            little padding: on one CPU thread 8 encodes five 100-word passages ~2.7x faster
            than 64 (one code block would pad a whole large batch to 256 tokens).
        max_sentence_chars: longer units are cut at line breaks before scoring.
        device: encoder device (``None`` = CUDA if available else CPU).
        tokenizer: counting tokenizer for budgets and results (default: the target LM's).
    """

    encoder: Any = None
    unit: Literal["tokens", "sentences"] = "tokens"
    threshold: float | None = None
    query_prefix: str = ""
    passage_prefix: str = ""
    batch_size: int = 8
    max_sentence_chars: int = 2000
    device: Any = None
    tokenizer: Any = None
    name: str = field(default="extractive", init=False)

    def __post_init__(self) -> None:
        if self.unit not in ("tokens", "sentences"):
            raise ValueError(f"unit must be 'tokens' or 'sentences', got {self.unit!r}")
        if self.threshold is not None and not np.isfinite(float(self.threshold)):
            raise ValueError(f"threshold must be a finite number or None, got {self.threshold!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if int(self.max_sentence_chars) < 16:
            raise ValueError(f"max_sentence_chars must be >= 16, got {self.max_sentence_chars!r}")
        super().__init__(self.tokenizer)
        self._model: Any = None if isinstance(self.encoder, (str, Path, type(None))) else self.encoder

    def __getstate__(self) -> dict[str, Any]:
        # picklable for process pools: a model named by id/path is reloaded lazily
        state = dict(self.__dict__)
        if isinstance(self.encoder, (str, Path, type(None))):
            state["_model"] = None
        return state

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> Any:
        """The sentence encoder, loaded on first use (memoised per process)."""
        if self._model is None:
            from ctxzip.models import load_encoder

            self._model = load_encoder(self.encoder, device=self.device)
        return self._model

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ExtractiveCompressor:
        """Load an encoder saved by :meth:`save_pretrained` / ``ctxzip rag train-extractive``,
        with its calibrated ``threshold`` and ``unit`` (``overrides`` win)."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"no trained extractive compressor at {str(p)!r}")
        cfg: dict[str, Any] = {}
        if (p / CONFIG_NAME).is_file():
            cfg = json.loads((p / CONFIG_NAME).read_text())
        kwargs = {k: cfg[k] for k in ("unit", "threshold", "query_prefix", "passage_prefix")
                  if k in cfg}
        kwargs.update(overrides)
        return cls(encoder=str(p), **kwargs)

    def save_pretrained(self, path: str | Path, **extra: Any) -> Path:
        """Save the encoder and this compressor's settings (threshold, unit, prefixes)."""
        p = Path(path).expanduser()
        p.mkdir(parents=True, exist_ok=True)
        self.model.save(str(p))
        cfg = {"unit": self.unit, "threshold": self.threshold, "query_prefix": self.query_prefix,
               "passage_prefix": self.passage_prefix, **extra}
        (p / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        return p

    # ------------------------------------------------------------------ scoring
    def score(self, query: str, sentences: Sequence[str]) -> np.ndarray:
        """Inner product of the query embedding with each sentence embedding (RECOMP's score)."""
        if not sentences:
            return np.zeros(0, dtype=np.float32)
        emb = self.model.encode(
            [self.query_prefix + query] + [self.passage_prefix + s for s in sentences],
            batch_size=int(self.batch_size), convert_to_numpy=True, show_progress_bar=False,
        )
        emb = np.asarray(emb, dtype=np.float32)
        return emb[1:] @ emb[0]

    # ------------------------------------------------------------------ compress
    def compress(  # type: ignore[override]
        self,
        documents: Any,
        *,
        budget: Budget | float | int,
        query: str | None = None,
        **kwargs: Any,
    ) -> CompressionResult:
        """Compress retrieved ``documents`` (a string or a list of strings / ``{"text", "metadata"}``
        mappings) for ``query`` to ``budget`` (in :attr:`unit`).

        The result's ``text`` joins the kept sentences in original order (documents separated by
        a blank line); ``details["documents"]`` attributes every kept sentence to its document.
        """
        texts, metas = as_documents(documents)
        if query is None:
            raise ValueError("ExtractiveCompressor needs a query (the sentences are ranked "
                             "against it)")
        query = ensure_text(query, name="query")
        if not query.strip():
            raise ValueError("query is empty")
        budget = check_budget(budget)
        t0 = time.perf_counter()
        joined = "\n\n".join(texts)
        n_tokens = self.counter.count(joined)
        res = self._select(texts, metas, query=query, budget=budget, n_tokens=n_tokens)
        res.method = self.name
        res.original_tokens = n_tokens
        res.compressed_tokens = self.counter.count(res.text)
        res.timings["total"] = time.perf_counter() - t0
        return res

    def _compress(
        self, text: str, *, budget: Budget, n_tokens: int, query: str | None, **kwargs: Any
    ) -> CompressionResult:  # pragma: no cover - compress() is overridden
        return self._select([text], [{}], query=query or "", budget=budget, n_tokens=n_tokens)

    def _select(
        self, texts: list[str], metas: list[dict[str, Any]], *, query: str, budget: Budget,
        n_tokens: int,
    ) -> CompressionResult:
        sents: list[Sentence] = []
        for d, t in enumerate(texts):
            for s in split_sentences(t, doc=d, max_chars=int(self.max_sentence_chars)):
                sents.append(Sentence(d, len(sents), s.text, s.start, s.end, s.newline))
        timings: dict[str, float] = {}
        if not sents:
            return CompressionResult("", n_tokens, 0, kept=np.zeros(0, dtype=bool),
                                     details={"documents": _attribution(texts, metas, [], None,
                                                                        None, [])})
        t = time.perf_counter()
        scores = self.score(query, [s.text for s in sents])
        timings["score"] = time.perf_counter() - t
        ids = self.counter.tokenizer([s.text for s in sents], add_special_tokens=False)["input_ids"]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        best = float(scores.max())
        selective = self.threshold is not None and best < float(self.threshold)
        if selective:
            kept = np.zeros(len(sents), dtype=bool)
        elif self.unit == "sentences":
            kept = topk_mask(scores, budget.resolve(len(sents)))
        else:
            kept = _fill_tokens(scores, lengths, budget.resolve(n_tokens))
        text = _render(texts, sents, kept)
        details = {
            "unit": self.unit,
            "budget": str(budget),
            "best_score": best,
            "threshold": self.threshold,
            "selective_empty": bool(selective),
            "n_sentences": len(sents),
            "kept_sentences": int(kept.sum()),
            "documents": _attribution(texts, metas, sents, scores, kept, lengths),
            "sentences": [
                {"doc": s.doc, "start": s.start, "end": s.end, "score": float(sc),
                 "tokens": int(n), "kept": bool(k)}
                for s, sc, n, k in zip(sents, scores, lengths, kept)
            ],
        }
        return CompressionResult(text, n_tokens, 0, kept=kept, details=details, timings=timings)

    def __repr__(self) -> str:
        enc = self.encoder if isinstance(self.encoder, (str, Path, type(None))) else "<model>"
        return (f"ExtractiveCompressor(encoder={enc!r}, unit={self.unit!r}, "
                f"threshold={self.threshold!r})")


def _fill_tokens(scores: np.ndarray, lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Take sentences by descending score while they fit in ``capacity`` tokens (a sentence that
    does not fit is skipped, later shorter ones may still fit)."""
    order = topk_indices(scores, len(scores), sort_by_position=False)
    kept = np.zeros(len(scores), dtype=bool)
    used = 0
    for i in np.asarray(order).tolist():
        n = int(lengths[i])
        if used + n <= capacity:
            kept[i] = True
            used += n
    return kept


def _render(texts: list[str], sents: list[Sentence], kept: np.ndarray) -> str:
    parts: list[str] = []
    for d in range(len(texts)):
        buf: list[str] = []
        for s in sents:
            if s.doc != d or not kept[s.index]:
                continue
            if buf:
                buf.append("\n" if s.newline else " ")
            buf.append(s.text)
        if buf:
            parts.append("".join(buf))
    return "\n\n".join(parts)


def _attribution(
    texts: list[str], metas: list[dict[str, Any]], sents: list[Sentence],
    scores: np.ndarray | None, kept: np.ndarray | None, lengths: Any,
) -> list[dict[str, Any]]:
    out = []
    for d, (t, m) in enumerate(zip(texts, metas)):
        mine = [s for s in sents if s.doc == d]
        keep = [s for s in mine if kept is not None and kept[s.index]]
        out.append({
            "index": d,
            "metadata": m,
            "n_sentences": len(mine),
            "kept_sentences": [s.index - mine[0].index for s in keep] if mine else [],
            "kept_spans": [[s.start, s.end] for s in keep],
            "kept_tokens": int(sum(int(lengths[s.index]) for s in keep)),
            "max_score": float(max(scores[s.index] for s in mine)) if mine and scores is not None
            else None,
            "text": _render([t], [Sentence(0, i, s.text, s.start, s.end, s.newline)
                                  for i, s in enumerate(keep)], np.ones(len(keep), dtype=bool)),
        })
    return out
