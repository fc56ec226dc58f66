"""Perplexity-based prompt compression: LLMLingua-1 and LongLLMLingua.

LLMLingua (Jiang et al., EMNLP 2023, arXiv 2310.05736) drops the tokens a small causal LM finds
least surprising. Its token-level step ("iterative token-level prompt compression", ITPC) walks
over the prompt in windows of ``iterative_size`` tokens: each window is scored with the
self-information ``-log p(x_i | kept prefix)`` **conditioned on the already compressed prefix**
(the KV cache holds only the kept tokens), the least informative tokens of the window are
dropped, and the kept ones are appended to the cache before the next window is scored.

LongLLMLingua (Jiang et al., ACL 2024, arXiv 2310.06839) makes this question-aware:

* coarse: contexts are ranked by the perplexity of the question given each context (lower =
  more relevant; the anchor appends "We can get the answer to this question in the given
  documents." to the question), and low-ranked contexts are dropped first;
* fine: "contrastive perplexity" ``s_i = loss(x_i | prefix) - loss(x_i | question, prefix)``,
  the information the question adds about each token; high ``s_i`` is kept.

LLMLingua's budget controller (``sentence_filter=True``; anchor ``use_sentence_level_filter=True``,
``control_sentence_budget``) puts a coarse stage in front: sentences are ranked by their mean
score and kept, best first, until ``token_budget_ratio`` x the budget is used; ITPC then trims the
kept sentences to the exact budget. With a small target LM this coarse-then-fine configuration
at ``token_budget_ratio=1.0`` is by far the best one (``benchmarks/prompt_quality.py``): every
token the fine stage drops makes the text harder for the reader, whole sentences do not.

This file follows the reference implementation (``llmlingua`` 0.2.2,
``PromptCompressor.iterative_compress_prompt`` / ``get_compressed_input`` / ``get_rank_results`` /
``control_sentence_budget``) with these deliberate differences, all documented in
``docs/prompt.md``:

1. The anchor keeps token ``i`` when the loss of token ``i + 1`` clears the threshold: ``get_ppl``
   returns ``loss[j] = -log p(x_{j+1} | x_<=j)``, ``iterative_compress_prompt`` stores it at
   ``past_loss[j]`` and ``get_compressed_input`` keeps ``need_idx = concat([loss > thr, [True]])``,
   so ``need_idx[j]`` (token ``j``) is decided by token ``j + 1``'s loss. Here each token is judged
   by its own self-information ``-log p(x_i | x_<i)`` (logits at ``i - 1``), the paper's
   definition (checked against recomputation from scratch in the tests).
4. The coarse stage scores a sentence by the mean self-information of its tokens *in the
   document* (one forward pass, the same scores the fine stage starts from); the anchor scores
   every sentence on its own (``get_ppl(sentence)``, no preceding text).
2. The anchor thresholds each window at a percentile of *all* losses seen so far; here the
   budget is split over windows with :func:`ctxzip.budget.allocate` (same rate in every window)
   and each window keeps its top tokens with :func:`ctxzip.budget.topk_mask`, so the budget in
   target-LM tokens is hit exactly.
3. Beyond ``max_context`` cached tokens the anchor deletes the oldest cache entries in place
   (RoPE positions then repeat); here the cache is rebuilt from the document start plus the
   most recent half of the kept tokens, so positions stay consistent.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from ctxzip._hf_compat import cache_from_output, with_cache
from ctxzip.budget import Budget, allocate, fill_until, knapsack, topk_mask
from ctxzip.compressor import CompressionResult, TextCompressor, check_budget, ensure_text

__all__ = ["PerplexityCompressor", "split_sentences"]


#: suffix LongLLMLingua appends to the question when ranking contexts (anchor:
#: ``get_rank_results(..., rank_method="longllmlingua")``).
#: memo of full-prefix scores (see ``token_scores``), oldest first, at most 8 entries.
_FULL_SCORES: dict[tuple[Any, ...], tuple[Any, np.ndarray]] = {}

RANK_SUFFIX = " We can get the answer to this question in the given documents."


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences: text up to ``.``/``!``/``?`` followed by whitespace, or up
    to a newline. Spans cover the text without gaps (whitespace stays with the sentence before)."""
    spans: list[tuple[int, int]] = []
    pos, n = 0, len(text)
    pat = re.compile(r"[.!?]+(?=\s)|\n")
    while pos < n:
        m = pat.search(text, pos)
        end = n if m is None else m.end()
        # swallow following whitespace into this sentence
        while end < n and text[end].isspace():
            end += 1
        spans.append((pos, end))
        pos = end
    return spans


@dataclass(eq=False)
class PerplexityCompressor(TextCompressor):
    """Drop the tokens a causal LM finds least informative (LLMLingua / LongLLMLingua).

    Args:
        model: causal LM id or local path (default: the offline SmolLM2-135M-Instruct), or a
            loaded ``transformers`` model (then pass ``lm_tokenizer``).
        lm_tokenizer: tokenizer of ``model`` when ``model`` is an object.
        iterative_size: tokens per window of the iterative compression (anchor default 200).
            Smaller windows condition each decision on a more up-to-date compressed prefix and
            cost more forward passes.
        unit: ``"token"`` (LLMLingua's token-level ITPC) or ``"sentence"`` (LLMLingua's
            sentence-level filter: sentences ranked by their mean score and chosen with
            :func:`ctxzip.budget.knapsack` under the token budget).
        sentence_filter: with ``unit="token"``, run LLMLingua's budget controller first
            (anchor ``use_sentence_level_filter=True``, ``control_sentence_budget``): sentences
            are ranked by their mean token score (most informative first) and kept, in rank
            order, until ``token_budget_ratio`` times the token budget is used (the sentence
            that crosses it is kept, as in the anchor); the token-level ITPC then compresses the
            kept sentences to the exact budget. Coarse-then-fine keeps whole sentences intact
            where the budget allows, which is what keeps the text readable for the target LM.
        token_budget_ratio: sentence-stage budget as a multiple of the final token budget
            (anchor default 1.4); the token stage removes the rest.
        contrastive: with a query, score tokens by LongLLMLingua's contrastive perplexity
            ``loss(x|prefix) - loss(x|query, prefix)``; when ``False`` a query only conditions the
            loss (``loss(x|query, prefix)``, LLMLingua's "before" condition).
        max_context: most tokens kept in the LM's cache (compressed prefix); beyond that the
            cache is rebuilt from the most recent half (the anchor's ``max_position_embeddings``
            handling, done without repeating positions).
        device: torch device (default: CUDA if present, else CPU).
        tokenizer: counting tokenizer for the budget/result (default: the target LM's).
    """

    model: Any = None
    lm_tokenizer: Any = None
    iterative_size: int = 200
    unit: Literal["token", "sentence"] = "token"
    sentence_filter: bool = False
    token_budget_ratio: float = 1.4
    contrastive: bool = True
    max_context: int = 4096
    device: Any = None
    tokenizer: Any = None
    _lm: Any = field(default=None, init=False, repr=False)

    name: ClassVar[str] = "perplexity"

    def __post_init__(self) -> None:
        if isinstance(self.iterative_size, bool) or not isinstance(self.iterative_size, int) or self.iterative_size < 1:
            raise ValueError(f"iterative_size must be a positive integer, got {self.iterative_size!r}")
        if self.unit not in ("token", "sentence"):
            raise ValueError(f"unit must be 'token' or 'sentence', got {self.unit!r}")
        if isinstance(self.token_budget_ratio, bool) or not isinstance(self.token_budget_ratio, (int, float)) \
                or not math.isfinite(self.token_budget_ratio) or self.token_budget_ratio < 1.0:
            raise ValueError(f"token_budget_ratio must be a number >= 1, got {self.token_budget_ratio!r}")
        if not isinstance(self.max_context, int) or self.max_context < 2 * self.iterative_size:
            raise ValueError(
                f"max_context must be an integer >= 2 * iterative_size ({2 * self.iterative_size}), "
                f"got {self.max_context!r}"
            )
        if self.model is not None and not isinstance(self.model, str) and self.lm_tokenizer is None:
            raise ValueError("pass lm_tokenizer=... together with a loaded model object")
        TextCompressor.__init__(self, self.tokenizer if self.tokenizer is not None else self._default_counter())

    def _default_counter(self) -> Any:
        # count in the scoring LM's tokens unless told otherwise
        if self.lm_tokenizer is not None:
            return self.lm_tokenizer
        return self.model if isinstance(self.model, str) else None

    # ------------------------------------------------------------------ model
    def lm(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``, loaded lazily on first use."""
        if self._lm is None:
            if self.model is None or isinstance(self.model, str):
                from ctxzip.models import load_causal_lm

                self._lm = load_causal_lm(self.model, device=self.device)
            else:
                self._lm = (self.model.eval(), self.lm_tokenizer)
        return self._lm

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_lm"] = None
        if not (self.model is None or isinstance(self.model, str)):
            raise TypeError("a PerplexityCompressor holding a model object cannot be pickled; pass its path")
        return d

    def _prefix_ids(self, query: str | None) -> tuple[list[int], list[int]]:
        """Token ids of the document start, and of document start + query."""
        from ctxzip.models import doc_start_ids

        _, tok = self.lm()
        start = doc_start_ids(tok)
        if not start:
            raise ValueError("the scoring LM's tokenizer has no BOS/EOS/<|endoftext|> to start a document")
        q = list(tok(query.strip() + "\n\n", add_special_tokens=False)["input_ids"]) if query else []
        return start, start + q

    # ------------------------------------------------------------------ scoring
    def _forward(self, ids: list[int], cache: Any, pos0: int) -> tuple[Any, Any]:
        import torch

        model, _ = self.lm()
        dev = next(model.parameters()).device
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        pos = torch.arange(pos0, pos0 + len(ids), device=dev).unsqueeze(0)
        with torch.inference_mode():
            out = model(input_ids=x, position_ids=pos, use_cache=True, **with_cache(cache))
        return out.logits[0].float(), cache_from_output(out)

    def token_scores(
        self, ids: list[int], keep_counts: list[int] | None, *, query: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run the iterative compression over LM token ids.

        Returns ``(scores, kept)``: the score of every token when its window was judged
        (self-information, or contrastive perplexity with a query) and the keep mask. With
        ``keep_counts=None`` nothing is dropped (scores under the full prefix).
        """
        import torch

        n = len(ids)
        w = self.iterative_size
        n_win = math.ceil(n / w)
        if keep_counts is not None and len(keep_counts) != n_win:
            raise ValueError("keep_counts must have one entry per window")
        start_ids, q_ids = self._prefix_ids(query)
        streams = [q_ids] if query else [start_ids]
        if query and self.contrastive:
            streams.append(start_ids)  # unconditioned stream for loss(x | prefix)
        if keep_counts is None and len(q_ids) + n <= self.max_context:
            # nothing dropped: one forward pass per stream scores every token. The scores depend
            # only on (model, ids, query, contrastive): the last few are memoised, so the
            # same text compressed at several rates (or by the sentence unit and the budget
            # controller) pays the pass once.
            model = self.lm()[0]
            key = (id(model), tuple(ids), query, bool(query and self.contrastive))
            hit = _FULL_SCORES.get(key)
            if hit is not None and hit[0] is model:
                return hit[1].copy(), np.ones(n, dtype=bool)
            losses = []
            for pre in streams:
                logits, _ = self._forward(pre + list(ids), None, 0)
                pred = logits[len(pre) - 1 : -1]
                tgt = torch.tensor(list(ids), dtype=torch.long, device=pred.device)
                losses.append(torch.nn.functional.cross_entropy(pred, tgt, reduction="none"))
            s = (losses[1] - losses[0]) if len(losses) == 2 else losses[0]
            arr = s.double().cpu().numpy()
            _FULL_SCORES[key] = (model, arr.copy())
            while len(_FULL_SCORES) > 8:
                _FULL_SCORES.pop(next(iter(_FULL_SCORES)))
            return arr, np.ones(n, dtype=bool)
        scores = np.zeros(n, dtype=np.float64)
        kept = np.zeros(n, dtype=bool)

        state = []  # per stream: cache, cached length, logit predicting the next token
        for pre in streams:
            logits, cache = self._forward(pre, None, 0)
            state.append([cache, len(pre), logits[-1]])
        kept_ids: list[int] = []  # kept tokens not yet in any cache
        history: list[int] = []  # all kept tokens so far (for cache rebuilds)
        for wi in range(n_win):
            win = ids[wi * w : (wi + 1) * w]
            losses = []
            for si, pre in enumerate(streams):
                cache, clen, last = state[si]
                if clen + len(kept_ids) + len(win) > self.max_context:
                    # rebuild: document start (+query) and the most recent kept tokens
                    recent = (history + kept_ids)[-(self.max_context // 2) :]
                    logits, cache = self._forward(pre + recent, None, 0)
                    clen, last = len(pre) + len(recent), logits[-1]
                    inp = list(win)
                    pending = 0
                else:
                    inp = kept_ids + list(win)
                    pending = len(kept_ids)
                logits, cache = self._forward(inp, cache, clen)
                # logits[j] predicts inp[j + 1]; the first window token is predicted by the logit
                # after the last cached/pending token
                prev = logits[pending - 1 : pending] if pending else last.unsqueeze(0)
                pred = torch.cat([prev, logits[pending : pending + len(win) - 1]], dim=0)
                target = torch.tensor(win, dtype=torch.long, device=pred.device)
                losses.append(torch.nn.functional.cross_entropy(pred, target, reduction="none"))
                # keep only compressed prefix in the cache: drop this window's entries
                new_len = clen + pending
                _crop(cache, new_len)
                state[si] = [cache, new_len, logits[pending - 1] if pending else last]
            if len(losses) == 2:
                s = (losses[1] - losses[0]).double().cpu().numpy()  # loss(x) - loss(x|q)
            else:
                s = losses[0].double().cpu().numpy()
            sl = slice(wi * w, wi * w + len(win))
            scores[sl] = s
            if keep_counts is None:
                m = np.ones(len(win), dtype=bool)
            else:
                m = topk_mask(s, int(keep_counts[wi]))
            kept[sl] = m
            history.extend(kept_ids)
            kept_ids = [t for t, k in zip(win, m) if k]
        return scores, kept

    # ------------------------------------------------------------------ compression
    def _lm_budget(self, budget: Budget, n_counter: int, n_lm: int) -> int:
        if self.counter.tokenizer is self.lm()[1]:
            return budget.resolve(n_lm)
        if budget.rate is not None:
            return budget.resolve(n_lm)
        return min(n_lm, int(math.floor(n_lm * budget.resolve(n_counter) / max(n_counter, 1))))

    def _compress(
        self, text: str, *, budget: Budget, n_tokens: int, query: str | None, **_: Any
    ) -> CompressionResult:
        _, tok = self.lm()
        t0 = time.perf_counter()
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        k = self._lm_budget(budget, n_tokens, len(ids))
        w = self.iterative_size
        sizes = [len(ids[i : i + w]) for i in range(0, len(ids), w)]
        timings: dict[str, float] = {}
        if self.unit == "token":
            details: dict[str, Any] = {"unit": "token", "lm_tokens": len(ids)}
            keep_tok = np.ones(len(ids), dtype=bool)
            if self.sentence_filter and k < len(ids):
                # coarse stage (budget controller): whole sentences by mean score
                full, _ = self.token_scores(ids, None, query=query)
                sent_keep, tok_sent, n_sent = self._sentence_stage(text, offs, full, int(math.ceil(k * self.token_budget_ratio)))
                keep_tok = sent_keep[tok_sent]
                details.update(sentences=n_sent, kept_sentences=int(sent_keep.sum()))
                timings["coarse"] = time.perf_counter() - t0
            sub = [t for t, m in zip(ids, keep_tok) if m]
            kept = keep_tok.copy()
            if k < len(sub):
                sizes = [len(sub[i : i + w]) for i in range(0, len(sub), w)]
                counts = allocate(k, sizes).tolist()
                _, fine = self.token_scores(sub, counts, query=query)
                kept[np.flatnonzero(keep_tok)] = fine
            timings["score"] = time.perf_counter() - t0
            out = tok.decode([t for t, m in zip(ids, kept) if m])
            details["lm_kept"] = int(kept.sum())
            return CompressionResult(out, n_tokens, int(kept.sum()), kept=kept, details=details, timings=timings)
        # sentence level: mean token score under the full prefix, knapsack over token counts
        scores, _ = self.token_scores(ids, None, query=query)
        timings["score"] = time.perf_counter() - t0
        spans = split_sentences(text)
        starts = np.asarray([s for s, _ in spans])
        tok_sent = np.searchsorted(starts, offs[:, 0], side="right") - 1
        n_sent = len(spans)
        cnt = np.bincount(tok_sent, minlength=n_sent)
        tot = np.bincount(tok_sent, weights=scores, minlength=n_sent)
        mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)
        # knapsack ignores non-positive values: shift so every sentence has a positive value
        value = mean - mean.min() + 1e-3
        chosen = knapsack(value * cnt, cnt, k)
        out = "".join(text[a:b] for (a, b), c in zip(spans, chosen) if c).strip()
        details = {"unit": "sentence", "sentences": n_sent, "kept_sentences": int(chosen.sum())}
        return CompressionResult(out, n_tokens, int(cnt[chosen].sum()), kept=chosen, details=details, timings=timings)

    @staticmethod
    def _sentence_stage(
        text: str, offs: np.ndarray, scores: np.ndarray, cap: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Anchor's ``control_sentence_budget``: keep sentences in order of decreasing mean
        token score until ``cap`` tokens are used (the crossing sentence included).

        Returns ``(kept per sentence, sentence of each token, number of sentences)``. A token
        belongs to the sentence holding its last character (GPT-style tokens carry the space
        before a word, which :func:`split_sentences` leaves with the previous sentence)."""
        spans = split_sentences(text)
        starts = np.asarray([s for s, _ in spans])
        tok_sent = np.searchsorted(starts, np.maximum(offs[:, 1] - 1, offs[:, 0]), side="right") - 1
        tok_sent = np.clip(tok_sent, 0, len(spans) - 1)
        n_sent = len(spans)
        cnt = np.bincount(tok_sent, minlength=n_sent)
        tot = np.bincount(tok_sent, weights=scores, minlength=n_sent)
        mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), -np.inf)
        keep = fill_until(mean, cnt, cap)
        return keep, tok_sent, n_sent

    # ------------------------------------------------------------------ contexts
    def rank_contexts(self, contexts: list[str], query: str) -> np.ndarray:
        """LongLLMLingua coarse ranking: mean loss of ``query + RANK_SUFFIX`` given each context.
        Returns the loss per context (lower = more relevant)."""
        import torch

        model, tok = self.lm()
        start, _ = self._prefix_ids(None)
        q = list(tok(" " + query.strip() + RANK_SUFFIX, add_special_tokens=False)["input_ids"])
        out = np.zeros(len(contexts))
        for i, c in enumerate(contexts):
            c_ids = list(tok(c, add_special_tokens=False)["input_ids"])[-(self.max_context - len(q) - 1) :]
            ids = start + c_ids + q
            logits, _ = self._forward(ids, None, 0)
            pred = logits[len(ids) - len(q) - 1 : -1]
            tgt = torch.tensor(q, dtype=torch.long, device=pred.device)
            out[i] = float(torch.nn.functional.cross_entropy(pred, tgt))
        return out

    def compress_contexts(
        self,
        contexts: list[str],
        *,
        budget: Budget | float | int,
        query: str | None = None,
        context_budget: Budget | float | int | None = None,
        force_context_ids: list[int] | None = None,
        separator: str = "\n\n",
    ) -> CompressionResult:
        """Compress a list of contexts (LongLLMLingua coarse-to-fine).

        With a ``query``, contexts are ranked by :meth:`rank_contexts`; the best are kept until
        ``context_budget`` (default: ``(1 + rate) / 2`` of the tokens, the anchor's default
        ``context_level_rate``) and the kept ones, in their original order, are compressed at the
        token level to ``budget`` overall. Without a query this is token-level compression of
        the joined contexts.
        """
        if not isinstance(contexts, (list, tuple)) or not contexts:
            raise ValueError("contexts must be a non-empty list of strings")
        contexts = [ensure_text(c, name=f"contexts[{i}]") for i, c in enumerate(contexts)]
        b = check_budget(budget)
        joined = separator.join(contexts)
        n_total = self.counter.count(joined)
        target = b.resolve(n_total)
        keep_ctx = np.ones(len(contexts), dtype=bool)
        if query and len(contexts) > 1:
            losses = self.rank_contexts(contexts, query)
            sizes = np.asarray([self.counter.count(c) for c in contexts])
            if context_budget is None:
                cb = Budget(rate=min(1.0, (target / max(n_total, 1) + 1.0) / 2.0))
            else:
                cb = check_budget(context_budget)
            cap = cb.resolve(int(sizes.sum()))
            force = np.zeros(len(contexts), dtype=bool)
            for i in force_context_ids or []:
                force[i] = True
            # rank order: best (lowest loss) first; greedy fill up to the context budget
            keep_ctx[:] = False
            used = int(sizes[force].sum())
            keep_ctx |= force
            for i in np.argsort(losses, kind="stable"):
                if keep_ctx[i]:
                    continue
                if used + sizes[i] > cap and used > 0:
                    continue
                keep_ctx[i] = True
                used += int(sizes[i])
        kept_text = separator.join(c for c, k in zip(contexts, keep_ctx) if k)
        n_kept = self.counter.count(kept_text)
        res = self.compress(kept_text, budget=Budget(tokens=min(target, n_kept)), query=query)
        res.original_tokens = n_total
        res.details["kept_contexts"] = np.flatnonzero(keep_ctx).tolist()
        return res


def _crop(cache: Any, length: int) -> None:
    """Cut a transformers cache back to ``length`` entries (works across cache API versions)."""
    cur = cache.get_seq_length()
    if cur > length:
        cache.crop(length - cur)  # negative = number of entries to remove
