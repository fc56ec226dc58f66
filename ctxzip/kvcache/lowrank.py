"""Low-rank channel compression of the KV cache with PCA projections calibrated on local text.

This is the training-free PCA initialisation of MatryoshkaKV (Lin et al., 2024, arXiv
2410.14731; ``cal_pcallama_init.py``): per layer and KV head, the running mean and covariance
of the **post-RoPE** keys and of the values over calibration text, ``eigh``, eigenvectors sorted
by eigenvalue. The cache stores ``(x - mu) @ U[:, :r]`` only; attention uses
``c @ U[:, :r]^T + mu`` (exact at ``r = d`` because ``U`` is orthogonal). As in CSKV (Wang et
al., 2024, arXiv 2409.10593) the most recent ``recent_window`` tokens stay at full precision,
and tokens decoded later are kept in full precision too (CSKV's bi-branch cache).

Deviations, on purpose: MatryoshkaKV's trained projections need its training run (not done
here: training-free PCA only); CSKV factorises ``k_proj``/``v_proj`` (pre-RoPE) by SVD of the
weights - we project the cached post-RoPE states by their data PCA, which needs no re-RoPE at
every step. Ranks per (layer, KV head, K|V) come from one global budget split with
:func:`ctxzip.budget.allocate` by explained variance (MatryoshkaKV's greedy schedule measures
the model output instead; UNVERIFIED equivalence, a cheaper proxy).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .._hf_compat import with_cache
from ..budget import allocate, topk_indices
from .base import BasePress, LayerContext, attention_modules
from .cache import BatchMappedLayer, EvictedLayer, _tensor_nbytes
from .kivi import rotate_keys

__all__ = ["LowRankPress", "PCACalibration", "LowRankLayer", "calibrate_pca"]


@dataclass
class PCACalibration:
    """Per-layer PCA of cached keys/values: ``mean_k[l]`` ``[H, d]``, ``basis_k[l]`` ``[H, d, d]``
    (columns = eigenvectors, descending eigenvalue), ``eig_k[l]`` ``[H, d]``; same for values.
    Layers without calibration data (sliding-window layers) are ``None``."""

    mean_k: list[torch.Tensor | None]
    basis_k: list[torch.Tensor | None]
    eig_k: list[torch.Tensor | None]
    mean_v: list[torch.Tensor | None]
    basis_v: list[torch.Tensor | None]
    eig_v: list[torch.Tensor | None]
    n_tokens: int
    #: keys were un-rotated (RoPE removed) before the PCA; the press projects pre-RoPE keys
    pre_rope: bool = False

    def save(self, path: str) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: str) -> PCACalibration:
        return cls(**torch.load(path, weights_only=True))


def _pca(sum_x: torch.Tensor, sum_xx: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    mu = sum_x / n  # [H, d]
    cov = sum_xx / n - mu[:, :, None] * mu[:, None, :]
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    eig, vec = torch.linalg.eigh(cov)  # ascending
    return mu, vec.flip(-1), eig.flip(-1).clamp_min(0)


@torch.no_grad()
def calibrate_pca(
    model: torch.nn.Module,
    input_ids: Iterable[torch.Tensor],
    pre_rope: bool = True,
) -> PCACalibration:
    """Running mean / second moment of every full-attention layer's cached keys and values over
    the given token sequences (each ``[1, T]``), then ``eigh``. With ``pre_rope`` the keys are
    un-rotated first (each layer's own ``cos``/``sin``): pre-RoPE keys are low-rank, post-RoPE
    keys are not (RoPE spreads each channel pair's energy over positions; ShadowKV, Sun et al.,
    2024, arXiv 2410.21465; Palu)."""
    mods = attention_modules(model)
    n_layers = len(mods)
    acc: list[dict[str, Any] | None] = [None] * n_layers
    n = 0
    dev = next(model.parameters()).device
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(module: Any, _args: tuple, kwargs: dict) -> None:
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            rope[module.layer_idx] = pe

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in mods] if pre_rope else []
    try:
        for ids in input_ids:
            cache = DynamicCache(config=model.config)
            rope.clear()
            model(ids.to(dev), use_cache=True, **with_cache(cache))
            _accumulate(cache, acc, rope if pre_rope else None)
            n += int(ids.shape[-1])
    finally:
        for h in handles:
            h.remove()
    return _finish(acc, n, pre_rope)


def _accumulate(cache: Any, acc: list, rope: dict | None) -> None:
    for li, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or layer.keys is None:
            continue
        keys = layer.keys
        if rope is not None:
            cos, sin = rope[li]
            keys = rotate_keys(keys.float(), cos[:, None].float(), sin[:, None].float(), inverse=True)
        k = keys[0].double()  # [H, T, d]
        v = layer.values[0].double()
        a = acc[li]
        if a is None:
            a = acc[li] = {
                "sk": torch.zeros(k.shape[0], k.shape[-1], dtype=torch.float64),
                "skk": torch.zeros(k.shape[0], k.shape[-1], k.shape[-1], dtype=torch.float64),
                "sv": torch.zeros(v.shape[0], v.shape[-1], dtype=torch.float64),
                "svv": torch.zeros(v.shape[0], v.shape[-1], v.shape[-1], dtype=torch.float64),
            }
        a["sk"] += k.sum(1).cpu()
        a["skk"] += (k.transpose(1, 2) @ k).cpu()
        a["sv"] += v.sum(1).cpu()
        a["svv"] += (v.transpose(1, 2) @ v).cpu()


def _finish(acc: list, n: int, pre_rope: bool) -> PCACalibration:
    if n == 0:
        raise ValueError("calibration needs at least one non-empty token sequence")
    out: dict[str, list] = {k: [] for k in ("mean_k", "basis_k", "eig_k", "mean_v", "basis_v", "eig_v")}
    for a in acc:
        if a is None:
            for k in out:
                out[k].append(None)
            continue
        for kind, s1, s2 in (("k", "sk", "skk"), ("v", "sv", "svv")):
            mu, vec, eig = _pca(a[s1], a[s2], n)
            out[f"mean_{kind}"].append(mu.float())
            out[f"basis_{kind}"].append(vec.float())
            out[f"eig_{kind}"].append(eig.float())
    return PCACalibration(n_tokens=n, pre_rope=pre_rope, **out)


def default_calibration_texts(n_chars: int = 24_000) -> list[str]:
    """Local English and Python text for calibration that the shared evaluation corpora do not
    use: module docstrings and source of a few CPython packages that are not single stdlib
    ``.py`` files (``email``, ``json``, ``http``, ``logging`` package ``__init__`` files)."""
    import importlib

    texts, total = [], 0
    for name in ("email.message", "json.decoder", "http.client", "logging.handlers", "unittest.case"):
        try:
            mod = importlib.import_module(name)
            with open(mod.__file__, encoding="utf-8") as f:
                src = f.read()
        except (OSError, ImportError, AttributeError):
            continue
        texts.append(src)
        total += len(src)
        if total >= n_chars:
            break
    if not texts:
        raise RuntimeError("no local calibration text found (CPython sources missing?)")
    return texts


class LowRankLayer(BatchMappedLayer):
    """Cache layer storing PCA coordinates of old tokens + a full-precision recent window.

    ``coef_k[h]``: ``[B, T_c, r_k(h)]``; the basis/mean are shared model constants (not counted
    in :meth:`nbytes`; :meth:`shared_nbytes` reports them). ``keys``/``values`` hold the
    full-precision recent window and every token decoded later.
    """

    is_croppable = False

    def __init__(
        self,
        coef_k: list[torch.Tensor],
        coef_v: list[torch.Tensor],
        basis_k: list[torch.Tensor],
        basis_v: list[torch.Tensor],
        mean_k: torch.Tensor,
        mean_v: torch.Tensor,
        recent_k: torch.Tensor,
        recent_v: torch.Tensor,
        logical_length: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.lazy_initialization(recent_k, recent_v)
        self.coef_k, self.coef_v = coef_k, coef_v
        self.basis_k, self.basis_v = basis_k, basis_v  # per head [d, r]
        self.mean_k, self.mean_v = mean_k, mean_v  # [H, d]
        self.keys, self.values = recent_k, recent_v
        self.logical_length = int(logical_length)
        # cos/sin [Bc, T_c, d_rot] of the projected tokens when the coordinates are pre-RoPE
        # (a slice of the model's RoPE table: a shared, recomputable constant)
        self.rope = rope

    def _reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        ks = [c.float() @ u.T for c, u in zip(self.coef_k, self.basis_k)]
        vs = [c.float() @ u.T for c, u in zip(self.coef_v, self.basis_v)]
        k = torch.stack(ks, 1) + self.mean_k[None, :, None, :]
        v = torch.stack(vs, 1) + self.mean_v[None, :, None, :]
        if self.rope is not None:
            cos, sin = self.rope
            k = rotate_keys(k, cos[:, None].float(), sin[:, None].float())
        return k.to(self.keys.dtype), v.to(self.values.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        self.logical_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        k, v = self._reconstruct()
        return torch.cat([k, self.keys], -2), torch.cat([v, self.values], -2)

    def stored_length(self) -> int:
        return self.coef_k[0].shape[1] + self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        s = self.stored_length()
        return s + query_length, self.logical_length - s

    def nbytes(self) -> int:
        seen: set[int] = set()
        return sum(
            _tensor_nbytes(t, seen) for t in (self.coef_k, self.coef_v, self.keys, self.values)
        )

    def shared_nbytes(self) -> int:
        seen: set[int] = set()
        return sum(
            _tensor_nbytes(t, seen)
            for t in (self.basis_k, self.basis_v, self.mean_k, self.mean_v, self.rope or ())
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache layer cannot be cropped")

    def _map_batch(self, fn: Any) -> None:
        self.coef_k = [fn(c) for c in self.coef_k]
        self.coef_v = [fn(c) for c in self.coef_v]
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.rope is not None and self.rope[0].shape[0] > 1:
            self.rope = (fn(self.rope[0]), fn(self.rope[1]))


@dataclass
class LowRankPress(BasePress):
    """Store old tokens' keys/values as PCA coordinates (MatryoshkaKV PCA init, CSKV window).

    Args:
        budget: ``rate`` = fraction of the ``d`` channels kept on average over all (layer, KV
            head, K|V) groups (bytes of the projected part scale with it); ``tokens`` is not
            meaningful here and raises.
        calibration: a :class:`PCACalibration`; build one with :meth:`calibrate` (on local text)
            before use.
        recent_window: most recent tokens kept at full precision (CSKV: 32).
        allocation: ``"variance"`` - ranks from one global budget by normalised eigenvalues
            (explained-variance share, :func:`ctxzip.budget.allocate`); ``"uniform"`` - the
            same rank everywhere.
        coef_dtype: dtype of the stored coordinates (``None`` = the cache dtype).
        min_rank: floor of the rank of every group.
    """

    calibration: PCACalibration | None = None
    recent_window: int = 32
    allocation: str = "variance"
    coef_dtype: torch.dtype | None = None
    min_rank: int = 1
    _ranks: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget.rate is None:
            raise ValueError("LowRankPress needs Budget(rate=...) (fraction of channels kept)")
        if self.recent_window < 0:
            raise ValueError("recent_window must be >= 0")
        if self.allocation not in ("variance", "uniform"):
            raise ValueError("allocation must be 'variance' or 'uniform'")

    def calibrate(
        self, model: torch.nn.Module, tokenizer: Any = None, texts: list[str] | None = None,
        max_tokens: int = 1024, max_sequences: int = 8,
    ) -> LowRankPress:
        """Fit the PCA on ``texts`` (default: :func:`default_calibration_texts`), each truncated
        to ``max_tokens`` tokens. Returns ``self``."""
        if tokenizer is None:
            from ..models import load_tokenizer

            tokenizer = load_tokenizer()
        texts = texts if texts is not None else default_calibration_texts()
        seqs = []
        for t in texts[:max_sequences]:
            ids = tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
            if ids.shape[-1] > 1:
                seqs.append(ids)
        self.calibration = calibrate_pca(model, seqs)
        self._ranks.clear()
        return self

    def ranks(self) -> dict[int, tuple[list[int], list[int]]]:
        """Per layer: (key ranks per head, value ranks per head)."""
        if self._ranks:
            return self._ranks
        cal = self._require()
        groups = []  # (layer, kind, head, eig)
        for li, (ek, ev) in enumerate(zip(cal.eig_k, cal.eig_v)):
            if ek is None:
                continue
            for kind, e in (("k", ek), ("v", ev)):
                for h in range(e.shape[0]):
                    groups.append((li, kind, h, e[h]))
        d = groups[0][3].shape[0]
        total = int(round(self.budget.rate * d * len(groups)))
        if self.allocation == "uniform":
            counts = [max(self.min_rank, min(d, int(round(self.budget.rate * d))))] * len(groups)
        else:
            shares = torch.stack([g[3] / g[3].sum().clamp_min(1e-12) for g in groups])  # [G, d]
            top = topk_indices(shares.reshape(-1), total, sort_by_position=False)
            weights = torch.bincount(top // d, minlength=len(groups)).numpy()
            counts = allocate(total, [d] * len(groups), weights, method="score", floors=self.min_rank)
        out: dict[int, tuple[list[int], list[int]]] = {}
        for (li, kind, h, _), c in zip(groups, counts):
            rk, rv = out.setdefault(li, ([0] * cal.eig_k[li].shape[0], [0] * cal.eig_v[li].shape[0]))
            (rk if kind == "k" else rv)[h] = int(c)
        self._ranks.update(out)
        return self._ranks

    def _require(self) -> PCACalibration:
        if self.calibration is None:
            raise ValueError(
                "LowRankPress has no calibration: call press.calibrate(model, tokenizer) first "
                "(PCA on local text) or pass calibration=PCACalibration.load(path)"
            )
        return self.calibration

    def compress_layer(self, ctx: LayerContext) -> Any:
        cal = self._require()
        li = ctx.layer_idx
        if li >= len(cal.basis_k) or cal.basis_k[li] is None:
            return None
        t = ctx.seq_len
        if self.budget.rate >= 1.0 or t <= self.recent_window:
            return EvictedLayer(ctx.keys, ctx.values, t)
        rk, rv = self.ranks()[li]
        n_old = t - self.recent_window
        dev = ctx.keys.device
        k_old = ctx.keys[:, :, :n_old].float()
        rope = None
        if cal.pre_rope:
            cos, sin = ctx.position_embeddings
            rope = (cos[:, :n_old], sin[:, :n_old])
            k_old = rotate_keys(k_old, rope[0][:, None].float(), rope[1][:, None].float(), inverse=True)
        v_old = ctx.values[:, :, :n_old].float()
        mk, mv = cal.mean_k[li].to(dev), cal.mean_v[li].to(dev)
        cdt = self.coef_dtype or ctx.keys.dtype
        coef_k, coef_v, bk, bv = [], [], [], []
        for h in range(k_old.shape[1]):
            uk = cal.basis_k[li][h, :, : rk[h]].to(dev)
            uv = cal.basis_v[li][h, :, : rv[h]].to(dev)
            coef_k.append(((k_old[:, h] - mk[h]) @ uk).to(cdt))
            coef_v.append(((v_old[:, h] - mv[h]) @ uv).to(cdt))
            bk.append(uk)
            bv.append(uv)
        return LowRankLayer(
            coef_k, coef_v, bk, bv, mk, mv,
            ctx.keys[:, :, n_old:].contiguous(), ctx.values[:, :, n_old:].contiguous(), t, rope,
        )
