"""RECOMP abstractive compressor: an LM writes a query-focused summary of the retrieved docs.

Xu, Shi & Choi, "RECOMP: Improving Retrieval-Augmented LMs with Compression and Selective
Augmentation" (ICLR 2024, arXiv 2310.04408). RECOMP's abstractive compressor is an encoder-decoder
(T5) distilled from a large LM that was prompted to summarise the retrieved documents for the
query; it is trained to emit an **empty summary** when the documents do not help (selective
augmentation), and the summary is prepended to the target LM's input.

Here the summariser is any Hugging Face seq2seq model or instruct causal LM (default: the
offline SmolLM2-135M-Instruct, prompted through its chat template - the zero-shot form of the
paper's teacher, not the distilled student). Selective augmentation has two switches:

* the model may answer with ``irrelevant_marker`` (default ``"NONE"``), as the prompt asks;
* ``relevance_threshold``: before generating, the model is asked whether the documents help
  answer/continue the query; when ``P(yes) / (P(yes) + P(no))`` is below the threshold the
  result is empty. A 135M model rarely writes the marker on its own, so this judgement is what
  makes selective augmentation work with small summarisers.

The output budget (``Budget(tokens=N)`` or a rate of the input tokens) caps the generated tokens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctxzip.budget import Budget
from ctxzip.compressor import CompressionResult, TextCompressor, check_budget, ensure_text
from ctxzip.prompt.extractive import as_documents

__all__ = ["AbstractiveCompressor", "DEFAULT_INSTRUCTION", "SUMMARY_INSTRUCTION",
           "DEFAULT_RELEVANCE_QUESTION"]

DEFAULT_INSTRUCTION = (
    "Documents:\n{documents}\n\nQuery: {query}\n\nCopy from the documents, word for word, the "
    "few sentences that are most relevant to the query (at most {max_words} words). Write "
    "nothing else. If no sentence is relevant, answer only {marker}."
)
#: the first-session prompt (a free summary), kept for comparison and for larger summarisers
SUMMARY_INSTRUCTION = (
    "Summarize the documents below into a short passage that helps with the query. Keep names, "
    "numbers and technical terms exactly. If the documents are irrelevant to the query, answer "
    "only {marker}.\n\nQuery: {query}\n\nDocuments:\n{documents}"
)
DEFAULT_RELEVANCE_QUESTION = (
    "Query: {query}\n\nDocuments:\n{documents}\n\nDo these documents contain information that "
    "helps with the query? Answer yes or no."
)


@dataclass(repr=False)
class AbstractiveCompressor(TextCompressor):
    """Query-focused abstractive summary of retrieved documents (RECOMP abstractive).

    Args:
        model: HF id or local path of a seq2seq model or a causal LM (instruct models use their
            chat template), or a loaded model object (then pass ``generation_tokenizer``);
            ``None`` = the offline SmolLM2-135M-Instruct.
        generation_tokenizer: tokenizer of ``model`` when a model object is given.
        instruction: prompt template with ``{query}``, ``{documents}``, ``{marker}`` and
            optionally ``{max_words}`` (~0.75 x the output-token cap). The default asks for
            the relevant sentences copied verbatim: a 135M summariser paraphrases badly, and
            copying keeps names and code exact (RECOMP's abstractive outputs are largely
            extractive too); :data:`SUMMARY_INSTRUCTION` is the free-summary prompt.
        irrelevant_marker: what the model answers when nothing is relevant; an answer that
            starts with it becomes an empty context (selective augmentation).
        relevance_threshold: ask the model first whether the documents help; below this
            normalised ``P(yes)`` the result is empty. ``None`` turns the check off.
        relevance_question: prompt template for that yes/no judgement.
        max_input_tokens: the documents are cut to this many model tokens (keeps prompts inside
            the model's context).
        max_new_tokens: hard cap on generated tokens whatever the budget says.
        num_beams: beam search width (1 = greedy; RECOMP decodes greedily).
        no_repeat_ngram_size: forbid repeating n-grams while decoding (0 = off); small
            instruct models loop without it.
        device: model device (``None`` = CUDA if available else CPU).
        tokenizer: counting tokenizer for budgets and results (default: the target LM's).
    """

    model: Any = None
    generation_tokenizer: Any = None
    instruction: str = DEFAULT_INSTRUCTION
    irrelevant_marker: str = "NONE"
    relevance_threshold: float | None = 0.5
    relevance_question: str = DEFAULT_RELEVANCE_QUESTION
    max_input_tokens: int = 3072
    max_new_tokens: int = 256
    num_beams: int = 1
    no_repeat_ngram_size: int = 4
    device: Any = None
    tokenizer: Any = None
    name: str = field(default="abstractive", init=False)

    def __post_init__(self) -> None:
        if self.relevance_threshold is not None and not 0.0 <= float(self.relevance_threshold) <= 1.0:
            raise ValueError(
                f"relevance_threshold must be in [0, 1] or None, got {self.relevance_threshold!r}"
            )
        for k in ("max_input_tokens", "max_new_tokens", "num_beams"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)!r}")
        for k in ("{query}", "{documents}"):
            if k not in self.instruction:
                raise ValueError(f"instruction must contain {k}")
        super().__init__(self.tokenizer)
        self._lm: Any = None
        self._gen_tok: Any = self.generation_tokenizer
        if not isinstance(self.model, (str, Path, type(None))):
            if self.generation_tokenizer is None:
                raise ValueError("pass generation_tokenizer= together with a loaded model object")
            self._lm = self.model
        self._load_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # picklable for process pools: a model named by id/path is reloaded lazily
        state = dict(self.__dict__)
        state.pop("_load_lock", None)
        if isinstance(self.model, (str, Path, type(None))):
            state["_lm"] = None
            state["_gen_tok"] = self.generation_tokenizer
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._load_lock = threading.Lock()

    # ------------------------------------------------------------------ model
    def _load(self) -> tuple[Any, Any]:
        with self._load_lock:
            if self._lm is None:
                self._lm, self._gen_tok = _load_generator(self.model, self.device)
        return self._lm, self._gen_tok

    @property
    def is_seq2seq(self) -> bool:
        lm, _ = self._load()
        return bool(getattr(lm.config, "is_encoder_decoder", False))

    def _prompt_ids(self, content: str) -> Any:
        import torch

        lm, tok = self._load()
        if not self.is_seq2seq and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True,
            )["input_ids"]
        else:
            ids = tok(content, return_tensors="pt")["input_ids"]
        return torch.as_tensor(ids).to(lm.device)

    def _docs_block(self, texts: list[str]) -> str:
        _, tok = self._load()
        blocks = [f"[{i + 1}] {t.strip()}" for i, t in enumerate(texts)]
        joined = "\n\n".join(blocks)
        ids = tok(joined, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_input_tokens:
            joined = tok.decode(ids[: self.max_input_tokens])
        return joined

    def relevance(self, query: str, texts: list[str]) -> float:
        """The model's normalised ``P(yes)`` that the documents help with ``query``."""
        import torch

        lm, tok = self._load()
        content = self.relevance_question.format(query=query, documents=self._docs_block(texts))
        ids = self._prompt_ids(content)
        yes = _first_ids(tok, ["yes", "Yes", " yes", " Yes"])
        no = _first_ids(tok, ["no", "No", " no", " No"])
        with torch.no_grad():
            if self.is_seq2seq:
                start = lm.config.decoder_start_token_id
                dec = torch.tensor([[start if start is not None else 0]], device=lm.device)
                logits = lm(input_ids=ids, decoder_input_ids=dec).logits[0, -1]
            else:
                logits = lm(input_ids=ids).logits[0, -1]
        lp = torch.log_softmax(logits.float(), dim=-1)
        p_yes = torch.logsumexp(lp[yes], 0)
        p_no = torch.logsumexp(lp[no], 0)
        return float(torch.sigmoid(p_yes - p_no))

    def summarize(self, query: str, texts: list[str], max_new_tokens: int) -> str:
        """Generate the summary (greedy/beam), at most ``max_new_tokens`` model tokens."""
        import torch

        lm, tok = self._load()
        content = self.instruction.format(
            query=query, documents=self._docs_block(texts), marker=self.irrelevant_marker,
            max_words=max(1, int(0.75 * int(max_new_tokens))),
        )
        ids = self._prompt_ids(content)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = lm.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                max_new_tokens=int(max_new_tokens), do_sample=False,
                num_beams=int(self.num_beams), pad_token_id=pad,
                no_repeat_ngram_size=int(self.no_repeat_ngram_size),
            )
        gen = out[0] if self.is_seq2seq else out[0, ids.shape[1]:]
        return tok.decode(gen, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ compress
    def compress(  # type: ignore[override]
        self,
        documents: Any,
        *,
        budget: Budget | float | int,
        query: str | None = None,
        **kwargs: Any,
    ) -> CompressionResult:
        """Summarise ``documents`` for ``query``; ``budget`` caps the summary's tokens (counted
        with the counting tokenizer; a rate is taken of the input's tokens)."""
        texts, metas = as_documents(documents)
        if query is None:
            raise ValueError("AbstractiveCompressor needs a query (the summary is focused on it)")
        query = ensure_text(query, name="query")
        if not query.strip():
            raise ValueError("query is empty")
        budget = check_budget(budget)
        t0 = time.perf_counter()
        n_tokens = self.counter.count("\n\n".join(texts))
        timings: dict[str, float] = {}
        details: dict[str, Any] = {"documents": [{"index": i, "metadata": m}
                                                 for i, m in enumerate(metas)]}
        cap = budget.resolve(n_tokens)
        if n_tokens == 0 or cap == 0:
            return CompressionResult("", n_tokens, 0, method=self.name, details=details,
                                     timings={"total": time.perf_counter() - t0})
        text = ""
        if self.relevance_threshold is not None:
            t = time.perf_counter()
            p = self.relevance(query, texts)
            timings["relevance"] = time.perf_counter() - t
            details["relevance"] = p
            if p < float(self.relevance_threshold):
                details["selective_empty"] = True
                return CompressionResult("", n_tokens, 0, method=self.name, details=details,
                                         timings={**timings, "total": time.perf_counter() - t0})
        t = time.perf_counter()
        raw = self.summarize(query, texts, min(cap, int(self.max_new_tokens)))
        timings["generate"] = time.perf_counter() - t
        details["raw"] = raw
        if raw.upper().startswith(self.irrelevant_marker.upper()) or not raw:
            details["selective_empty"] = True
        else:
            details["selective_empty"] = False
            text = raw
            ids = self.counter.encode(text)
            if len(ids) > cap:  # counting tokenizer may differ from the model's
                text = self.counter.tokenizer.decode(ids[:cap]).strip()
        return CompressionResult(text, n_tokens, self.counter.count(text), method=self.name,
                                 details=details, kept=np.zeros(0, dtype=bool),
                                 timings={**timings, "total": time.perf_counter() - t0})

    def _compress(
        self, text: str, *, budget: Budget, n_tokens: int, query: str | None, **kwargs: Any
    ) -> CompressionResult:  # pragma: no cover - compress() is overridden
        return self.compress([text], budget=budget, query=query)

    def __repr__(self) -> str:
        m = self.model if isinstance(self.model, (str, Path, type(None))) else "<model>"
        return f"AbstractiveCompressor(model={m!r}, relevance_threshold={self.relevance_threshold})"


def _first_ids(tok: Any, words: list[str]) -> list[int]:
    ids = []
    for w in words:
        x = tok(w, add_special_tokens=False)["input_ids"]
        if x and x[0] not in ids:
            ids.append(int(x[0]))
    return ids


def _load_generator(name: Any, device: Any) -> tuple[Any, Any]:
    from transformers import AutoConfig

    from ctxzip.models import causal_lm_path, load_causal_lm, load_pretrained, resolve_device

    if name is None:
        return load_causal_lm(None, device=device)
    cfg = load_pretrained(AutoConfig, causal_lm_path(name), "model config")
    if getattr(cfg, "is_encoder_decoder", False):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        model = load_pretrained(AutoModelForSeq2SeqLM, str(name), "seq2seq model")
        tok = load_pretrained(AutoTokenizer, str(name), "tokenizer")
        return model.to(resolve_device(device)).eval(), tok
    return load_causal_lm(name, device=device)
