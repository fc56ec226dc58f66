"""LLMLingua-2: prompt compression as token classification.

LLMLingua-2 (Pan et al., Findings of ACL 2024, arXiv 2403.12968) trains a bidirectional encoder
(XLM-RoBERTa-large or multilingual BERT) to label every word "keep" or "drop" from data
distilled from GPT-4, then keeps the words with the highest keep probability. This file follows
the reference implementation (``llmlingua`` 0.2.2, ``PromptCompressor.compress_prompt_llmlingua2``
with ``__chunk_context``, ``__merge_token_to_word``, ``__token_prob_to_word_prob``,
``__get_context_prob`` and ``__compress``):

1. The text is tokenized by the classifier and cut into chunks of at most ``max_seq_len - 2``
   tokens, each ending at the last "chunk end" token (``.``/newline) of its window.
2. Each chunk is classified (``[CLS] chunk [SEP]``, truncated to ``max_seq_len``); the keep
   probability is ``softmax(logits)[..., 1]``.
3. Tokens are merged into words: a token starts a new word unless it is a WordPiece
   continuation (``##``) or, for SentencePiece models, lacks the ``▁`` word-start marker (and is
   not punctuation). A word's probability is the mean (or first) of its tokens' probabilities;
   words in ``force_tokens`` get 1.0, and with ``force_reserve_digit`` so does every token with a
   digit.
4. Selection. ``mode="chunk"`` is the anchor's rule: per chunk, each word's probability is
   repeated once per target-tokenizer token of the word, the threshold is the
   ``int(100 * (1 - rate) + 1)``-th percentile of that list, and words above it are kept (words
   at exactly 1.0 are kept when the threshold is 1.0). ``mode="global"`` ranks all words of the
   document together with :func:`ctxzip.budget.topk_mask` over their tokens and hits the budget
   exactly (the anchor's per-chunk percentile only approximates it).

What is different from the anchor, and why (see ``docs/prompt.md``):

* Everything after the forward pass is vectorised with numpy over the whole document (lookup
  tables over the vocabulary, ``bincount`` for word means, one percentile per chunk); the
  anchor loops over every token in Python.
* Chunks are fed to the model as token ids; the anchor turns them into strings and tokenizes
  them again (identical ids for ordinary text).
* The output keeps the original spelling, case and line breaks of the kept words (the anchor
  rebuilds text from tokens, which lower-cases with uncased models and joins chunks without a
  separator). ``[UNK]`` words are kept as text; the anchor silently deletes them.
* Batches are sorted by length and padded only to their longest member (the anchor pads every
  chunk to 512). ``fast=`` adds approximate inference on top: ONNX Runtime with fused attention
  and SmoothQuant-smoothed dynamic int8, one unpadded chunk per call spread over the worker
  threads (:mod:`ctxzip.prompt.onnx_backend`), or torch bfloat16 / dynamic int8.
"""

from __future__ import annotations

import math
import re
import string
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from ctxzip.budget import Budget, fill_until, topk_mask
from ctxzip.compressor import CompressionResult, TextCompressor, check_budget, ensure_text

__all__ = ["TokenClassifierCompressor", "WordScores", "render_words"]

FAST_MODES = ("int8", "bf16", "onnx", "onnx-int8", "onnx-exact")
#: ``fast="onnx-exact"``: assumed bound on ``|p_onnx - p_torch|`` per keep probability. A chunk
#: is re-classified with torch fp32 when moving its probabilities by this much could change its
#: kept words. The two backends differ by at most ~1e-6 on this project's classifier
#: (``benchmarks/prompt_speed.py`` records the largest difference it sees): a 20x reserve.
EXACT_MARGIN = 2e-5


@dataclass
class WordScores:
    """Per-word view of a document after classification.

    Attributes:
        spans: ``(n_words, 2)`` character spans in the original text.
        prob: keep probability per word, after forcing (``force_tokens``/digits).
        prob_raw: keep probability per word before forcing (used by the context filter).
        chunk: chunk index of each word.
        weight: target tokens per word (the anchor's ``len(oai_tokenizer.encode(word))``).
        forced: words forced to 1.0.
        words: word strings as the classifier's tokens spell them (lower-cased by uncased
            models; the anchor's ``word`` list).
    """

    spans: np.ndarray
    prob: np.ndarray
    prob_raw: np.ndarray
    chunk: np.ndarray
    weight: np.ndarray
    forced: np.ndarray
    words: list[str]
    #: ``fast="onnx-exact"`` only: ``recheck(chunk_ids)`` returns these scores with the given
    #: chunks re-classified by the torch fp32 model
    recheck: Any = field(default=None, repr=False, compare=False)


@dataclass(eq=False)
class TokenClassifierCompressor(TextCompressor):
    """Keep the words a token classifier labels "keep" (LLMLingua-2).

    Args:
        model: token-classification model id or local path (e.g.
            ``microsoft/llmlingua-2-xlm-roberta-large-meetingbank`` when you have it locally), a
            loaded ``transformers`` model (pass ``classifier_tokenizer`` too), or ``None`` for
            ctxzip's distilled default (MiniLM, see :mod:`ctxzip.prompt.distill`).
        classifier_tokenizer: tokenizer of ``model`` when ``model`` is an object.
        mode: ``"global"`` - one ranking over the whole document, budget hit exactly;
            ``"chunk"`` - the anchor's per-chunk percentile threshold (same decisions as
            ``llmlingua``'s ``compress_prompt_llmlingua2``).
        word_scheme: how subword tokens join into words: ``"wordpiece"`` (BERT ``##``),
            ``"sentencepiece"`` (XLM-R ``▁``) or ``"auto"`` (from the tokenizer's vocabulary).
        token_to_word: ``"mean"`` (paper/anchor default) or ``"first"`` token probability.
        force_tokens: words always kept (probability 1.0), e.g. ``("\\n", "?", "!")``; line breaks
            are always preserved in the output.
        force_reserve_digit: keep every word containing a digit.
        drop_consecutive: drop a forced word that repeats the previous kept forced word with
            nothing kept in between (anchor's ``drop_consecutive``).
        chunk_end_tokens: tokens a chunk may end at (anchor default ``.`` and newline).
        max_seq_len: classifier window including ``[CLS]``/``[SEP]`` (anchor: 512).
        batch_size: chunks per forward pass (anchor: 50).
        fast: faster inference (CPU unless noted). ``"onnx-int8"`` - ONNX Runtime, fused
            attention, SmoothQuant-smoothed dynamic int8 matrix products (needs the ``fast``
            extra: ``pip install 'ctxzip[fast]'``; the converted graph is cached on disk);
            ``"onnx"`` - ONNX Runtime in fp32 (near-exact); ``"onnx-exact"`` (``mode="chunk"``
            only) - ONNX Runtime in fp32, and every chunk whose kept words could change if its
            probabilities moved by :data:`EXACT_MARGIN` is re-classified with torch fp32, so the
            decisions are those of ``fast=False``; ``"bf16"`` - torch bfloat16 (CPUs
            with AVX512-BF16/AMX, or CUDA); ``"int8"`` - torch dynamic int8 of every linear
            layer; ``True`` - ``"onnx-int8"`` when ONNX Runtime is installed and the device is
            the CPU, else ``"bf16"`` where supported, else ``"int8"``. Approximate modes can flip
            words whose probability sits next to the threshold (agreement with exact mode is
            measured in ``benchmarks/prompt_speed.py``).
        onnx_options: extra keyword arguments for
            :class:`ctxzip.prompt.onnx_backend.OnnxClassifier` in the ONNX modes, e.g.
            ``{"fp32_ffn_out": ()}`` to quantize every FFN output product or ``{"alpha": 0.5}``
            for another SmoothQuant strength (``quantize`` and ``threads`` are set by ``fast``).
        token_weights: what the percentile/budget counts per word: ``"target"`` - tokens of the
            counting (target-LM) tokenizer, like the anchor's GPT tokenizer; ``"classifier"`` -
            the classifier's own subword tokens.
        sentence_filter: global mode only: LLMLingua-1's budget controller in front of the word
            ranking (the same coarse stage as ``PerplexityCompressor(sentence_filter=True)``,
            which the default classifier is distilled from): sentences are ranked by the
            token-weighted mean keep probability of their words and kept, best first, until
            ``token_budget_ratio`` times the budget is used; words of the other sentences are
            ranked below every word of a kept sentence. ``None`` (default): on for ctxzip's
            distilled default classifier, off for any other model (plain LLMLingua-2).
        token_budget_ratio: sentence-stage budget as a multiple of the token budget.
        whitespace: how kept words are joined. ``"keep"`` (default) - two kept words that were
            neighbours keep the exact original whitespace between them (indentation, table
            padding, blank lines), and across dropped words a paragraph break, a line break
            plus the next word's indentation, or one space; ``"collapse"`` - the anchor's
            style, every gap becomes one space, line break or paragraph break. Keeping the
            layout costs budget tokens but preserves what the target LM sees of tables and
            code: on the held-out prose benchmark it raised the distilled default's context
            benefit by 5-8 points at the same token count (``docs/prompt.md``).
        return_word_labels: put ``words`` and ``word_labels`` (0/1) into ``result.details``.
        device: torch device (default: CUDA if present, else CPU).
        tokenizer: counting tokenizer for budgets and results (default: the target LM's).
    """

    model: Any = None
    classifier_tokenizer: Any = None
    mode: Literal["global", "chunk"] = "global"
    word_scheme: Literal["auto", "wordpiece", "sentencepiece"] = "auto"
    token_to_word: Literal["mean", "first"] = "mean"
    force_tokens: tuple[str, ...] = ()
    force_reserve_digit: bool = False
    drop_consecutive: bool = False
    chunk_end_tokens: tuple[str, ...] = (".", "\n")
    max_seq_len: int = 512
    batch_size: int = 50
    fast: bool | Literal["int8", "bf16", "onnx", "onnx-int8", "onnx-exact"] = False
    onnx_options: dict[str, Any] | None = None
    token_weights: Literal["target", "classifier"] = "target"
    sentence_filter: bool | None = None
    token_budget_ratio: float = 1.0
    whitespace: Literal["keep", "collapse"] = "keep"
    return_word_labels: bool = False
    device: Any = None
    tokenizer: Any = None
    _clf: Any = field(default=None, init=False, repr=False)
    _ort: Any = field(default=None, init=False, repr=False)
    _tables: Any = field(default=None, init=False, repr=False)

    name: ClassVar[str] = "lingua2"

    def __post_init__(self) -> None:
        if self.mode not in ("global", "chunk"):
            raise ValueError(f"mode must be 'global' or 'chunk', got {self.mode!r}")
        if self.word_scheme not in ("auto", "wordpiece", "sentencepiece"):
            raise ValueError(f"word_scheme must be 'auto', 'wordpiece' or 'sentencepiece', got {self.word_scheme!r}")
        if self.token_to_word not in ("mean", "first"):
            raise ValueError(f"token_to_word must be 'mean' or 'first', got {self.token_to_word!r}")
        if self.whitespace not in ("keep", "collapse"):
            raise ValueError(f"whitespace must be 'keep' or 'collapse', got {self.whitespace!r}")
        if not (isinstance(self.fast, bool) or self.fast in FAST_MODES):
            raise ValueError(f"fast must be True, False or one of {FAST_MODES}, got {self.fast!r}")
        if self.fast == "onnx-exact" and self.mode != "chunk":
            raise ValueError(
                "fast='onnx-exact' certifies the per-chunk percentile decisions of mode='chunk'; "
                "use fast='onnx' (near-exact) or fast=False with mode='global'"
            )
        if self.fast in ("onnx", "onnx-int8", "onnx-exact"):
            from ctxzip.prompt.onnx_backend import onnxruntime_available

            if not onnxruntime_available():
                raise ImportError(
                    f"fast={self.fast!r} needs ONNX Runtime, which is not installed: "
                    "pip install 'ctxzip[fast]' (or use fast='bf16' / 'int8')"
                )
        if self.onnx_options is not None:
            if not isinstance(self.onnx_options, dict):
                raise TypeError(f"onnx_options must be a dict of OnnxClassifier keyword arguments, got {self.onnx_options!r}")
            import inspect

            from ctxzip.prompt.onnx_backend import OnnxClassifier

            allowed = set(inspect.signature(OnnxClassifier.__init__).parameters) - {"self", "model", "tokenizer", "quantize", "threads"}
            bad = sorted(set(self.onnx_options) - allowed)
            if bad:
                raise ValueError(f"unknown onnx_options {bad}; allowed: {sorted(allowed)}")
        if self.token_weights not in ("target", "classifier"):
            raise ValueError(f"token_weights must be 'target' or 'classifier', got {self.token_weights!r}")
        for nm in ("max_seq_len", "batch_size"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive integer, got {v!r}")
        if isinstance(self.token_budget_ratio, bool) or not isinstance(self.token_budget_ratio, (int, float)) \
                or not math.isfinite(self.token_budget_ratio) or self.token_budget_ratio < 1.0:
            raise ValueError(f"token_budget_ratio must be a number >= 1, got {self.token_budget_ratio!r}")
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be at least 8, got {self.max_seq_len}")
        if isinstance(self.force_tokens, str):
            raise TypeError("force_tokens must be a list of strings, not a single string")
        self.force_tokens = tuple(ensure_text(t, name="force_tokens item") for t in self.force_tokens)
        self.chunk_end_tokens = tuple(self.chunk_end_tokens)
        if self.model is not None and not isinstance(self.model, str) and self.classifier_tokenizer is None:
            raise ValueError("pass classifier_tokenizer=... together with a loaded model object")
        TextCompressor.__init__(self, self.tokenizer)

    # ------------------------------------------------------------------ model
    def classifier(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of the token classifier, loaded on first use."""
        if self._clf is None:
            import torch

            from ctxzip.models import resolve_device

            if self.model is None:
                from ctxzip.prompt.distill import load_default_classifier

                model, tok = load_default_classifier()
            elif isinstance(self.model, str):
                model, tok = _load_token_classifier(self.model)
            else:
                model, tok = self.model, self.classifier_tokenizer
            if not getattr(tok, "is_fast", False):
                raise ValueError("the classifier's tokenizer must be a fast tokenizer (offsets are needed)")
            dev = resolve_device(self.device)
            model = model.to(dev).eval()
            kind = self.fast
            if kind is True:
                from ctxzip.prompt.onnx_backend import onnxruntime_available

                if dev.type == "cpu" and onnxruntime_available():
                    kind = "onnx-int8"
                else:
                    kind = "bf16" if _bf16_ok(dev) else "int8"
            if kind in ("onnx", "onnx-int8", "onnx-exact"):
                if dev.type != "cpu":
                    raise ValueError(f"fast={kind!r} runs on CPU only; use fast='bf16' on GPU")
                from ctxzip.prompt.onnx_backend import OnnxClassifier

                self._ort = OnnxClassifier(model, tok, quantize=kind == "onnx-int8", threads=torch.get_num_threads(),
                                           **(self.onnx_options or {}))
            elif kind == "bf16" and _bf16_ok(dev):
                model = model.to(torch.bfloat16)
            elif kind == "int8":
                if dev.type != "cpu":
                    raise ValueError("fast='int8' (dynamic int8 quantization) runs on CPU only; use fast='bf16'")
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            self._clf = (model, tok)
        return self._clf

    def __getstate__(self) -> dict[str, Any]:
        if not (self.model is None or isinstance(self.model, str)):
            raise TypeError("a TokenClassifierCompressor holding a model object cannot be pickled; pass its path")
        d = dict(self.__dict__)
        d["_clf"] = None
        d["_ort"] = None
        d["_tables"] = None
        return d

    def _vocab_tables(self) -> dict[str, Any]:
        """Per-vocabulary lookup tables: continuation, special, digit, chunk-end flags."""
        if self._tables is None:
            _, tok = self.classifier()
            vocab = tok.get_vocab()
            size = max(max(vocab.values()) + 1, len(tok))
            toks = [""] * size
            for t, i in vocab.items():
                toks[i] = t
            scheme = self.word_scheme
            if scheme == "auto":
                n_hash = sum(t.startswith("##") for t in toks)
                n_sp = sum(t.startswith("\u2581") for t in toks)
                scheme = "wordpiece" if n_hash >= n_sp else "sentencepiece"
            if scheme == "wordpiece":
                cont = np.array([t.startswith("##") for t in toks])
                pure = [t[2:] if t.startswith("##") else t for t in toks]
            else:
                punct = set(string.punctuation)
                cont = np.array([not (t.startswith("\u2581") or t in punct) for t in toks])
                pure = [t.lstrip("\u2581") for t in toks]
            special = np.zeros(size, dtype=bool)
            special[[i for i in tok.all_special_ids if i < size]] = True
            digit = np.array([bool(re.search(r"\d", t)) for t in toks])
            end = np.zeros(size, dtype=bool)
            for c in self.chunk_end_tokens:
                if c in vocab:
                    end[vocab[c]] = True
                if scheme == "sentencepiece" and "\u2581" + c in vocab:
                    end[vocab["\u2581" + c]] = True
            force = np.zeros(size, dtype=bool)
            fset = set(self.force_tokens)
            if fset:
                force = np.array([p in fset for p in pure])
            self._tables = {
                "scheme": scheme, "cont": cont, "special": special, "digit": digit,
                "end": end, "force": force, "pure": pure,
            }
        return self._tables

    # ------------------------------------------------------------------ pipeline
    def chunk(self, ids: np.ndarray) -> list[tuple[int, int]]:
        """Anchor's ``__chunk_context`` on token ids: ``[start, end)`` token ranges of at most
        ``max_seq_len - 1`` tokens, each ending at the last chunk-end token of its window."""
        end_flag = self._vocab_tables()["end"][ids]
        max_len = self.max_seq_len - 2
        n = len(ids)
        out: list[tuple[int, int]] = []
        st = 0
        while st < n:
            if st + max_len > n - 1:
                out.append((st, n))
                break
            ed = st + max_len
            # last chunk-end token in (st, ed]; anchor scans j = 0..ed-st-1, i.e. ed down to st+1
            hits = np.flatnonzero(end_flag[st + 1 : ed + 1])
            if hits.size:
                ed = st + 1 + int(hits[-1])
            out.append((st, ed + 1))
            st = ed + 1
        return out

    def _token_probs(self, ids: np.ndarray, chunks: list[tuple[int, int]], *, use_torch: bool = False) -> np.ndarray:
        """Keep probability of every token (``[CLS] chunk [SEP]`` per chunk; tokens outside
        ``chunks`` get 0). ``use_torch`` skips ONNX Runtime (the ``onnx-exact`` re-check).

        torch: chunks are batched (``batch_size``), sorted by length and padded only to the
        longest of their batch (the anchor pads all to ``max_seq_len``). ONNX Runtime: each
        chunk is one unpadded call, and the calls are spread over the worker threads
        (:meth:`ctxzip.prompt.onnx_backend.OnnxClassifier.map`)."""
        import torch

        model, tok = self.classifier()
        dev = next(model.parameters()).device
        cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        probs = np.zeros(len(ids), dtype=np.float64)
        order = sorted(range(len(chunks)), key=lambda i: -(chunks[i][1] - chunks[i][0]))
        seqs = []
        for i in range(len(chunks)):
            a, b = chunks[i]
            s = ([cls_id] if cls_id is not None else []) + ids[a:b].tolist() + ([sep_id] if sep_id is not None else [])
            seqs.append(s[: self.max_seq_len])  # anchor truncates (a 511-token chunk loses [SEP])
        off = 1 if cls_id is not None else 0
        dtype = next(model.parameters()).dtype
        from tqdm.auto import tqdm

        bs = self.batch_size
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]

        def put(bidx: list[int], p: np.ndarray) -> None:
            for r, i in enumerate(bidx):
                a, b = chunks[i]
                n_in = min(b - a, self.max_seq_len - off)
                probs[a : a + n_in] = p[r, off : off + n_in]
                if n_in < b - a:  # cannot happen with the anchor's chunking; be safe
                    probs[a + n_in : b] = p[r, off + n_in - 1]

        if self._ort is not None and not use_torch:
            with tqdm(total=len(order), desc="classify", unit="chunk", disable=len(order) < 8, leave=False) as bar:
                outs = self._ort.map([seqs[i] for i in order], progress=bar)
            for i, p in zip(order, outs):
                put([i], p[None, :].astype(np.float64))
            return probs
        bar = tqdm(batches, desc="classify", unit="chunk" if bs == 1 else "batch", disable=len(batches) < 8, leave=False)
        with torch.inference_mode():
            for bidx in bar:
                if len(bidx) == 1:
                    out = model(input_ids=torch.tensor([seqs[bidx[0]]], device=dev))
                else:
                    L = max(len(seqs[i]) for i in bidx)
                    x = torch.full((len(bidx), L), pad_id, dtype=torch.long)
                    m = torch.zeros((len(bidx), L), dtype=torch.long)
                    for r, i in enumerate(bidx):
                        x[r, : len(seqs[i])] = torch.tensor(seqs[i])
                        m[r, : len(seqs[i])] = 1
                    out = model(input_ids=x.to(dev), attention_mask=m.to(dev))
                logits = out.logits.float() if dtype == torch.bfloat16 else out.logits
                put(bidx, torch.softmax(logits, dim=-1)[..., 1].cpu().numpy().astype(np.float64))
        return probs

    def score_words(self, text: str) -> WordScores:
        """Classify ``text`` and merge token probabilities into word probabilities."""
        _, tok = self.classifier()
        self._vocab_tables()
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        if ids.size == 0:
            z = np.zeros(0)
            return WordScores(np.zeros((0, 2), dtype=np.int64), z, z, z.astype(np.int64), z.astype(np.int64), z.astype(bool), [])
        chunks = self.chunk(ids)
        tprob = self._token_probs(ids, chunks)
        ws = self._merge_words(text, ids, offs, chunks, tprob)
        if self.fast == "onnx-exact":

            def recheck(chunk_ids: Any, _tp: np.ndarray = tprob) -> WordScores:
                sub = [chunks[int(c)] for c in sorted(set(int(c) for c in chunk_ids))]
                tp = _tp.copy()
                fresh = self._token_probs(ids, sub, use_torch=True)
                for a, b in sub:
                    tp[a:b] = fresh[a:b]
                return self._merge_words(text, ids, offs, chunks, tp)

            ws.recheck = recheck
        return ws

    def _merge_words(
        self, text: str, ids: np.ndarray, offs: np.ndarray, chunks: list[tuple[int, int]], tprob: np.ndarray
    ) -> WordScores:
        """Token probabilities -> :class:`WordScores` (word merging, forcing, weights)."""
        _, tok = self.classifier()
        tb = self._vocab_tables()
        chunk_of = np.zeros(len(ids), dtype=np.int64)
        starts = np.zeros(len(ids), dtype=bool)
        for ci, (a, b) in enumerate(chunks):
            chunk_of[a:b] = ci
            starts[a] = True
        valid = ~tb["special"][ids] | (ids == (tok.unk_token_id if tok.unk_token_id is not None else -1))
        begin = (~tb["cont"][ids] | tb["force"][ids] | starts) & valid
        # a continuation directly after a dropped special token starts a word
        first_valid = valid & ~np.concatenate([[False], valid[:-1]])
        begin |= first_valid
        ids_v, offs_v, prob_v, chunk_v, begin_v = ids[valid], offs[valid], tprob[valid], chunk_of[valid], begin[valid]
        wid = np.cumsum(begin_v) - 1
        n_w = int(wid[-1]) + 1 if wid.size else 0
        ntok = np.bincount(wid, minlength=n_w)
        # forcing (anchor: force tokens and digit tokens get probability 1.0)
        forced_tok = tb["force"][ids_v] & begin_v
        p_forced = np.where(forced_tok, 1.0, prob_v)
        if self.force_reserve_digit:
            p_forced = np.where(tb["digit"][ids_v], 1.0, p_forced)
        first_idx = np.flatnonzero(begin_v)
        if self.token_to_word == "mean":
            prob = np.bincount(wid, weights=p_forced, minlength=n_w) / ntok
            prob_raw = np.bincount(wid, weights=prob_v, minlength=n_w) / ntok
        else:
            prob, prob_raw = p_forced[first_idx], prob_v[first_idx]
        spans = np.stack([offs_v[first_idx, 0], np.maximum.reduceat(offs_v[:, 1], first_idx)], axis=1)
        wchunk = chunk_v[first_idx]
        need_words = self.return_word_labels or self.drop_consecutive or bool(self.force_tokens)
        words = self._words(ids_v, begin_v, first_idx) if need_words else []
        forced = forced_tok[first_idx] | self._force_by_text(text, spans, words)
        prob = np.where(forced, 1.0, prob)
        if self.token_weights == "classifier":
            weight = ntok.astype(np.int64)
        else:
            weight = self._target_weights(text, spans)
        return WordScores(spans, prob, prob_raw, wchunk, weight, forced, words)

    def _words(self, ids_v: np.ndarray, begin_v: np.ndarray, first_idx: np.ndarray) -> list[str]:
        """Word strings as the classifier spells them (anchor's ``words``)."""
        _, tok = self.classifier()
        tb = self._vocab_tables()
        pure = tb["pure"]
        raw = tok.convert_ids_to_tokens(ids_v.tolist())
        if tb["scheme"] == "sentencepiece":
            raw = [r.lstrip("\u2581") for r in raw]
        pieces = [("\x00" + r) if b else pure[i] for r, b, i in zip(raw, begin_v.tolist(), ids_v.tolist())]
        return "".join(pieces).split("\x00")[1:]

    def _force_by_text(self, text: str, spans: np.ndarray, words: list[str]) -> np.ndarray:
        """Words equal to a force token, or covered exactly by a multi-word force token."""
        forced = np.zeros(len(spans), dtype=bool)
        if not self.force_tokens:
            return forced
        fset = set(self.force_tokens)
        surface = [text[a:b] for a, b in spans.tolist()]
        forced |= np.array([s in fset or w in fset for s, w in zip(surface, words)])
        ws, we = spans[:, 0], spans[:, 1]
        for f in self.force_tokens:
            if not f.strip() or f in surface:
                continue
            for m in re.finditer(re.escape(f), text):
                i = int(np.searchsorted(ws, m.start()))
                j = int(np.searchsorted(we, m.end()))
                if i < len(ws) and ws[i] == m.start() and j < len(we) and we[j] == m.end():
                    forced[i : j + 1] = True
        return forced

    def _target_weights(self, text: str, spans: np.ndarray) -> np.ndarray:
        tk = self.counter.tokenizer
        surface = [text[a:b] for a, b in spans.tolist()]
        if not surface:
            return np.zeros(0, dtype=np.int64)
        enc = tk(surface, add_special_tokens=False)["input_ids"]
        return np.asarray([max(len(e), 1) for e in enc], dtype=np.int64)

    # ------------------------------------------------------------------ selection
    def _select_chunk(self, ws: WordScores, reduce_rate: float, margin: float | None = None) -> np.ndarray:
        """Anchor's per-chunk percentile decisions.

        With ``margin`` (``fast="onnx-exact"``), chunks whose decisions could change if every
        probability moved by ``margin`` (:meth:`_fragile`) are re-classified with torch
        (``ws.recheck``) and decided again."""
        keep = np.zeros(len(ws.prob), dtype=bool)
        if reduce_rate <= 0:
            return ~keep
        q1 = int(100 * reduce_rate)
        q2 = int(100 * reduce_rate + 1)
        bounds = np.flatnonzero(np.diff(ws.chunk)) + 1
        near: list[int] = []
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(ws.prob)]):
            p = ws.prob[a:b].copy()
            if p.size == 0:
                continue
            if self.drop_consecutive:
                t1 = np.percentile(p, q1)
                if margin is not None and self._fragile(p, t1, ws.forced[a:b], margin):
                    near.append(int(ws.chunk[a]))
                p = self._zero_consecutive(p, ws.forced[a:b], ws.words[a:b], t1)
            w = ws.weight[a:b]
            if w.sum() == 0:
                continue
            thr = np.percentile(np.repeat(p, w), q2)
            keep[a:b] = (p > thr) | ((thr == 1.0) & (p == thr))
            if margin is not None and self._fragile(p, thr, ws.forced[a:b], margin):
                near.append(int(ws.chunk[a]))
        if near and ws.recheck is not None:
            return self._select_chunk(ws.recheck(near), reduce_rate)
        return keep

    @staticmethod
    def _fragile(p: np.ndarray, thr: float, forced: np.ndarray, margin: float) -> bool:
        """Could probabilities each off by at most ``margin`` change the words kept by
        ``p > thr``? A percentile threshold lies between two order statistics, so the decisions
        only depend on which words sit above the boundary: they hold unless the lowest word above
        and the highest word at or below it are within ``2 * margin`` of each other (or the
        threshold is about 1.0, where the anchor's ``p == thr`` rule decides)."""
        above = p > thr
        if above.any() and not above.all() and p[above].min() - p[~above].max() <= 2 * margin:
            return True
        return bool(thr >= 1.0 - 2 * margin and np.any(~forced & (p >= 1.0 - 2 * margin)))

    @staticmethod
    def _zero_consecutive(p: np.ndarray, forced: np.ndarray, words: list[str], thr: float) -> np.ndarray:
        """Anchor's drop_consecutive pre-pass: a forced word equal to the previous forced word,
        with no word above ``thr`` between them, gets probability 0."""
        fi = np.flatnonzero(forced)
        if fi.size < 2:
            return p
        content = np.cumsum(~forced & (p > thr))
        between = content[fi[1:]] - content[fi[:-1]]
        same = np.array([words[i] == words[j] for i, j in zip(fi[1:], fi[:-1])])
        p = p.copy()
        p[fi[1:][(between == 0) & same]] = 0.0
        return p

    def _select_global(self, ws: WordScores, k_units: int) -> np.ndarray:
        """Rank every word of the document together; a word counts ``weight`` units."""
        units = np.repeat(ws.prob, ws.weight)
        owner = np.repeat(np.arange(len(ws.prob)), ws.weight)
        fk = np.repeat(ws.forced, ws.weight)
        m = topk_mask(units, int(k_units), force_keep=fk if fk.any() else None)
        sel = np.bincount(owner, weights=m, minlength=len(ws.prob))
        return sel >= ws.weight  # a word is kept when all its units are (never over budget)

    def _drop_repeated_forced(self, ws: WordScores, keep: np.ndarray) -> np.ndarray:
        """Anchor: a kept forced word equal to the previous kept word is dropped."""
        if not self.drop_consecutive or not ws.forced.any():
            return keep
        idx = np.flatnonzero(keep)
        if idx.size < 2:
            return keep
        kw = [ws.words[i] for i in idx]
        dup = np.array([False] + [kw[i] == kw[i - 1] for i in range(1, len(kw))])
        keep = keep.copy()
        keep[idx[dup & ws.forced[idx]]] = False
        return keep

    def select(self, ws: WordScores, budget: Budget, n_tokens: int) -> np.ndarray:
        """Keep mask over words for ``budget`` (``n_tokens`` = text length in counting tokens)."""
        if budget.rate is not None:
            rate = budget.rate
        else:
            rate = min(1.0, budget.resolve(n_tokens) / max(n_tokens, 1))
        if self.mode == "chunk":
            margin = EXACT_MARGIN if ws.recheck is not None else None
            keep = self._select_chunk(ws, max(0.0, 1.0 - rate), margin)
        else:
            total = int(ws.weight.sum())
            if self.token_weights == "classifier" and budget.rate is not None:
                k = budget.resolve(total)
            else:
                k = int(math.floor(total * budget.resolve(n_tokens) / max(n_tokens, 1) + 1e-9))
            if self.drop_consecutive:
                p = self._zero_consecutive(ws.prob, ws.forced, ws.words, float(np.percentile(ws.prob, int(100 * (1 - rate)))))
                ws = WordScores(ws.spans, p, ws.prob_raw, ws.chunk, ws.weight, ws.forced & (p > 0), ws.words)
            keep = self._select_global(ws, k)
        return self._drop_repeated_forced(ws, keep)

    def _fit_budget(self, text: str, ws: WordScores, keep: np.ndarray, out: str, target: int) -> tuple[np.ndarray, str]:
        """Global mode: separators (line breaks, spaces) and tokenization across word
        boundaries make the rendered text's token count differ from the sum of word weights;
        bisect the number of kept units so the output has at most ``target`` counting tokens
        and as many as possible."""
        count = self.counter.count
        n_out = count(out)
        if n_out == target:
            return keep, out
        total = int(ws.weight.sum())
        k0 = int(ws.weight[keep].sum())
        # bracket: lo fits (<= target), hi does not
        if n_out > target:
            hi, lo = k0, 0
            best = (np.zeros_like(keep), "")
        else:
            lo, hi = k0, total + 1
            best = (keep, out)
        for _ in range(14):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            kp = self._drop_repeated_forced(ws, self._select_global(ws, mid))
            o = self.render(text, ws.spans, kp)
            if count(o) <= target:
                lo, best = mid, (kp, o)
            else:
                hi = mid
        return best

    def _sentence_stage(self, text: str, ws: WordScores, target: int) -> tuple[WordScores, tuple[int, int]]:
        """Coarse stage (LLMLingua-1 ``control_sentence_budget``): keep sentences by decreasing
        mean keep probability up to ``token_budget_ratio * target`` tokens (the crossing
        sentence included); words outside them are ranked below all words inside."""
        from ctxzip.prompt.perplexity import split_sentences

        spans = split_sentences(text)
        starts = np.asarray([a for a, _ in spans])
        sent = np.clip(np.searchsorted(starts, ws.spans[:, 0], side="right") - 1, 0, len(spans) - 1)
        w = ws.weight.astype(np.float64)
        cnt = np.bincount(sent, weights=w, minlength=len(spans))
        mean = np.where(cnt > 0, np.bincount(sent, weights=ws.prob_raw * w, minlength=len(spans)) / np.maximum(cnt, 1e-9), -np.inf)
        keep = fill_until(mean, cnt, float(math.ceil(target * self.token_budget_ratio)))
        prob = np.where(keep[sent] | ws.forced, ws.prob, ws.prob - 2.0)
        out = WordScores(ws.spans, prob, ws.prob_raw, ws.chunk, ws.weight, ws.forced, ws.words)
        return out, (len(spans), int(keep.sum()))

    def render(self, text: str, spans: np.ndarray, keep: np.ndarray) -> str:
        """Join the kept words of ``text`` (``spans``: character spans of all words) with the
        whitespace policy of ``self.whitespace``."""
        return render_words(text, spans, keep, whitespace=self.whitespace)

    def _compress(
        self, text: str, *, budget: Budget, n_tokens: int, query: str | None, **_: Any
    ) -> CompressionResult:
        t0 = time.perf_counter()
        ws = self.score_words(text)
        t1 = time.perf_counter()
        use_sf = self.sentence_filter if self.sentence_filter is not None else self.model is None
        n_sent = None
        if use_sf and self.mode == "global" and len(ws.prob):
            ws, n_sent = self._sentence_stage(text, ws, budget.resolve(n_tokens))
        keep = self.select(ws, budget, n_tokens)
        out = self.render(text, ws.spans, keep)
        if self.mode == "global":
            keep, out = self._fit_budget(text, ws, keep, out, budget.resolve(n_tokens))
        t2 = time.perf_counter()
        details: dict[str, Any] = {"mode": self.mode, "words": len(ws.prob), "kept_words": int(keep.sum())}
        if n_sent is not None:
            details["sentences"], details["kept_sentences"] = n_sent
        if self.return_word_labels:
            details["words"] = ws.words
            details["word_labels"] = keep.astype(int).tolist()
        return CompressionResult(
            out, n_tokens, 0, kept=keep, details=details,
            timings={"classify": t1 - t0, "select": t2 - t1},
        )

    # ------------------------------------------------------------------ contexts
    def compress_contexts(
        self,
        contexts: list[str],
        *,
        budget: Budget | float | int,
        context_budget: Budget | float | None = None,
        force_context_ids: list[int] | None = None,
        use_token_level_filter: bool = True,
        separator: str = "\n\n",
    ) -> CompressionResult:
        """Anchor's coarse-to-fine path (``use_context_level_filter=True``).

        Each context is scored by the mean keep probability of its words (before forcing);
        contexts at or above the ``int(100 * (1 - context_rate))``-th percentile are kept (and
        ``force_context_ids``), with ``context_rate`` from ``context_budget`` or, by default,
        ``(rate + 1) / 2`` (anchor). The kept contexts are then compressed to ``budget`` overall.
        """
        if not isinstance(contexts, (list, tuple)) or not contexts:
            raise ValueError("contexts must be a non-empty list of strings")
        contexts = [ensure_text(c, name=f"contexts[{i}]") for i, c in enumerate(contexts)]
        b = check_budget(budget)
        sizes = np.asarray([self.counter.count(c) for c in contexts])
        n_total = int(sizes.sum())
        target = b.resolve(n_total)
        rate = target / max(n_total, 1)
        scores = [self.score_words(c) if c.strip() else None for c in contexts]
        keep_ctx = np.ones(len(contexts), dtype=bool)
        if len(contexts) > 1:
            if context_budget is None:
                c_rate = (rate + 1.0) / 2.0 if use_token_level_filter else rate
            else:
                cb = check_budget(context_budget)
                c_rate = cb.rate if cb.rate is not None else min(1.0, cb.resolve(n_total) / max(n_total, 1))
            def context_keep(scores: list) -> np.ndarray:
                cp = np.asarray([float(ws.prob_raw.mean()) if ws is not None and len(ws.prob_raw) else 0.0
                                 for ws in scores])
                return cp >= np.percentile(cp, int(100 * (1 - c_rate))), cp

            keep_ctx, cp = context_keep(scores)
            if (self.fast == "onnx-exact" and keep_ctx.any() and not keep_ctx.all()
                    and cp[keep_ctx].min() - cp[~keep_ctx].max() <= 2 * EXACT_MARGIN):
                # a context mean is within the ONNX/torch bound of the cut (the decision depends
                # only on the order of the means): re-classify every context with torch
                scores = [None if ws is None else ws.recheck(np.unique(ws.chunk)) for ws in scores]
                keep_ctx, cp = context_keep(scores)
            for i in force_context_ids or []:
                if not 0 <= i < len(contexts):
                    raise ValueError(f"force_context_ids has {i}, but there are {len(contexts)} contexts")
                keep_ctx[i] = True
        n_res = int(sizes[keep_ctx].sum())
        sub_rate = min(1.0, target / max(n_res, 1))
        outs, labels = [], []
        for c, ws, k, n in zip(contexts, scores, keep_ctx, sizes):
            if not k:
                labels.append(np.zeros(0 if ws is None else len(ws.prob), dtype=bool))
                continue
            if ws is None or not use_token_level_filter or sub_rate >= 1.0:
                outs.append(c)
                labels.append(np.ones(0 if ws is None else len(ws.prob), dtype=bool))
                continue
            kb = Budget(rate=sub_rate)
            keep = self.select(ws, kb, int(n))
            outs.append(self.render(c, ws.spans, keep))
            labels.append(keep)
        text = separator.join(outs)
        res = CompressionResult(
            text, n_total, self.counter.count(text), method=self.name,
            kept=np.concatenate(labels) if labels else np.zeros(0, dtype=bool),
            details={"kept_contexts": np.flatnonzero(keep_ctx).tolist()},
        )
        return res


def render_words(text: str, spans: np.ndarray, keep: np.ndarray, *, whitespace: str = "keep") -> str:
    """Join kept words with the whitespace between them.

    Neighbours in the original (nothing dropped between them) keep their exact gap with
    ``whitespace="keep"``; otherwise, and for every gap with ``"collapse"``, the gap becomes a
    paragraph break, a line break (followed by the next word's indentation under ``"keep"``),
    a space, or nothing (for words that touched in the original and stay neighbours)."""
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return ""
    s = spans[idx]
    prev_end = np.r_[s[0, 0], s[:-1, 1]]
    # did any dropped word sit between consecutive kept words?
    gap_dropped = np.r_[False, np.diff(idx) > 1]
    exact = whitespace == "keep"
    parts: list[str] = []
    for (a, b), pe, gd in zip(s.tolist(), prev_end.tolist(), gap_dropped.tolist()):
        gap = text[pe:a]
        if exact and not gd:
            sep = gap
        elif "\n\n" in gap:
            sep = "\n\n"
        elif "\n" in gap:
            sep = "\n"
        elif gap and (gap.isspace() or gd) or gd:
            sep = " "
        else:
            sep = ""
        if exact and gd and sep.startswith("\n"):
            indent = text[text.rfind("\n", 0, a) + 1 : a]
            if indent.isspace():
                sep += indent
        parts.append(sep)
        parts.append(text[a:b])
    parts[0] = ""
    return "".join(parts)


def _bf16_ok(dev: Any) -> bool:
    import torch

    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.backends.mkldnn.is_available()) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - older torch
        return False


def _load_token_classifier(name: str) -> tuple[Any, Any]:
    """Load a token-classification model and its tokenizer by id or path (offline first)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from ctxzip.models import ModelNotFoundError

    errs = []
    for local in (True, False):
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local)
            model = AutoModelForTokenClassification.from_pretrained(name, local_files_only=local)
            return model, tok
        except (OSError, ValueError) as e:  # missing locally / no network
            errs.append(e)
    raise ModelNotFoundError(
        f"cannot load token classifier {name!r}: not a local directory with a "
        f"token-classification model, and the hub is unreachable ({errs[-1]}). "
        f"Use TokenClassifierCompressor() for the packaged default."
    )
