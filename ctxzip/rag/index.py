"""Dense passage index over faiss: embed passages with a sentence encoder, search by inner product.

Small collections use an exact ``IndexFlatIP``; from ``ivf_min_passages`` passages on an
``IndexIVFFlat`` (inverted lists over k-means cells, ``nprobe`` cells searched) keeps search
sub-linear. Embeddings are L2-normalised, so inner product is cosine similarity. An index saves to
a directory (``index.faiss`` + ``passages.jsonl`` + ``index.json``) and loads back without
re-embedding.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctxzip.compressor import ensure_text

__all__ = ["Passage", "Hit", "PassageIndex", "chunk_words", "index_documents"]


@dataclass
class Passage:
    """A retrievable unit: ``text`` plus free-form ``metadata`` (source, title, ...)."""

    text: str
    id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "metadata": self.metadata}


@dataclass
class Hit:
    """A search result: the passage, its rank position and similarity score."""

    passage: Passage
    score: float
    rank: int
    row: int


def chunk_words(text: str, words: int = 100, overlap: int = 0) -> list[str]:
    """Split ``text`` into passages of about ``words`` whitespace words (RECOMP/DPR-style
    100-word passages); line structure inside a passage is kept."""
    if words < 1 or not 0 <= overlap < words:
        raise ValueError(f"need words >= 1 and 0 <= overlap < words, got {words}, {overlap}")
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    out = []
    step = words - overlap
    for i in range(0, len(spans), step):
        part = spans[i: i + words]
        if not part:
            break
        out.append(text[part[0][0]: part[-1][1]])
        if i + words >= len(spans):
            break
    return out


class PassageIndex:
    """Faiss index over passages.

    Args:
        encoder: sentence-transformers id/path or loaded model (``None`` = packaged MiniLM).
        ivf_min_passages: use an IVF index from this many passages on (exact flat below).
        nlist: IVF cells (``None`` = ``4 * sqrt(n)``, capped so each cell trains on >= 39 points).
        nprobe: IVF cells searched per query.
        batch_size: encoder batch size.
        device: encoder device.
    """

    def __init__(
        self,
        encoder: Any = None,
        *,
        ivf_min_passages: int = 20_000,
        nlist: int | None = None,
        nprobe: int = 16,
        batch_size: int = 64,
        device: Any = None,
    ) -> None:
        if ivf_min_passages < 1 or nprobe < 1 or batch_size < 1:
            raise ValueError("ivf_min_passages, nprobe and batch_size must be >= 1")
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        self.encoder_name = encoder if isinstance(encoder, (str, Path, type(None))) else None
        self._encoder = None if isinstance(encoder, (str, Path, type(None))) else encoder
        self.ivf_min_passages = int(ivf_min_passages)
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.batch_size = int(batch_size)
        self.device = device
        self.passages: list[Passage] = []
        self.index: Any = None
        self.kind = "empty"

    # ------------------------------------------------------------------ encoder
    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from ctxzip.models import load_encoder

            self._encoder = load_encoder(self.encoder_name, device=self.device)
        return self._encoder

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text."""
        emb = self.encoder.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                  show_progress_bar=progress, normalize_embeddings=True)
        return np.ascontiguousarray(np.asarray(emb, dtype=np.float32))

    # ------------------------------------------------------------------ build
    def add(self, passages: Iterable[Passage | str | dict[str, Any]], *,
            progress: bool = False) -> PassageIndex:
        """Embed and index passages (strings, dicts with ``text``/``metadata``/``id``, or
        :class:`Passage`). Rebuilds the faiss index over all passages added so far."""
        import faiss

        new: list[Passage] = []
        for i, p in enumerate(passages):
            if isinstance(p, Passage):
                new.append(p)
            elif isinstance(p, dict):
                if "text" not in p:
                    raise ValueError(f"passage {i} has no 'text'")
                new.append(Passage(ensure_text(p["text"], name=f"passage {i}"),
                                   str(p.get("id", "")), dict(p.get("metadata") or {})))
            else:
                new.append(Passage(ensure_text(p, name=f"passage {i}")))
        for j, p in enumerate(new):
            if not p.id:
                p.id = str(len(self.passages) + j)
        if not new:
            return self
        vecs = self.embed([p.text for p in new], progress=progress)
        old = self._vectors()
        all_vecs = vecs if old is None else np.vstack([old, vecs])
        self.passages.extend(new)
        n, dim = all_vecs.shape
        if n >= self.ivf_min_passages:
            nlist = self.nlist or int(4 * math.sqrt(n))
            nlist = max(1, min(nlist, n // 39))
            quant = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(all_vecs)
            index.add(all_vecs)
            index.nprobe = min(self.nprobe, nlist)
            self.kind = "ivf"
        else:
            index = faiss.IndexFlatIP(dim)
            index.add(all_vecs)
            self.kind = "flat"
        self.index = index
        self._cache = all_vecs
        return self

    def _vectors(self) -> np.ndarray | None:
        if self.index is None or self.index.ntotal == 0:
            return None
        cached = getattr(self, "_cache", None)
        if cached is not None and len(cached) == self.index.ntotal:
            return cached
        if self.kind == "flat":
            return self.index.reconstruct_n(0, self.index.ntotal)
        self.index.make_direct_map()
        return self.index.reconstruct_n(0, self.index.ntotal)

    def __len__(self) -> int:
        return len(self.passages)

    # ------------------------------------------------------------------ search
    def search(self, queries: str | Sequence[str], k: int = 5, *,
               exclude: Any = None) -> list[list[Hit]]:
        """Top-``k`` passages per query (best first).

        ``exclude``: optional predicate ``f(passage) -> bool`` (or one per query) removing
        passages from the results, e.g. the query's own document in a leave-one-out setup.
        """
        if isinstance(queries, str):
            queries = [queries]
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.index is None or not self.passages:
            raise ValueError("the index is empty: add passages first")
        q = self.embed([ensure_text(x, name="query") for x in queries])
        preds = exclude if isinstance(exclude, (list, tuple)) else [exclude] * len(queries)
        out: list[list[Hit]] = []
        fetch = k
        while True:
            scores, rows = self.index.search(q, min(fetch, len(self.passages)))
            out = []
            short = False
            for qi in range(len(queries)):
                hits = []
                for s, r in zip(scores[qi], rows[qi]):
                    if r < 0:
                        continue
                    p = self.passages[int(r)]
                    if preds[qi] is not None and preds[qi](p):
                        continue
                    hits.append(Hit(p, float(s), len(hits), int(r)))
                    if len(hits) == k:
                        break
                if len(hits) < k and fetch < len(self.passages):
                    short = True
                out.append(hits)
            if not short:
                return out
            fetch = min(len(self.passages), fetch * 4)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``index.faiss``, ``passages.jsonl`` and ``index.json`` into directory ``path``."""
        import faiss

        if self.index is None:
            raise ValueError("nothing to save: the index is empty")
        p = Path(path).expanduser()
        p.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(p / "index.faiss"))
        with open(p / "passages.jsonl", "w", encoding="utf-8") as f:
            for x in self.passages:
                f.write(json.dumps(x.to_dict(), ensure_ascii=False) + "\n")
        meta = {"kind": self.kind, "n": len(self.passages), "nprobe": self.nprobe,
                "encoder": None if self.encoder_name is None else str(self.encoder_name)}
        (p / "index.json").write_text(json.dumps(meta, indent=2))
        return p

    @classmethod
    def load(cls, path: str | Path, encoder: Any = None, **kwargs: Any) -> PassageIndex:
        """Load an index saved by :meth:`save` (``encoder`` overrides the saved encoder name;
        it must be the model that embedded the passages)."""
        import faiss

        p = Path(path).expanduser()
        for name in ("index.faiss", "passages.jsonl", "index.json"):
            if not (p / name).is_file():
                raise FileNotFoundError(f"{str(p / name)!r} is missing: not a saved PassageIndex")
        meta = json.loads((p / "index.json").read_text())
        self = cls(encoder if encoder is not None else meta.get("encoder"),
                   nprobe=int(meta.get("nprobe", 16)), **kwargs)
        self.index = faiss.read_index(str(p / "index.faiss"))
        self.kind = meta.get("kind", "flat")
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = self.nprobe
        with open(p / "passages.jsonl", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                self.passages.append(Passage(d["text"], d.get("id", ""), d.get("metadata", {})))
        if len(self.passages) != self.index.ntotal:
            raise ValueError(f"corrupt index at {str(p)!r}: {self.index.ntotal} vectors for "
                             f"{len(self.passages)} passages")
        return self


def index_documents(documents: Iterable[Any], *, words: int = 100, overlap: int = 0,
                    encoder: Any = None, progress: bool = False, **kwargs: Any) -> PassageIndex:
    """Chunk documents (objects with ``.id``/``.text``[/``.source``] or ``{"id", "text"}``
    dicts) into ``words``-word passages tagged ``metadata={"doc_id", "source"}`` and index them."""
    passages: list[Passage] = []
    for i, d in enumerate(documents):
        if isinstance(d, dict):
            did, text, src = str(d.get("id", i)), d.get("text"), str(d.get("source", ""))
        else:
            did, text, src = str(getattr(d, "id", i)), getattr(d, "text", None), \
                str(getattr(d, "source", ""))
        if text is None:
            raise ValueError(f"document {i} has no text")
        for j, chunk in enumerate(chunk_words(ensure_text(text), words, overlap)):
            passages.append(Passage(chunk, f"{did}#{j}", {"doc_id": did, "source": src}))
    return PassageIndex(encoder, **kwargs).add(passages, progress=progress)
