"""Train RECOMP's extractive compressor: label sentences by end-task gain, fine-tune the encoder.

RECOMP (Xu, Shi & Choi, ICLR 2024; reference code ``carriex/recomp``
``train_extractive_compressor.py``) labels every candidate sentence ``s`` of the retrieved
documents by what it does for the target LM: for language modelling the score is
``log p(y | [s; x])`` of the continuation ``y`` given the sentence prepended to the prefix ``x``.
The best sentence is the positive; sentences that score lower are negatives; the dual encoder is
fine-tuned with ``MultipleNegativesRankingLoss`` on ``(query, positive, negative)`` triplets
(in-batch negatives plus the hard negative).

This module does the same on a local corpus with the offline target LM:

1. :func:`lm_examples` cuts ``(prefix, continuation)`` cases from documents and retrieves the
   top-``k`` passages of *other* documents for each prefix (a :class:`PassageIndex`).
2. :class:`ContinuationScorer` computes ``NLL(y | [s; x])`` for every sentence in right-padded
   batches; the teacher signal is the gain ``NLL(y | x) - NLL(y | [s; x])``.
3. :func:`make_triplets`: positive = the highest-gain sentence when its gain is positive
   (RECOMP's examples where no sentence helps teach nothing to the ranker); negatives = up to
   ``num_negatives`` lower-gain sentences, the ones the current encoder ranks highest first
   (hard negatives, cf. the reference's ``control_contriever`` option).
4. :func:`train_encoder`: a plain PyTorch loop over ``MultipleNegativesRankingLoss``.
5. :func:`train_extractive` ties it together and calibrates the selective-augmentation
   threshold on held-out examples (:func:`~ctxzip.prompt.extractive.calibrate_threshold`).

Deviation: RECOMP used ``util.dot_score`` with ``scale=1`` on un-normalised Contriever
embeddings; MiniLM ends in a ``Normalize`` layer (dot = cosine in [-1, 1]), where ``scale=1``
leaves an almost flat softmax, so the sentence-transformers default ``scale=20`` is used.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctxzip.budget import Budget
from ctxzip.prompt.extractive import ExtractiveCompressor, calibrate_threshold, split_sentences
from ctxzip.rag.index import PassageIndex

__all__ = [
    "LMExample",
    "ContinuationScorer",
    "lm_examples",
    "label_examples",
    "make_triplets",
    "train_encoder",
    "train_extractive",
    "TrainConfig",
    "split_by_source",
    "pydoc_documents",
]

log = logging.getLogger(__name__)


@dataclass
class LMExample:
    """One language-modelling case: the LM reads ``[context; prefix]`` and predicts
    ``continuation``; ``query`` (the prefix's last tokens) retrieves and ranks passages."""

    doc_id: str
    prefix: str
    continuation: str
    query: str
    passages: list[str] = field(default_factory=list)
    passage_ids: list[str] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    nll_none: float = float("nan")


class ContinuationScorer:
    """Mean token NLL of a continuation given ``[context; prefix]`` under a causal LM, for many
    contexts at once (right-padded batches)."""

    def __init__(self, model: Any = None, tokenizer: Any = None, *, batch_size: int = 8,
                 device: Any = None, dtype: Any = None) -> None:
        if model is None or isinstance(model, str):
            from ctxzip.models import load_causal_lm

            if isinstance(dtype, str):
                import torch

                dtype = getattr(torch, dtype)
            model, tok = load_causal_lm(model, device=device, dtype=dtype)
            tokenizer = tokenizer or tok
        if tokenizer is None:
            raise ValueError("pass the model's tokenizer")
        from ctxzip.models import doc_start_ids

        self.model, self.tokenizer = model, tokenizer
        self.start = doc_start_ids(tokenizer)
        self.batch_size = int(batch_size)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def nll(self, contexts: Sequence[str | None], prefix: str, continuation: str) -> np.ndarray:
        """Mean NLL (nats/token) of ``continuation`` after each context + ``prefix``.

        Rows are **left**-padded (explicit position ids), so the continuation always sits at
        the end of every row and only its ``len(continuation) + 1`` positions go through the
        vocabulary projection (``logits_to_keep``) - on a 135M model with a 49k vocabulary
        that projection is most of the compute of a full-logits forward."""
        import torch

        pre, tgt = self.encode(prefix), self.encode(continuation)
        if not tgt:
            raise ValueError("continuation is empty")
        rows = []
        for c in contexts:
            ctx = self.encode(c.strip() + "\n\n") if c and c.strip() else []
            rows.append(self.start + ctx + pre + tgt)
        out = np.zeros(len(rows), dtype=np.float64)
        dev = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        order = np.argsort([-len(r) for r in rows], kind="stable")
        n_t = len(tgt)
        target = torch.tensor(tgt, device=dev)
        with torch.no_grad():
            for b in range(0, len(rows), self.batch_size):
                idx = order[b: b + self.batch_size]
                L = max(len(rows[i]) for i in idx)
                ids = torch.full((len(idx), L), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), L), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, L - len(rows[i]):] = torch.tensor(rows[i])
                    mask[r, L - len(rows[i]):] = 1
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                    position_ids=pos.to(dev), logits_to_keep=n_t + 1).logits
                # logits[:, j] predicts the token after row position L - n_t - 1 + j
                logp = torch.log_softmax(logits[:, :n_t].float(), dim=-1)
                tok_nll = -logp.gather(-1, target.expand(len(idx), n_t).unsqueeze(-1)).squeeze(-1)
                out[idx] = tok_nll.mean(-1).double().cpu().numpy()
        return out


def lm_examples(
    documents: Sequence[Any],
    index: PassageIndex,
    tokenizer: Any,
    *,
    prefix_tokens: int = 96,
    continuation_tokens: int = 32,
    query_tokens: int = 32,
    stride: int = 256,
    max_per_doc: int = 4,
    k: int = 5,
    exclude_key: str = "doc_id",
    dedup_ngram: int | None = 8,
) -> list[LMExample]:
    """Cut LM cases from ``documents`` (objects with ``.id`` and ``.text``) and retrieve the
    top-``k`` passages of *other* documents: ``metadata[exclude_key]`` differs from the case's
    document and (``dedup_ngram``) the passage shares no word ``n``-gram with it. The second
    rule matters on real corpora with verbatim copies - ``pydoc_data.topics`` repeats e.g. the
    "while", "for" and "if" topics inside "compound" - where retrieval would otherwise hand the
    LM its own continuation."""
    cases: list[LMExample] = []
    for d in documents:
        ids = list(tokenizer(d.text, add_special_tokens=False)["input_ids"])
        starts = range(0, len(ids) - prefix_tokens - continuation_tokens + 1, stride)
        for a in list(starts)[:max_per_doc]:
            pre = ids[a: a + prefix_tokens]
            cont = ids[a + prefix_tokens: a + prefix_tokens + continuation_tokens]
            cases.append(LMExample(d.id, tokenizer.decode(pre), tokenizer.decode(cont),
                                   tokenizer.decode(pre[-query_tokens:])))
    if not cases:
        return cases
    shingles: dict[str, set[str]] = {}
    if dedup_ngram:
        for d in documents:
            shingles[d.id] = _shingles(d.text, dedup_ngram)
        pas = {p.id: _shingles(p.text, dedup_ngram) for p in index.passages}

    def pred(p: Any, did: str) -> bool:
        if p.metadata.get(exclude_key) == did:
            return True
        return bool(dedup_ngram) and not shingles[did].isdisjoint(pas[p.id])

    preds = [(lambda p, did=c.doc_id: pred(p, did)) for c in cases]
    hits = index.search([c.query for c in cases], k, exclude=preds)
    for c, hs in zip(cases, hits):
        c.passages = [h.passage.text for h in hs]
        c.passage_ids = [h.passage.id for h in hs]
    return cases


def _shingles(text: str, n: int) -> set[str]:
    import re

    w = re.findall(r"\S+", text)
    return {" ".join(w[i: i + n]) for i in range(max(0, len(w) - n + 1))}


def label_examples(examples: Sequence[LMExample], scorer: ContinuationScorer, *,
                   max_sentences: int = 12, ranker: Any = None, progress: bool = True) -> None:
    """Fill ``sentences``, ``gains`` (``NLL_none - NLL_with_sentence``) and ``nll_none``.

    Candidates are the sentences of the retrieved passages; with a ``ranker`` (an
    :class:`ExtractiveCompressor`) only its top ``max_sentences`` are labelled (the teacher LM is
    the expensive part), else the first ``max_sentences``.
    """
    from tqdm.auto import tqdm

    for ex in tqdm(examples, desc="labelling sentences", disable=not progress):
        sents: list[str] = []
        for p in ex.passages:
            sents.extend(s.text for s in split_sentences(p))
        if ranker is not None and len(sents) > max_sentences:
            sc = ranker.score(ex.query, sents)
            keep = sorted(np.argsort(-sc, kind="stable")[:max_sentences].tolist())
            sents = [sents[i] for i in keep]
        ex.sentences = sents[:max_sentences]
        nll = scorer.nll([None, *ex.sentences], ex.prefix, ex.continuation)
        ex.nll_none = float(nll[0])
        ex.gains = (nll[0] - nll[1:]).tolist()


def make_triplets(examples: Sequence[LMExample], encoder_scores: Sequence[Sequence[float]], *,
                  num_negatives: int = 5, min_gain: float = 0.0) -> list[tuple[str, str, str]]:
    """RECOMP triplets ``(query, positive, negative)`` from labelled examples."""
    out: list[tuple[str, str, str]] = []
    for ex, enc in zip(examples, encoder_scores):
        if not ex.sentences:
            continue
        g = np.asarray(ex.gains)
        pos = int(np.argmax(g))
        if g[pos] <= min_gain:
            continue
        neg = [i for i in np.argsort(-np.asarray(enc), kind="stable") if g[i] < g[pos] and i != pos]
        for i in neg[:num_negatives]:
            out.append((ex.query, ex.sentences[pos], ex.sentences[int(i)]))
    return out


def train_encoder(model: Any, triplets: Sequence[tuple[str, str, str]], *, epochs: int = 1,
                  batch_size: int = 32, lr: float = 2e-5, warmup_ratio: float = 0.1,
                  scale: float = 20.0, max_seq_length: int = 128, seed: int = 0,
                  progress: bool = True) -> dict[str, Any]:
    """Fine-tune a SentenceTransformer on triplets with ``MultipleNegativesRankingLoss``."""
    import torch
    from tqdm.auto import tqdm

    try:
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers import util

    if not triplets:
        raise ValueError("no training triplets: no sentence improved the target LM's NLL")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.max_seq_length = max_seq_length
    loss_fn = MultipleNegativesRankingLoss(model, scale=scale, similarity_fct=util.cos_sim)
    steps = epochs * math.ceil(len(triplets) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warm = max(1, int(warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / max(1, steps - warm))
        if s >= warm else (s + 1) / warm)
    dev = model.device
    model.train()
    losses: list[float] = []
    bar = tqdm(total=steps, desc="training encoder (MNRL)", disable=not progress)
    for _ in range(epochs):
        data = list(triplets)
        rng.shuffle(data)
        for b in range(0, len(data), batch_size):
            batch = data[b: b + batch_size]
            feats = []
            for col in range(3):
                f = model.tokenize([t[col] for t in batch])
                feats.append({k: (v.to(dev) if hasattr(v, "to") else v) for k, v in f.items()})
            loss = loss_fn(feats, None)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return {"steps": steps, "loss_first": losses[0], "loss_last": float(np.mean(losses[-5:]))}


def _label_cached(examples: Sequence[LMExample], scorer: ContinuationScorer, ranker: Any,
                  cfg: TrainConfig, path: Path, *, progress: bool = True,
                  chunk: int = 8) -> None:
    """:func:`label_examples` with a per-case cache (JSON lines): the teacher LM is the
    expensive part, so an interrupted run resumes where it stopped."""
    import hashlib

    geo = {k: getattr(cfg, k) for k in ("k", "prefix_tokens", "continuation_tokens",
                                         "query_tokens", "max_sentences")}

    def key(e: LMExample) -> str:
        raw = json.dumps([geo, e.doc_id, e.prefix, e.continuation, e.passage_ids])
        return hashlib.sha256(raw.encode()).hexdigest()[:20]

    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                done[d["key"]] = d
    todo = [e for e in examples if key(e) not in done]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), initial=len(examples) - len(todo),
               desc="labelling sentences (teacher LM)", disable=not progress)
    for b in range(0, len(todo), chunk):
        part = todo[b: b + chunk]
        label_examples(part, scorer, max_sentences=cfg.max_sentences, ranker=ranker,
                       progress=False)
        with path.open("a") as f:
            for e in part:
                d = {"key": key(e), "doc_id": e.doc_id, "query": e.query,
                     "sentences": e.sentences, "gains": e.gains, "nll_none": e.nll_none}
                done[d["key"]] = d
                f.write(json.dumps(d) + "\n")
        bar.update(len(part))
    bar.close()
    for e in examples:
        d = done[key(e)]
        e.sentences, e.gains, e.nll_none = d["sentences"], d["gains"], d["nll_none"]


def pydoc_documents(min_chars: int = 1500, max_chars: int = 4000) -> list[Any]:
    """The RECOMP-LM corpus used here: ``pydoc_data.topics`` cut into 1.5-4k-character
    documents (:func:`ctxzip.eval.prose_documents`)."""
    from ctxzip.eval import prose_documents

    return prose_documents(None, min_chars=min_chars, max_chars=max_chars)


def split_by_source(documents: Sequence[Any], test_fraction: float = 0.3,
                    seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Deterministic ``(train, test)`` split that keeps every source (topic/file) on one side,
    so trained compressors are tested on topics they never saw."""
    import hashlib

    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    train, test = [], []
    for d in documents:
        src = str(getattr(d, "source", "") or getattr(d, "id", ""))
        h = int(hashlib.sha256(f"{seed}:{src}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (test if h < test_fraction else train).append(d)
    return train, test


@dataclass
class TrainConfig:
    """Settings of :func:`train_extractive` (RECOMP LM setup on a local corpus).

    Args:
        k: passages retrieved per case (RECOMP: 5).
        prefix_tokens / continuation_tokens / query_tokens: case geometry in target-LM tokens
            (In-Context RALM / RECOMP LM: the last 32 prefix tokens are the retrieval query and
            32-token chunks are predicted).
        stride / max_per_doc: where and how many cases are cut from each document.
        max_sentences: candidate sentences labelled per case (the starting encoder's top ones).
        num_negatives: hard negatives per positive (RECOMP reference default 5).
        epochs / batch_size / lr / warmup_ratio / scale: encoder training.
        budget: the budget used when calibrating the selective threshold.
        teacher_dtype: dtype of the teacher LM (``None`` = its default, fp32 on CPU;
            ``"bfloat16"`` halves the labelling CPU time on bf16-capable CPUs and ranked the
            sentences of a probe case like fp32 - Pearson 0.97 of the gains, same top 3).
        dev_fraction: documents held out for threshold calibration.
        seed: shuffling seed.
    """

    k: int = 5
    prefix_tokens: int = 128
    continuation_tokens: int = 64
    query_tokens: int = 32
    stride: int = 192
    max_per_doc: int = 2
    max_sentences: int = 12
    num_negatives: int = 5
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    scale: float = 20.0
    budget: float = 0.2
    dev_fraction: float = 0.2
    teacher_dtype: str | None = None
    seed: int = 0


def train_extractive(
    documents: Sequence[Any],
    index: PassageIndex,
    output_dir: str | Path,
    *,
    encoder: Any = None,
    lm: Any = None,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Label, train, calibrate, save. ``documents`` are the training documents (``.id``,
    ``.text``); passages of ``index`` carry ``metadata["doc_id"]`` so a case never retrieves its
    own document. Returns a report (also written to ``train_report.json``)."""
    import copy

    from ctxzip.models import load_encoder

    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    scorer = ContinuationScorer(lm, dtype=cfg.teacher_dtype)
    docs = list(documents)
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    n_dev = max(1, int(round(cfg.dev_fraction * len(docs)))) if len(docs) > 1 else 0
    dev_docs, train_docs = docs[:n_dev], docs[n_dev:]
    geo = dict(prefix_tokens=cfg.prefix_tokens, continuation_tokens=cfg.continuation_tokens,
               query_tokens=cfg.query_tokens, stride=cfg.stride, max_per_doc=cfg.max_per_doc,
               k=cfg.k)
    train_ex = lm_examples(train_docs, index, scorer.tokenizer, **geo)
    dev_ex = lm_examples(dev_docs, index, scorer.tokenizer, **geo)
    if not train_ex:
        raise ValueError("no training cases: documents are shorter than prefix + continuation")
    base = load_encoder(encoder)
    model = copy.deepcopy(base)  # never train the memoised shared encoder in place
    comp0 = ExtractiveCompressor(encoder=model)
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _label_cached(train_ex, scorer, comp0, cfg, out / "labels.jsonl", progress=progress)
    t_label = time.perf_counter() - t0
    enc_scores = [comp0.score(ex.query, ex.sentences) for ex in train_ex]
    triplets = make_triplets(train_ex, enc_scores, num_negatives=cfg.num_negatives)
    stats = train_encoder(model, triplets, epochs=cfg.epochs, batch_size=cfg.batch_size,
                          lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, scale=cfg.scale,
                          seed=cfg.seed, progress=progress)

    # calibrate the selective-augmentation threshold on held-out documents (for the trained
    # encoder, and for the starting encoder so it can be used selectively too)
    comp = ExtractiveCompressor(encoder=model)
    comp0 = ExtractiveCompressor(encoder=base)  # the untrained encoder (``model`` was trained in place)
    best, gains, best0, gains0 = [], [], [], []
    for ex in dev_ex:
        r = comp.compress(ex.passages, query=ex.query, budget=Budget(rate=cfg.budget))
        r0 = comp0.compress(ex.passages, query=ex.query, budget=Budget(rate=cfg.budget))
        nll = scorer.nll([None, r.text, r0.text], ex.prefix, ex.continuation)
        best.append(r.details["best_score"])
        gains.append(float(nll[0] - nll[1]))
        best0.append(r0.details["best_score"])
        gains0.append(float(nll[0] - nll[2]))
    threshold = calibrate_threshold(best, gains) if dev_ex else None
    base_threshold = calibrate_threshold(best0, gains0) if dev_ex else None
    comp.threshold = threshold
    report = {
        "config": asdict(cfg),
        "train_documents": len(train_docs),
        "dev_documents": len(dev_docs),
        "train_cases": len(train_ex),
        "dev_cases": len(dev_ex),
        "cases_with_positive": sum(1 for e in train_ex if e.gains and max(e.gains) > 0),
        "triplets": len(triplets),
        "threshold": threshold,
        "base_encoder_threshold": base_threshold,
        "dev_mean_gain_base_encoder": float(np.mean(gains0)) if gains0 else None,
        "dev_mean_gain_always": float(np.mean(gains)) if gains else None,
        "dev_mean_gain_selective": float(np.mean([g if (threshold is None or s >= threshold)
                                                  else 0.0 for s, g in zip(best, gains)]))
        if gains else None,
        "training": stats,
        "seconds_labelling": t_label,
        "seconds_total": time.perf_counter() - t0,
        "train_doc_ids": sorted({e.doc_id for e in train_ex}),
        "dev_doc_ids": sorted({e.doc_id for e in dev_ex}),
    }
    comp.save_pretrained(out, trained_on=report["train_doc_ids"] + report["dev_doc_ids"])
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    return report
