"""Context benefit retained: one quality metric every method can compute offline.

    retained = (NLL_none - NLL_compressed) / (NLL_none - NLL_full)

NLL is the target LM's mean token negative log-likelihood of a *target* text given no context,
the compressed context, or the full context. 1.0 = nothing lost; 0 = as if the context were gone.
Two kinds of target (DESIGN.md):

* **continuation** - the tokens right after the context (rewards keeping recent text);
* **recall** - spans sampled uniformly over the context, each cued by the tokens before it and
  placed after the (compressed) context (needle-style, no recency bias).

A case costs two forward passes per context: the context is prefilled once into a KV cache, then
the continuation and all recall items run as one right-padded batch on top of it. The same
function scores a compressed *KV cache* (``nll_from_cache``), so text and KV methods are
measured identically. The target LM is a parameter (default: the offline SmolLM2).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctxzip._hf_compat import cache_from_output, with_cache
from ctxzip.compressor import ensure_text

__all__ = [
    "EvalCase",
    "ContextEvaluator",
    "context_benefit",
    "pooled_benefit",
    "pooled_benefit_diff",
    "TARGETS",
]

TARGETS = ("continuation", "recall")


def context_benefit(nll_none: float, nll_full: float, nll_comp: float) -> float:
    """``(none - comp) / (none - full)``; NaN when the full context does not help at all."""
    denom = nll_none - nll_full
    if not math.isfinite(denom) or abs(denom) < 1e-9:
        return float("nan")
    return (nll_none - nll_comp) / denom


def pooled_benefit(rows: Iterable[tuple[float, float, float]]) -> float:
    """Benefit retained pooled over cases: ``sum(none - comp) / sum(none - full)``.

    More stable than the mean of per-case ratios when some contexts help little.
    ``rows`` are ``(nll_none, nll_full, nll_comp)`` triples.
    """
    num = den = 0.0
    for none, full, comp in rows:
        num += none - comp
        den += none - full
    return num / den if abs(den) > 1e-12 else float("nan")


def pooled_benefit_diff(
    none: Sequence[float], full: Sequence[float], comp_a: Sequence[float], comp_b: Sequence[float],
    *, n_boot: int = 5000, seed: int = 0,
) -> dict[str, Any]:
    """Pooled benefit of method ``a`` minus method ``b`` on the same cases, with a paired
    bootstrap 95% interval.

    Cases are resampled with replacement ``n_boot`` times; both methods are pooled over the same
    resample (paired), so the interval reflects how much the gap depends on which documents
    were drawn, not the spread of either method alone.

    Args:
        none, full: NLL of each case's target without context and with the full context.
        comp_a, comp_b: NLL with method ``a``'s and method ``b``'s compressed context.
        n_boot: resamples (>= 1). seed: RNG seed (the interval is deterministic).

    Returns:
        ``{"diff": a - b, "ci95": [lo, hi], "p_ahead": share of resamples where a > b,
        "n_cases": n}`` (benefits as fractions, not points).
    """
    arrs = [np.asarray(x, dtype=np.float64) for x in (none, full, comp_a, comp_b)]
    n = len(arrs[0])
    if n == 0 or any(len(a) != n for a in arrs):
        raise ValueError(f"none, full, comp_a and comp_b need the same non-zero length, got {[len(a) for a in arrs]}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    nn, ff, ca, cb = arrs
    gap, ga, gb = nn - ff, nn - ca, nn - cb
    if abs(gap.sum()) < 1e-12:
        raise ValueError("the full context does not change the NLL: the pooled benefit is undefined")
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    den = gap[idx].sum(1)
    ok = np.abs(den) > 1e-12
    boot = (ga[idx].sum(1)[ok] - gb[idx].sum(1)[ok]) / den[ok]
    return {"diff": float((ga.sum() - gb.sum()) / gap.sum()),
            "ci95": [float(x) for x in np.percentile(boot, [2.5, 97.5])],
            "p_ahead": float((boot > 0).mean()), "n_cases": n}


@dataclass
class EvalCase:
    """One evaluation case cut from a real document (token ids of the target LM's tokenizer).

    Attributes:
        doc_id: id of the source document.
        context_ids / context_text: the context (what methods compress).
        continuation_ids: the tokens right after the context.
        recall: ``(cue_ids, span_ids)`` pairs sampled uniformly over the context.
        span_starts: positions of the recall spans in ``context_ids``.
    """

    doc_id: str
    context_ids: list[int]
    context_text: str
    continuation_ids: list[int]
    recall: list[tuple[list[int], list[int]]]
    span_starts: list[int] = field(default_factory=list)
    _baseline: dict[str, dict[str, float]] | None = field(default=None, repr=False)

    @property
    def n_context(self) -> int:
        return len(self.context_ids)


class ContextEvaluator:
    """Scores contexts (text or KV caches) by the target LM's NLL of continuation/recall targets.

    Args:
        model: a causal LM, a model id/path, or ``None`` for the offline SmolLM2.
        tokenizer: its tokenizer (required when ``model`` is an object without one loaded
            through :func:`ctxzip.models.load_causal_lm`).
        device: device for a model loaded by name.
        max_batch: most target rows per forward pass.
    """

    def __init__(
        self, model: Any = None, tokenizer: Any = None, *, device: Any = None, max_batch: int = 32
    ) -> None:
        if model is None or isinstance(model, str):
            from ctxzip.models import load_causal_lm

            model, tok = load_causal_lm(model, device=device)
            tokenizer = tokenizer or tok
        if tokenizer is None:
            raise ValueError("pass the model's tokenizer")
        from ctxzip.models import doc_start_ids

        self.model = model
        self.tokenizer = tokenizer
        self.start_ids = doc_start_ids(tokenizer)
        self.max_batch = int(max_batch)

    # ------------------------------------------------------------------ cases
    def encode(self, text: str) -> list[int]:
        text = ensure_text(text)
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def make_case(
        self,
        text: str,
        *,
        context_tokens: int = 1024,
        continuation_tokens: int = 128,
        n_recall: int = 16,
        span_tokens: int = 24,
        cue_tokens: int = 16,
        seed: int = 0,
        doc_id: str = "",
    ) -> EvalCase:
        """Cut a case from ``text``: the first ``context_tokens`` tokens are the context, the next
        ``continuation_tokens`` the continuation target, and ``n_recall`` spans of
        ``span_tokens`` tokens (each cued by the ``cue_tokens`` before it) are drawn uniformly
        over the context, one per equal-width stratum (no overlap)."""
        for name, v in (("context_tokens", context_tokens), ("continuation_tokens", continuation_tokens),
                        ("span_tokens", span_tokens), ("cue_tokens", cue_tokens)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if n_recall < 0:
            raise ValueError(f"n_recall must be >= 0, got {n_recall}")
        ids = self.encode(text)
        need = context_tokens + continuation_tokens
        if len(ids) < need:
            raise ValueError(
                f"document {doc_id or ''} has {len(ids)} tokens; a case needs {need} "
                f"(context {context_tokens} + continuation {continuation_tokens})"
            )
        ctx = ids[:context_tokens]
        cont = ids[context_tokens:need]
        lo, hi = cue_tokens, context_tokens - span_tokens  # span start range, inclusive
        recall: list[tuple[list[int], list[int]]] = []
        starts: list[int] = []
        if n_recall and hi >= lo:
            rng = np.random.default_rng(seed)
            width = (hi - lo + 1) / n_recall
            if width < span_tokens:
                raise ValueError(
                    f"{n_recall} recall spans of {span_tokens} tokens do not fit in a context "
                    f"of {context_tokens} tokens"
                )
            for j in range(n_recall):
                a = lo + int(math.floor(j * width))
                b = max(a, lo + int(math.floor((j + 1) * width)) - span_tokens)
                s = int(rng.integers(a, b + 1))
                starts.append(s)
                recall.append((ctx[s - cue_tokens : s], ctx[s : s + span_tokens]))
        return EvalCase(
            doc_id=doc_id,
            context_ids=ctx,
            context_text=self.tokenizer.decode(ctx),
            continuation_ids=cont,
            recall=recall,
            span_starts=starts,
        )

    # ------------------------------------------------------------------ scoring
    def _items(self, case: EvalCase, targets: Sequence[str]) -> list[tuple[str, list[int], list[int]]]:
        items: list[tuple[str, list[int], list[int]]] = []
        for t in targets:
            if t == "continuation":
                items.append(("continuation", [], case.continuation_ids))
            elif t == "recall":
                items.extend(("recall", cue, span) for cue, span in case.recall)
            else:
                raise ValueError(f"unknown target {t!r}; choose from {TARGETS}")
        return items

    def score_items(
        self,
        prefix_ids: Sequence[int] | None,
        items: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        make_cache: Callable[[Any, Any], tuple[Any, int]] | None = None,
    ) -> list[tuple[float, int]]:
        """Total NLL (nats) and token count of each ``target`` given ``prefix + prompt``.

        ``items`` are ``(prompt_ids, target_ids)``; the document start token(s) always lead.
        All of the prefix but its last token is prefilled once into a KV cache - by the model,
        or by ``make_cache(model, ids)`` returning ``(past_key_values, position_offset)``, the
        hook for compressed KV caches - and the items then run as right-padded batches on
        copies of that cache, each row led by the prefix's last token (whose logits predict
        the row's first prompt/target token).
        """
        import torch

        model = self.model
        dev = next(model.parameters()).device
        prefix = list(self.start_ids) + list(prefix_ids or [])
        out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
        if not items:
            return out
        if not prefix:
            raise ValueError("the tokenizer has no BOS/EOS token to start a document with")
        pad = self.tokenizer.pad_token_id or 0
        with torch.no_grad():
            base_cache, offset = None, 0
            if len(prefix) > 1:
                pre = torch.tensor([prefix[:-1]], device=dev)
                if make_cache is not None:
                    base_cache, offset = make_cache(model, pre)
                else:
                    # logits_to_keep=1: the prefix needs no vocabulary projection
                    base_cache = cache_from_output(model(pre, use_cache=True, logits_to_keep=1))
                    offset = pre.shape[1]
            lead = [prefix[-1]]
            # batches of rows of equal length (no padding for the usual fixed-size targets)
            by_len: dict[int, list[int]] = {}
            for i, (p, t) in enumerate(items):
                by_len.setdefault(len(p) + len(t), []).append(i)
            batches = [g[b : b + self.max_batch] for _, g in sorted(by_len.items(), reverse=True)
                       for b in range(0, len(g), self.max_batch)]
            for idx in batches:
                rows = [lead + list(items[i][0]) + list(items[i][1]) for i in idx]
                B, L = len(rows), max(len(r) for r in rows)
                ids = torch.full((B, L), pad, dtype=torch.long, device=dev)
                row_mask = torch.zeros((B, L), dtype=torch.long, device=dev)
                for r, row in enumerate(rows):
                    ids[r, : len(row)] = torch.tensor(row, device=dev)
                    row_mask[r, : len(row)] = 1
                cache, past_len = None, 0
                if base_cache is not None:
                    cache = copy.deepcopy(base_cache)
                    if B > 1:
                        cache.batch_repeat_interleave(B)
                    past_len = cache.get_seq_length()
                attn = torch.cat(
                    [torch.ones((B, past_len), dtype=torch.long, device=dev), row_mask], dim=1
                )
                pos = (offset + torch.arange(L, device=dev)).unsqueeze(0).expand(B, L)
                logits = model(
                    input_ids=ids, attention_mask=attn, position_ids=pos,
                    use_cache=cache is not None, **with_cache(cache),
                ).logits.float()
                # nll_tok[:, p] is the NLL of token p + 1 (logits at p predict token p + 1)
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                nll_tok = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                for r, i in enumerate(idx):
                    first = len(lead) + len(items[i][0])  # row position of the first target token
                    n_t = len(items[i][1])
                    out[i] = (float(nll_tok[r, first - 1 : first - 1 + n_t].sum()), n_t)
        return out

    def nll(
        self, case: EvalCase, context: str | Sequence[int] | None, *, targets: Sequence[str] = TARGETS
    ) -> dict[str, float]:
        """Mean token NLL per target kind given ``context`` (text, token ids, or ``None``)."""
        if isinstance(context, str):
            ctx_ids = self.encode(context)
        else:
            ctx_ids = list(context) if context is not None else []
        items = self._items(case, targets)
        scored = self.score_items(ctx_ids, [(p, t) for _, p, t in items])
        return _means(items, scored)

    def nll_from_cache(
        self,
        case: EvalCase,
        make_cache: Callable[[Any, Any], tuple[Any, int]],
        *,
        targets: Sequence[str] = TARGETS,
    ) -> dict[str, float]:
        """Mean token NLL per target kind given a KV cache built by ``make_cache``.

        ``make_cache(model, input_ids)`` receives ``[1, n]`` ids (the document start token and
        the context without its final token, which is fed with the targets) and returns
        ``(past_key_values, position_offset)``: the (compressed) cache of those ``n`` tokens and
        the position the next token takes (``n`` for presses that keep original positions).
        The cache must support ``copy.deepcopy``, ``batch_repeat_interleave`` and
        ``get_seq_length``.
        """
        items = self._items(case, targets)
        scored = self.score_items(case.context_ids, [(p, t) for _, p, t in items], make_cache=make_cache)
        return _means(items, scored)

    def benefit_from_cache(
        self,
        case: EvalCase,
        make_cache: Callable[[Any, Any], tuple[Any, int]],
        *,
        targets: Sequence[str] = TARGETS,
    ) -> dict[str, Any]:
        """Context benefit retained per target for a compressed KV cache (see ``nll_from_cache``)."""
        base = self.baseline(case, targets=targets)
        return _report(base, self.nll_from_cache(case, make_cache, targets=targets), targets)

    def baseline(self, case: EvalCase, *, targets: Sequence[str] = TARGETS) -> dict[str, dict[str, float]]:
        """NLL with no context and with the full context (memoised on the case)."""
        if case._baseline is None or not all(t in case._baseline["none"] for t in targets):
            case._baseline = {
                "none": self.nll(case, None, targets=targets),
                "full": self.nll(case, case.context_ids, targets=targets),
            }
        return case._baseline

    def benefit(
        self, case: EvalCase, compressed: str | Sequence[int] | None, *, targets: Sequence[str] = TARGETS
    ) -> dict[str, Any]:
        """Context benefit retained per target for a compressed text context, with the NLLs."""
        base = self.baseline(case, targets=targets)
        comp = self.nll(case, compressed, targets=targets)
        return _report(base, comp, targets)


def _means(
    items: Sequence[tuple[str, Any, Any]], scored: Sequence[tuple[float, int]]
) -> dict[str, float]:
    tot: dict[str, list[float]] = {}
    for (kind, _, _), (s, n) in zip(items, scored):
        acc = tot.setdefault(kind, [0.0, 0])
        acc[0] += s
        acc[1] += n
    return {k: v[0] / v[1] if v[1] else float("nan") for k, v in tot.items()}


def _report(base: dict[str, dict[str, float]], comp: dict[str, float], targets: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in targets:
        none, full, c = base["none"][t], base["full"][t], comp[t]
        out[t] = context_benefit(none, full, c)
        out[f"nll_{t}"] = {"none": none, "full": full, "compressed": c}
    return out
