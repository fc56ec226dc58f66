"""Per-document bits-per-character under a causal LM, and loss-based selection.

PreSelect (arXiv 2503.00808, code ``data_processing/bpc/``) measures how well each model
compresses each document: total NLL (nats) over the document's tokens / (characters · ln 2).
Its reference packs documents into one token stream and slides a window over the stream, so a
document's first tokens are predicted from the *previous* document. Here every document is
scored on its own: it starts from the tokenizer's document-start token
(:func:`ctxzip.models.doc_start_ids`) and, when longer than ``window`` tokens, a sliding window
moves inside the document by ``stride`` tokens, each window scoring only its new targets
(the reference's block 1900 / stride 512 by default). Windows of many documents are batched by
length; logits are computed in slices so a 262k-entry vocabulary (Gemma 3) fits in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["document_nll", "document_bpc", "LossScorer", "load_ladder_model"]


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_new_targets) windows over a sequence of ``n`` token ids; target ``t`` is
    token ``t`` predicted from tokens ``< t``; token 0 (document start) is never a target."""
    out = []
    prev_end = 1  # targets [1, n)
    begin = 0
    while True:
        end = min(begin + window, n)
        new = end - prev_end
        if new > 0:
            out.append((begin, end, new))
        prev_end = max(prev_end, end)
        if end >= n:
            break
        begin += stride
    return out


def document_nll(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    window: int = 1900,
    stride: int = 512,
    batch_tokens: int = 4096,
    logit_chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Total NLL in nats and number of scored tokens, per document.

    Args:
        model / tokenizer: a Hugging Face causal LM and its tokenizer.
        texts: documents (non-empty strings).
        window: tokens per forward pass (PreSelect: 1900).
        stride: how far the window moves inside a long document (PreSelect: 512); only the
            targets not scored by an earlier window count, so each token is scored once.
        batch_tokens: padded tokens per forward batch (memory knob).
        logit_chunk: positions per slice of the output projection (memory knob).
    """
    import torch
    import torch.nn.functional as F

    from ctxzip.models import doc_start_ids

    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be in [1, window-1], got {stride}")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t:
            raise ValueError(f"document {i} is empty or not a string")
    start = doc_start_ids(tokenizer)[:1]
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    docs = [start + list(e) for e in enc]
    jobs = []  # (doc, begin, end, n_new)
    for d, ids in enumerate(docs):
        for b, e, new in _windows(len(ids), window, stride):
            jobs.append((d, b, e, new))
    jobs.sort(key=lambda j: j[2] - j[1])
    nll = np.zeros(len(docs), dtype=np.float64)
    ntok = np.zeros(len(docs), dtype=np.int64)
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    i = 0
    with torch.inference_mode():
        while i < len(jobs):
            j = i + 1
            while j < len(jobs) and (j - i + 1) * (jobs[j][2] - jobs[j][1]) <= batch_tokens:
                j += 1
            batch = jobs[i:j]
            longest = max(e - b for _, b, e, _ in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            att = torch.zeros((len(batch), longest), dtype=torch.long)
            for r, (d, b, e, _) in enumerate(batch):
                ids[r, : e - b] = torch.tensor(docs[d][b:e])
                att[r, : e - b] = 1
            hidden = decoder(input_ids=ids.to(device), attention_mask=att.to(device)).last_hidden_state
            for r, (d, b, e, new) in enumerate(batch):
                L = e - b
                # positions predicting targets [L-new, L) are [L-new-1, L-1)
                pos0 = L - new - 1
                total = 0.0
                for c in range(pos0, L - 1, logit_chunk):
                    c1 = min(c + logit_chunk, L - 1)
                    logits = head(hidden[r, c:c1]).float()
                    if cap:
                        logits = torch.tanh(logits / cap) * cap
                    tgt = ids[r, c + 1 : c1 + 1].to(device)
                    total += float(F.cross_entropy(logits, tgt, reduction="sum"))
                nll[d] += total
                ntok[d] += new
            i = j
    return nll, ntok


def document_bpc(model: Any, tokenizer: Any, texts: Sequence[str], **kw: Any) -> np.ndarray:
    """Bits per character of each document: total NLL / (len(text) · ln 2)."""
    nll, _ = document_nll(model, tokenizer, texts, **kw)
    chars = np.array([len(t) for t in texts], dtype=np.float64)
    return nll / (chars * math.log(2))


def load_ladder_model(spec: str, *, device: Any = None) -> tuple[Any, Any]:
    """Load a model by spec: any name :func:`ctxzip.models.load_causal_lm` takes (``smollm2``/
    ``default``, ``gemma3-270m``, an HF id or path), optionally ``@layers=K`` to keep only the
    first ``K`` decoder layers (a degraded rung: same family and tokenizer, less depth; the
    weights are shared with the full model, not copied)."""
    from ctxzip.models import load_causal_lm

    base, _, opt = spec.partition("@")
    name = None if base in ("", "default", "smollm2") else base
    model, tok = load_causal_lm(name, device=device)
    if not opt:
        return model, tok
    key, _, val = opt.partition("=")
    if key != "layers" or not val.isdigit():
        raise ValueError(f"unknown model option {opt!r} in {spec!r}: use '@layers=K'")
    return truncate_layers(model, int(val)), tok


def truncate_layers(model: Any, k: int) -> Any:
    """A view of ``model`` that runs only its first ``k`` decoder layers (final norm and
    output head kept). Parameters are shared, the original model is left unchanged."""
    import copy

    import torch

    inner = model.get_decoder()
    layers = list(inner.layers)
    if not 1 <= k <= len(layers):
        raise ValueError(f"the model has {len(layers)} layers; keep 1..{len(layers)}, got {k}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = k
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:k]
    new_inner = copy.copy(inner)
    new_inner._modules = dict(inner._modules)
    new_inner.layers = torch.nn.ModuleList(layers[:k])
    new_inner.config = cfg
    new = copy.copy(model)
    new._modules = dict(model._modules)
    new.config = cfg
    for name, mod in model._modules.items():
        if mod is inner:
            new._modules[name] = new_inner
            break
    else:
        raise ValueError("cannot find the decoder module to truncate")
    return new


@dataclass
class LossScorer:
    """Loss-based selection (PreSelect's cheap baseline): score = −BPC under one reference LM.

    Lower bits per character = text the reference model finds more predictable, ranked higher.

    Args:
        model: model spec (see :func:`load_ladder_model`): ``"smollm2"`` (default), an HF id
            or path, ``"gemma3-270m"``, ``"smollm2@layers=20"``.
        window / stride: sliding window inside each document (PreSelect: 1900 / 512).
        batch_tokens: padded tokens per forward pass.
        device: torch device (``None`` = CUDA if available, else CPU).
    """

    model: str = "smollm2"
    window: int = 1900
    stride: int = 512
    batch_tokens: int = 4096
    device: str | None = None
    name: str = field(default="loss", init=False)

    def __post_init__(self) -> None:
        self._lm: Any = None

    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("model", "window", "stride", "batch_tokens",
                                              "device")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.name = "loss"
        self._lm = None

    def fingerprint(self) -> str:
        return f"loss|{self.model}|{self.window}|{self.stride}"

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self._lm is None:
            import torch

            torch.set_num_threads(1) if _in_pool_worker() else None
            self._lm = load_ladder_model(self.model, device=self.device)
        model, tok = self._lm
        return -document_bpc(model, tok, texts, window=self.window, stride=self.stride,
                             batch_tokens=self.batch_tokens)


def _in_pool_worker() -> bool:
    import multiprocessing as mp

    return mp.parent_process() is not None
