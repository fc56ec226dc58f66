"""RazorAttention: full cache for retrieval heads, sinks + recent buffer + a compensation token
for every other head.

Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads" (ICLR 2025,
arXiv 2407.15891). Most heads read only a local window plus the attention sinks; a few
*retrieval heads* reach across the whole context. For RoPE models the paper finds them without
data: on a random token sequence repeated twice, an **induction head** attends from each token
of the second copy to the token that *followed* its earlier occurrence, an **echo head** to the
earlier occurrence itself. Those heads keep their full cache. Every other head keeps its first
``sink`` tokens and the most recent ``L_h = max(S0, N / C)`` tokens (Algorithm 1; here
``min_buffer`` = S0 and ``budget`` gives ``N / C``), and the dropped tokens are folded into one
**compensation token** ``k_hat = mean(K_dropped)``, ``v_hat = mean(V_dropped)`` that attention
weighs as ``n_dropped`` tokens (its logit gets ``+ log n_dropped``: our reading of the paper's
equations 4-5, whose exact text could not be checked here; ``compensation=False`` drops it).

The head is the unit of compression, so recall of any span survives wherever a retrieval head
can find it. Ours, optional (``induction_fraction``): beyond the clear echo/induction heads a
small model's induction scores are ~0 and rank noise, so the remaining heads can be chosen by
the same probe's long-range attention mass (attention more than :data:`FAR_WINDOW` tokens
back). Storage here is real: retrieval heads keep ``[B, |R|, N, d]``, the others
``[B, |S|, sink + L_h, d]`` plus the compensation token (no padding to the longest head; the
padded view exists only during attention, through the ``"ctxzip_ragged"`` attention). With
``quant`` (a :class:`~ctxzip.kvcache.kivi.KIVIPress`) both parts are stored KIVI-quantized
(pre-RoPE keys per channel, values per token) - the combination ``benchmarks/kvcache_memory.py``
uses at 10% of the bf16 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..budget import Budget, topk_indices
from .base import BasePress, LayerContext
from .cache import BatchMappedLayer, EvictedLayer, _register_key_mask, _tensor_nbytes, layer_nbytes
from .kivi import KIVIPress

__all__ = ["RazorAttentionPress", "HeadSplitLayer", "retrieval_head_scores"]

#: distance beyond which attention counts as long-range in the probe's third score
FAR_WINDOW = 64


class _ProbePress(BasePress):
    """Records, per full-attention layer, the induction and echo scores of every query head on
    ``[bos] x x`` (``x`` random tokens of length ``n``); returns no new layer."""

    def __init__(self, n: int):
        super().__init__(budget=Budget(rate=1.0))
        self.n = int(n)
        self.scores: dict[int, torch.Tensor] = {}

    def compress_layer(self, ctx: LayerContext) -> Any:
        q = ctx.queries(None).float()  # [B, Hq, T, d] post-RoPE
        k = ctx.keys.float()
        hq, hk = q.shape[1], k.shape[1]
        k = k.repeat_interleave(hq // hk, dim=1)
        t = k.shape[-2]
        logits = (q @ k.transpose(-1, -2)) * ctx.scale
        causal = torch.ones(t, t, dtype=torch.bool, device=logits.device).triu(1)
        a = logits.masked_fill(causal, float("-inf")).softmax(-1).mean(0)  # [Hq, T, T]
        n = self.n
        qi = torch.arange(n + 2, 2 * n + 1, device=a.device)  # second copy, from its 2nd token
        j = qi - n  # the same token in the first copy
        ind = a[:, qi, j + 1].mean(-1)
        echo = a[:, qi, j].mean(-1)
        # long-range mass: attention on keys more than FAR_WINDOW tokens back, sink excluded
        ki = torch.arange(t, device=a.device)
        far_mask = (ki[None, :] >= 1) & (ki[None, :] < qi[:, None] - FAR_WINDOW)
        far = (a[:, qi, :] * far_mask).sum(-1).mean(-1)
        self.scores[ctx.layer_idx] = torch.stack([ind, echo, far]).view(3, hk, hq // hk).cpu()
        return None


@torch.no_grad()
def retrieval_head_scores(
    model: Any, *, length: int = 256, seeds: int = 3, bos_id: int | None = None
) -> dict[int, torch.Tensor]:
    """RazorAttention's data-free head scores (section 3.2): per full-attention layer index a
    ``[3, Hkv]`` tensor - the induction score (row 0) and the echo score (row 1) of each KV head,
    plus (row 2, ours) its long-range mass: attention on keys more than :data:`FAR_WINDOW`
    tokens back (the sink excluded) - each the largest over the query heads that read it (a KV head must stay whole if any of its
    query heads retrieves). Scores are attention probabilities averaged over the second copy of
    ``seeds`` random sequences of ``length`` tokens, each repeated twice."""
    from .generate import prefill

    if length < 4 or seeds < 1:
        raise ValueError("length must be >= 4 and seeds >= 1")
    vocab = int(model.config.vocab_size)
    lo, hi = min(100, vocab // 4), max(vocab - 100, vocab // 2 + 1)
    dev = next(model.parameters()).device
    if bos_id is None:
        bos_id = getattr(model.config, "bos_token_id", None)
        bos_id = int(bos_id[0] if isinstance(bos_id, (list, tuple)) else bos_id or 0)
    total: dict[int, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    for _ in range(seeds):
        x = torch.randint(lo, hi, (length,), generator=g)
        ids = torch.cat([torch.tensor([bos_id]), x, x])[None].to(dev)
        probe = _ProbePress(length)
        prefill(model, ids, probe)
        for li, s in probe.scores.items():
            s = s.amax(-1)  # [3, Hkv]
            total[li] = total[li] + s if li in total else s
    return {li: s / seeds for li, s in total.items()}


class HeadSplitLayer(BatchMappedLayer):
    """A layer whose KV heads are split in two stored parts: ``full`` (retrieval heads, every
    token) and ``local`` (the other heads: sinks + recent buffer), each an
    :class:`~ctxzip.kvcache.cache.EvictedLayer` or a
    :class:`~ctxzip.kvcache.kivi.KIVILayer`, plus the local heads' compensation token
    ``comp_k``/``comp_v`` ``[B, |S|, 1, d]`` with its weight ``log n_dropped`` (``[B, |S|]``).

    Attention sees ``[B, H, pad_to + n_new, d]``: full heads in position order, local heads
    right-aligned behind their compensation token, unused slots masked (per-head additive mask
    through the ``"ctxzip_ragged"`` attention)."""

    is_croppable = False

    def __init__(
        self,
        full: Any,
        local: Any,
        full_heads: list[int],
        local_heads: list[int],
        comp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        logical_length: int,
        pad_to: int,
        like: torch.Tensor,
    ):
        super().__init__()
        self.lazy_initialization(like[:, :, :0], like[:, :, :0])
        self.full, self.local = full, local
        self.full_heads, self.local_heads = list(full_heads), list(local_heads)
        self.comp = comp
        self.logical_length = int(logical_length)
        self.pad_to = int(pad_to)
        self.n_new = 0
        self.keys = self.values = None
        self.is_initialized = True

    @property
    def num_heads(self) -> int:
        return len(self.full_heads) + len(self.local_heads)

    def stored_length(self) -> int:
        return self.pad_to + self.n_new

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        s = self.stored_length()
        return s + query_length, self.logical_length - s

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        self.logical_length += n
        self.n_new += n
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        width = self.pad_to + self.n_new
        k = key_states.new_zeros((b, h, width, d))
        v = value_states.new_zeros((b, h, width, dv))
        bias = key_states.new_full((b, h, width), float("-inf"), dtype=torch.float32)
        for part, heads in ((self.full, self.full_heads), (self.local, self.local_heads)):
            if part is None or not heads:
                continue
            idx = torch.tensor(heads, device=key_states.device)
            pk, pv = part.update(key_states[:, idx], value_states[:, idx])
            s = pk.shape[-2]
            k[:, idx, width - s :] = pk.to(k.dtype)
            v[:, idx, width - s :] = pv.to(v.dtype)
            bias[:, idx, width - s :] = 0.0
            if part is self.local and self.comp is not None:
                ck, cv, w = self.comp
                slot = width - s - 1
                k[:, idx, slot] = ck[:, :, 0].to(k.dtype)
                v[:, idx, slot] = cv[:, :, 0].to(v.dtype)
                bias[:, idx, slot] = w.float()
        _register_key_mask(k, bias)
        return k, v

    def nbytes(self) -> int:
        comp = 0 if self.comp is None else _tensor_nbytes(list(self.comp), set())
        return sum(layer_nbytes(p) for p in (self.full, self.local) if p is not None) + comp

    def shared_nbytes(self) -> int:
        return max(getattr(p, "shared_nbytes", lambda: 0)() for p in (self.full, self.local) if p is not None)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache layer cannot be cropped")

    def _map_batch(self, fn: Any) -> None:
        for p in (self.full, self.local):
            if p is None:
                continue
            if isinstance(p, BatchMappedLayer):
                p._map_batch(fn)
            else:
                p.keys, p.values = fn(p.keys), fn(p.values)
        if self.comp is not None:
            self.comp = tuple(fn(t) for t in self.comp)


@dataclass
class RazorAttentionPress(BasePress):
    """RazorAttention (Tang et al., ICLR 2025, arXiv 2407.15891): retrieval heads keep every
    token; the other heads keep ``sink`` tokens, a recent buffer and a compensation token.

    Args:
        budget: the non-retrieval heads' buffer ``N / C`` as a shared
            :class:`~ctxzip.budget.Budget` (rate of the context or absolute tokens); the buffer
            is ``max(min_buffer, budget.resolve(N))`` recent tokens.
        retrieval_fraction: share of all KV heads (over every full-attention layer) kept whole:
            the top echo heads (``echo_fraction``) plus the top induction heads for the rest.
            The paper protects ~15% (1% echo + 14% induction).
        echo_fraction: share of KV heads chosen by echo score.
        induction_fraction: ``None`` (the paper): every head after the echo heads is chosen by
            induction score. A number: that share by induction score, and the rest of
            ``retrieval_fraction`` by the probe's long-range mass (ours: beyond the few clear
            echo/induction heads a small model's induction scores are ~0 and rank noise).
        min_buffer: the paper's ``S0`` (smallest buffer).
        sink: the first tokens every head keeps (``N0``, attention sinks).
        compensation: fold the dropped tokens into one compensation token (mean key, mean
            value, weighted as ``n_dropped`` tokens).
        quant: store the retrieval heads with this :class:`~ctxzip.kvcache.kivi.KIVIPress`
            (its ``sink``/``window`` apply per part); ``None`` keeps full precision.
        local_quant: the same for the other heads (default: ``quant``).
        head_scores: ``{layer: [3, Hkv]}`` (induction, echo, long-range mass) from
            :func:`retrieval_head_scores` (two rows suffice without ``induction_fraction``);
            computed on the model the first time the press is applied when ``None``.
        probe_length: random tokens per probe copy when the scores are computed here.
    """

    budget: Budget = field(default_factory=lambda: Budget(rate=0.05))
    retrieval_fraction: float = 0.15
    echo_fraction: float = 0.01
    induction_fraction: float | None = None
    min_buffer: int = 32
    sink: int = 4
    compensation: bool = True
    quant: KIVIPress | None = None
    local_quant: KIVIPress | None = None
    head_scores: dict[int, torch.Tensor] | None = None
    probe_length: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.retrieval_fraction <= 1.0:
            raise ValueError(f"retrieval_fraction must be in [0, 1], got {self.retrieval_fraction!r}")
        if not 0.0 <= self.echo_fraction <= self.retrieval_fraction:
            raise ValueError("echo_fraction must be in [0, retrieval_fraction]")
        if self.induction_fraction is not None and not (
            0.0 <= self.induction_fraction <= self.retrieval_fraction - self.echo_fraction + 1e-12
        ):
            raise ValueError("induction_fraction must be in [0, retrieval_fraction - echo_fraction]")
        if self.min_buffer < 0 or self.sink < 0:
            raise ValueError("min_buffer and sink must be >= 0")
        for name in ("quant", "local_quant"):
            q = getattr(self, name)
            if q is not None and not isinstance(q, KIVIPress):
                raise ValueError(f"{name} must be a KIVIPress or None")
        self.needs_ctxzip_attention = True
        self._retrieval: set[tuple[int, int]] | None = None

    # ------------------------------------------------------------------ head selection
    def calibrate(self, model: Any) -> RazorAttentionPress:
        """Compute the head scores on ``model`` (random-token probe; no data needed)."""
        self.head_scores = retrieval_head_scores(model, length=self.probe_length)
        self._retrieval = None
        return self

    def retrieval_heads(self) -> set[tuple[int, int]]:
        """``{(layer, kv_head)}`` kept whole: the top echo heads, then induction heads."""
        if self._retrieval is None:
            if not self.head_scores:
                raise ValueError("no head scores: call calibrate(model) or pass head_scores")
            keys = [(li, h) for li in sorted(self.head_scores) for h in range(self.head_scores[li].shape[1])]
            ind = torch.tensor([float(self.head_scores[li][0, h]) for li, h in keys])
            echo = torch.tensor([float(self.head_scores[li][1, h]) for li, h in keys])
            n_total = round(self.retrieval_fraction * len(keys))
            n_echo = min(n_total, round(self.echo_fraction * len(keys)))
            n_ind = n_total - n_echo
            if self.induction_fraction is not None:
                n_ind = min(n_ind, round(self.induction_fraction * len(keys)))
            chosen: list[int] = torch.argsort(echo, descending=True, stable=True)[:n_echo].tolist()
            order = [(ind, n_echo + n_ind)]
            if self.induction_fraction is not None:
                if any(self.head_scores[li].shape[0] < 3 for li in self.head_scores):
                    raise ValueError("induction_fraction needs the long-range row of retrieval_head_scores")
                far = torch.tensor([float(self.head_scores[li][2, h]) for li, h in keys])
                order.append((far, n_total))
            for score, upto in order:
                for i in torch.argsort(score, descending=True, stable=True).tolist():
                    if len(chosen) >= upto:
                        break
                    if i not in chosen:
                        chosen.append(i)
            self._retrieval = {keys[i] for i in chosen}
        return self._retrieval

    def _apply(self, model: torch.nn.Module):
        if self.head_scores is None:
            self.calibrate(model)
        return super()._apply(model)

    # ------------------------------------------------------------------ compression
    def buffer(self, seq_len: int) -> int:
        return max(self.min_buffer, self.budget.resolve(seq_len))

    def compress_layer(self, ctx: LayerContext) -> Any:
        t = ctx.seq_len
        b, h = ctx.keys.shape[:2]
        keep = min(t, self.sink + self.buffer(t))
        retr = self.retrieval_heads()
        full_heads = [i for i in range(h) if (ctx.layer_idx, i) in retr]
        local_heads = [i for i in range(h) if (ctx.layer_idx, i) not in retr]
        if keep >= t or not local_heads:
            if self.quant is None:
                return EvictedLayer(ctx.keys, ctx.values, t)
            pos = torch.arange(t, device=ctx.keys.device).expand(b, h, t)
            return self.quant.build_layer(ctx, ctx.keys, ctx.values, pos, t)
        dev = ctx.keys.device
        # local heads: the first `sink` real tokens and the last `buffer` ones (padding never)
        pos = torch.arange(t, device=dev, dtype=torch.float32)
        if ctx.key_padding is not None:
            real = ctx.key_padding.bool()
            rank = real.long().cumsum(-1) - 1  # index among the row's real tokens
            score = torch.where(rank < self.sink, torch.full_like(pos, float("inf")).expand(b, t), pos.expand(b, t))
            score = score.masked_fill(~real, float("-inf"))
        else:
            real = torch.ones(b, t, dtype=torch.bool, device=dev)
            score = pos.clone()
            score[: self.sink] = float("inf")
            score = score.expand(b, t)
        idx = topk_indices(score, keep, dim=-1)  # [B, keep] position order
        li = torch.tensor(local_heads, device=dev)
        lk, lv = ctx.keys[:, li], ctx.values[:, li]
        gi = idx[:, None, :, None]
        kk = lk.gather(2, gi.expand(-1, len(local_heads), -1, lk.shape[-1]))
        kv = lv.gather(2, gi.expand(-1, len(local_heads), -1, lv.shape[-1]))
        comp = None
        if self.compensation:
            dropped = real.clone()
            dropped.scatter_(1, idx, False)
            n_d = dropped.sum(-1)  # [B]
            w = dropped.to(lk.dtype)[:, None, :, None]
            denom = n_d.clamp_min(1).to(lk.dtype)[:, None, None, None]
            ck = (lk * w).sum(2, keepdim=True) / denom
            cv = (lv * w).sum(2, keepdim=True) / denom
            logw = torch.where(n_d > 0, n_d.float().clamp_min(1).log(), torch.full_like(n_d, float("-inf"), dtype=torch.float32))
            comp = (ck, cv, logw[:, None].expand(b, len(local_heads)).contiguous())
        fi = torch.tensor(full_heads, device=dev, dtype=torch.long)
        fk, fv = ctx.keys[:, fi], ctx.values[:, fi]
        full: Any = None
        if full_heads:
            if self.quant is None:
                full = EvictedLayer(fk, fv, t)
            else:
                fpos = torch.arange(t, device=dev).expand(b, len(full_heads), t)
                full = self.quant.build_layer(ctx, fk, fv, fpos, t)
        lq = self.local_quant if self.local_quant is not None else self.quant
        if lq is None:
            local = EvictedLayer(kk, kv, t)
        else:
            local = lq.build_layer(ctx, kk, kv, idx[:, None, :].expand(b, len(local_heads), keep), t)
        # every head-split layer pads to the context length (retrieval heads hold all of it), so
        # transformers' one attention mask fits every layer; +1 slot is never needed because a
        # local head holds keep + 1 <= t entries
        return HeadSplitLayer(full, local, full_heads, local_heads, comp, t, t, ctx.keys)

    def describe(self) -> dict[str, Any]:
        """The chosen ``(layer, kv_head)`` retrieval heads and their number (for logs)."""
        r = sorted(self.retrieval_heads())
        return {"retrieval_heads": r, "n_retrieval": len(r)}

