"""ONNX Runtime backend for :class:`~ctxzip.prompt.TokenClassifierCompressor` (``fast="onnx"`` /
``fast="onnx-int8"``).

The classifier is exported once with ``torch.onnx.export``, its attention, GELU and layer norms
are fused by ``onnxruntime.transformers.optimizer`` (BERT-family graphs), and for ``"onnx-int8"``
the matrix products are quantized with ONNX Runtime's dynamic int8 quantizer (weights int8 per
output channel, activations uint8 per tensor, computed per call). Per-tensor activation scales
lose precision on the few hidden channels with very large values that BERT-style encoders are
known for, so before quantizing, activation outliers are moved into the weights as in
SmoothQuant (Xiao et al., ICML 2023, arXiv 2211.10438, eq. 4): for a product ``X W`` the input
channels get ``s_j = max|X_j|^a / max|W_j|^(1-a)``, the graph computes ``(X / s) (diag(s) W)``.
Post-LN BERT feeds each layer norm's output to both a matrix product and a residual sum, so the
division cannot be folded into the layer norm; it is an explicit, cheap elementwise ``Mul``.
``max|X_j|`` comes from a calibration pass of the fp32 graph over fixed text (standard-library
docstrings, not the benchmark's data). The embedding layer and the 2-way classifier head stay
fp32 (negligible cost; quantizing them only lost agreement), and so do the FFN output products
of the first two encoder layers (``fp32_ffn_out``): BERT-style encoders carry their strongest
activation outliers in the FFN output and the residual sum after it (Bondarenko et al., EMNLP
2021, "Understanding and Overcoming the Challenges of Efficient Transformer Quantization", one
of whose remedies is mixed precision for exactly those activations). For the MiniLM classifiers here it is
the early layers: leaving layers 0 and 1's FFN output in fp32 (11% of the matrix-product FLOPs)
raised the share of per-chunk decisions identical to fp32 from 98.06% to 98.81% at 10k words
with the default classifier, more than any SmoothQuant strength did (docs/prompt.md).
On x86 CPUs without VNNI the weights are stored as unsigned int8 (``weights``): ONNX Runtime's
signed-weight kernels saturate 16-bit sums there and lost 0.7-0.8 points of that agreement.

The graph is also shaped for what the compressor feeds it, one unpadded sequence per call:

* no attention mask: with ``attention="mha"`` (default) the attention is fused into ONNX
  Runtime's ``MultiHeadAttention``, whose CPU kernel runs a flash-attention loop (score tiles
  kept in L2) only when there is no key padding mask; Q, K and V come from one packed product
  (input smoothed and quantized once) and a ``Split``. ``attention="fused"`` keeps the older
  packed ``Attention`` op, which materialises all heads' ``(seq, seq)`` scores.
* layer norms as elementwise ops (``split_layer_norm``): ONNX Runtime's fused
  ``SkipLayerNormalization`` CPU kernel took ~1 ms per ``(480, 384)`` call here, the same
  arithmetic as separate ops ~0.3 ms.

Together these cut the CPU time per 480-token MiniLM chunk by ~20% (1 thread) against the
plain fused graph, at the same agreement with exact mode.

Converted graphs are cached on disk (``ctxzip.models.cache_dir()/onnx``), keyed by a hash of
the weights and the settings, so only the first use pays the ~10-30 s conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OnnxClassifier", "onnxruntime_available"]

FORMAT_VERSION = 5
SMOOTH_ALL = ("qkv", "ffn_in", "attn_out", "ffn_out", "head")
FP32_PARTS = ("embed", "head")
#: encoder layers whose FFN output product stays fp32 under ``quantize=True`` (see the module doc)
FP32_FFN_OUT = (0, 1)
#: int8 weight types of :class:`OnnxClassifier` (``weights=``)
WEIGHT_TYPES = ("s8", "u8", "s7")
# session-level fusions that would turn the decomposed layer norms back into the slow kernels
_LN_FUSIONS = ["LayerNormFusion", "SimplifiedLayerNormFusion", "SkipLayerNormFusion"]


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_flags() -> set[str]:
    """CPU feature flags of the first core from ``/proc/cpuinfo`` (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_vnni() -> bool:
    """Whether the CPU has x86 VNNI int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def default_weights() -> str:
    """Default int8 weight type: ``"u8"`` on x86 CPUs without VNNI, where ONNX Runtime's u8s8
    kernels can saturate 16-bit pair sums, ``"s8"`` elsewhere (VNNI and ARM dot products
    accumulate in 32 bits)."""
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return "u8" if x86 and not cpu_has_vnni() else "s8"


def _require() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            "fast='onnx'/'onnx-int8' needs ONNX Runtime: pip install 'ctxzip[fast]' "
            f"(onnxruntime, onnx) - {e}"
        ) from e
    return onnxruntime


def _weights_hash(model: Any, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def calibration_text() -> str:
    """Fixed English calibration text: docstrings of a few standard-library modules/classes."""
    import argparse
    import collections
    import inspect
    import json
    import logging
    import subprocess
    import unittest

    mods = [argparse, json, logging, subprocess, collections, unittest]
    parts = [inspect.getdoc(m) or "" for m in mods]
    for m in (subprocess, logging, argparse):
        for n in sorted(dir(m)):
            obj = getattr(m, n)
            if not n.startswith("_") and inspect.isclass(obj):
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


class OnnxClassifier:
    """Token classifier as an ONNX Runtime session returning the keep probability per token.

    Args:
        model: a ``transformers`` token-classification model (2 labels; label 1 = keep).
        tokenizer: its fast tokenizer (used for calibration only).
        quantize: int8 dynamic quantization with SmoothQuant-style outlier smoothing.
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
        alpha: SmoothQuant migration strength ``a`` (Xiao et al. 2023, eq. 4; 0 = no migration,
            1 = all of the activation range moved into the weights).
        smooth: which products to smooth: ``"qkv"``, ``"ffn_in"``, ``"attn_out"``, ``"ffn_out"``,
            ``"head"``.
        fast_gelu: tanh approximation of GELU (no measurable gain on CPU; off).
        fp32: parts left unquantized: ``"embed"`` (embedding layer norm) and/or ``"head"``
            (classifier).
        fp32_ffn_out: encoder layers (0-based) whose FFN output product (the one after the
            GELU) is left unquantized and unsmoothed; ``()`` quantizes all of them.
        unpadded: drop the attention mask from the graph (every call is one unpadded sequence;
            :meth:`__call__` with padding then runs row by row on the unmasked tokens, which
            must be a right-padded prefix of the row).
        split_layer_norm: layer norms as elementwise ops instead of ORT's slower fused kernel.
        attention: ``"mha"`` (``MultiHeadAttention``, flash attention without a mask) or
            ``"fused"`` (packed ``Attention``/``QAttention`` op).
        weights: how matrix weights are quantized: ``"s8"`` (signed 8-bit, ONNX Runtime's u8s8
            kernels), ``"u8"`` (unsigned 8-bit with per-channel zero points, u8u8 kernels) or
            ``"s7"`` (signed 7-bit, ONNX Runtime's ``reduce_range``). On x86 CPUs without VNNI
            (AVX2, AVX-512F) the u8s8 kernels add pairs of 8-bit products in 16 bits
            (``vpmaddubsw``), which saturates; the u8u8 kernels widen to 16 bits first and
            are exact. ``None`` (default): ``"u8"`` on x86 without VNNI, ``"s8"`` elsewhere
            (:func:`default_weights`). Measured on an AVX2-only CPU with the default classifier
            at 10k words: 97.91% of decisions identical to fp32 with ``"s8"``, 98.05% with
            ``"s7"``, 98.61% with ``"u8"`` (``"s8"`` on a VNNI CPU: 98.57%).
        cache: folder for converted graphs (default ``cache_dir()/onnx``); ``False`` = no cache.
    """

    def __init__(self, model: Any, tokenizer: Any, *, quantize: bool = True, threads: int | None = None,
                 alpha: float = 0.75, smooth: tuple[str, ...] = SMOOTH_ALL, fast_gelu: bool = False,
                 fp32: tuple[str, ...] = FP32_PARTS, fp32_ffn_out: tuple[int, ...] = FP32_FFN_OUT,
                 unpadded: bool = True, split_layer_norm: bool = True,
                 attention: str = "mha", weights: str | None = None,
                 cache: str | os.PathLike | bool | None = None) -> None:
        ort = _require()
        import torch

        self.threads = int(threads or torch.get_num_threads())
        self.quantize = quantize
        self.alpha = float(alpha)
        self.smooth = tuple(smooth)
        self.fast_gelu = bool(fast_gelu)
        bad = set(fp32) - set(FP32_PARTS)
        if bad:
            raise ValueError(f"fp32 parts must be among {FP32_PARTS}, got {sorted(bad)}")
        self.fp32 = tuple(p for p in FP32_PARTS if p in fp32)
        if isinstance(fp32_ffn_out, (str, bytes)) or not hasattr(fp32_ffn_out, "__iter__"):
            raise ValueError(f"fp32_ffn_out must be a tuple of layer indices (e.g. (0, 1) or ()), got {fp32_ffn_out!r}")
        fp32_ffn_out = tuple(fp32_ffn_out)
        if any(not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0 for i in fp32_ffn_out):
            raise ValueError(f"fp32_ffn_out must hold layer indices >= 0, got {fp32_ffn_out!r}")
        self.fp32_ffn_out = tuple(sorted({int(i) for i in fp32_ffn_out}))
        self.unpadded = bool(unpadded)
        self.split_layer_norm = bool(split_layer_norm)
        if attention not in ("fused", "mha"):
            raise ValueError(f"attention must be 'fused' or 'mha', got {attention!r}")
        self.attention = attention
        if weights is not None and weights not in WEIGHT_TYPES:
            raise ValueError(f"weights must be one of {WEIGHT_TYPES} or None (auto), got {weights!r}")
        self.weights = (weights or default_weights()) if quantize else "fp32"
        key = _weights_hash(
            model, f"v{FORMAT_VERSION}-q{int(quantize)}-a{alpha}-s{','.join(self.smooth)}-g{int(fast_gelu)}"
                   f"-f{','.join(self.fp32)}-o{','.join(map(str, self.fp32_ffn_out))}-u{int(self.unpadded)}-l{int(self.split_layer_norm)}-{attention}-w{self.weights}-{ort.__version__}"
        )
        if cache is False:
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="ctxzip-onnx-"))
        elif cache is None or cache is True:
            from ctxzip.models import cache_dir

            folder = Path(cache_dir()) / "onnx"
        else:
            folder = Path(cache)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"lingua2-{key}.onnx"
        if not final.exists():
            self._convert(model, tokenizer, final)
        self.path = final
        self.session = self._session(self.threads)
        self._single: Any = None  # one-thread session for chunk-parallel runs

    def _session(self, threads: int, *, profile: str | None = None) -> Any:
        """An ONNX Runtime session on the converted graph. ``profile``: a file prefix for ONNX
        Runtime's per-operator profiler (``benchmarks/prompt_fast_bound.py``)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if profile is not None:
            so.enable_profiling = True
            so.profile_file_prefix = profile
        return ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=_LN_FUSIONS if self.split_layer_norm else None)

    # ------------------------------------------------------------------ conversion
    def _convert(self, model: Any, tokenizer: Any, final: Path) -> None:
        import shutil
        import tempfile

        # work next to the final file (same file system for the atomic rename); always clean up
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=final.parent))
        try:
            self._convert_in(model, tokenizer, final, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _convert_in(self, model: Any, tokenizer: Any, final: Path, tmp: Path) -> None:
        import copy
        import warnings

        import torch

        m = copy.deepcopy(model).float().cpu().eval()
        if hasattr(m, "set_attn_implementation"):
            # the plain attention graph is what ORT's optimizer fuses into one Attention op
            with contextlib.suppress(Exception):
                m.set_attn_implementation("eager")

        class _Keep(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
                return torch.softmax(logits.float(), dim=-1)[..., 1]

        x = torch.randint(5, 100, (2, 16))
        raw = tmp / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Keep(m), (x, torch.ones_like(x)), str(raw),
                input_names=["input_ids", "attention_mask"], output_names=["keep_prob"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                              "keep_prob": {0: "batch", 1: "seq"}},
                opset_version=17, dynamo=False,
            )
        src = raw
        cfg = model.config
        try:
            from onnxruntime.transformers import optimizer
            from onnxruntime.transformers.fusion_options import FusionOptions

            fo = FusionOptions("bert")
            fo.enable_gelu_approximation = self.fast_gelu
            fo.use_multi_head_attention = self.attention == "mha"
            opt = optimizer.optimize_model(
                str(raw), model_type="bert", num_heads=int(cfg.num_attention_heads),
                hidden_size=int(cfg.hidden_size), opt_level=1, optimization_options=fo,
            )
            src = tmp / "opt.onnx"
            opt.save_model_to_file(str(src))
        except Exception as e:  # pragma: no cover - unfusable architecture: run the plain graph
            warnings.warn(f"ONNX Runtime fusion failed ({e}); using the unfused graph", stacklevel=3)
        import onnx

        if self.unpadded:
            # every call is one unpadded sequence: the fused attention needs no mask (ORT would
            # otherwise copy a (seq, seq) mask into every head's score matrix)
            g = onnx.load(str(src))
            for n in g.graph.node:
                if n.op_type == "Attention" and len(n.input) > 3:
                    n.input[3] = ""
                if n.op_type == "MultiHeadAttention" and len(n.input) > 4:
                    n.input[4] = ""  # key_padding_mask; without it ORT runs its CPU flash attention
            if self.attention == "mha":
                _pack_qkv(g)
            src = tmp / "nomask.onnx"
            onnx.save(g, str(src))
        if self.quantize:
            smooth = tmp / "smooth.onnx"
            keep_fp32 = self._smooth(src, smooth, tokenizer)
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(
                    str(smooth), str(tmp / "q.onnx"), per_channel=True, reduce_range=self.weights == "s7",
                    weight_type=QuantType.QUInt8 if self.weights == "u8" else QuantType.QInt8,
                    nodes_to_exclude=keep_fp32, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
            src = tmp / "q.onnx"
        if self.split_layer_norm:
            g = onnx.load(str(src))
            _split_layer_norms(g)
            src = tmp / "split.onnx"
            onnx.save(g, str(src))
        os.replace(src, final)

    def _smooth(self, src: Path, dst: Path, tokenizer: Any) -> list[str]:
        """Insert ``X / s`` before every weight product and scale the weights' rows by ``s``.

        Returns the names of the nodes to leave in fp32 (``self.fp32``: the embedding layer and
        the classifier head; ``self.fp32_ffn_out``: those layers' FFN output products); these
        are not smoothed."""
        import onnx
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        g = onnx.load(str(src))
        for k, n in enumerate(g.graph.node):
            if not n.name:
                n.name = f"ctxzip_node_{k}"
        keep_fp32 = []
        if "embed" in self.fp32:
            keep_fp32 += [n.name for n in g.graph.node if n.op_type == "EmbedLayerNormalization"]
        inits = {t.name: t for t in g.graph.initializer}
        targets = []  # (node, weight initializer name)
        for n in g.graph.node:
            if n.op_type in ("MatMul", "Attention") and len(n.input) > 1 and n.input[1] in inits:
                w = numpy_helper.to_array(inits[n.input[1]])
                if w.ndim == 2:
                    targets.append((n, n.input[1]))
        if targets and "head" in self.fp32:
            keep_fp32.append(targets[-1][0].name)
            targets = targets[:-1]
        if not targets:
            onnx.save(g, str(dst))
            return keep_fp32
        # calibration: abs max per input channel of every target's activation input
        names = sorted({n.input[0] for n, _ in targets})
        probe = onnx.load(str(src))
        known = {o.name for o in probe.graph.output}
        for nm in names:
            if nm not in known:
                probe.graph.output.append(helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None))
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ids = tokenizer(calibration_text(), add_special_tokens=False)["input_ids"]
        cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        amax: dict[str, np.ndarray] = {}
        step = 254
        for i in range(0, len(ids), step):
            seq = [t for t in [cls_id] if t is not None] + ids[i : i + step] + [t for t in [sep_id] if t is not None]
            x = np.asarray([seq], dtype=np.int64)
            outs = sess.run(names, {"input_ids": x, "attention_mask": np.ones_like(x)})
            for nm, a in zip(names, outs):
                v = np.abs(a).reshape(-1, a.shape[-1]).max(0)
                amax[nm] = np.maximum(amax[nm], v) if nm in amax else v
        # rewrite
        producer = {o: n for n in g.graph.node for o in n.output}

        def source(name: str) -> Any:
            """The node computing ``name``, looking through reshapes/transposes."""
            n = producer.get(name)
            while n is not None and n.op_type in ("Reshape", "Transpose", "Identity") and n.input:
                n = producer.get(n.input[0])
            return n

        last = len(targets) - 1 if "head" not in self.fp32 else -1  # head (last product) is in targets
        new_nodes = []
        n_ffn_out = 0  # FFN output products come in layer order
        for k, (n, wname) in enumerate(targets):
            src_node = source(n.input[0])
            kind = "qkv" if n.op_type == "Attention" or n.name.startswith("ctxzip_qkv") else (
                "head" if k == last else
                "attn_out" if src_node is not None and src_node.op_type in ("Attention", "MultiHeadAttention") else
                "ffn_out" if src_node is not None and "Gelu" in src_node.op_type else "ffn_in")
            if kind == "ffn_out":
                n_ffn_out += 1
                if n_ffn_out - 1 in self.fp32_ffn_out:
                    keep_fp32.append(n.name)
                    continue
            if kind not in self.smooth:
                continue
            w = numpy_helper.to_array(inits[wname]).astype(np.float32)
            act = amax[n.input[0]].astype(np.float32)
            wmax = np.abs(w).max(1)
            s = (np.maximum(act, 1e-5) ** self.alpha / np.maximum(wmax, 1e-5) ** (1 - self.alpha)).astype(np.float32)
            s = np.clip(s, 1e-5, None)
            inits[wname].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), wname))
            # fold 1/s into the value projection (context = softmax(QK) V is linear in V):
            # packed QKV weight and bias are Attention's inputs 1, 2; for MultiHeadAttention the
            # weight is the packed MatMul in front of its Split (see _pack_qkv), the bias input 3
            wb = None
            if kind == "attn_out" and src_node.op_type == "Attention" and len(src_node.input) > 2:
                wb = (src_node.input[1], src_node.input[2])
            elif kind == "attn_out" and src_node.op_type == "MultiHeadAttention" and len(src_node.input) > 3:
                sp = producer.get(src_node.input[2])
                mm = producer.get(sp.input[0]) if sp is not None and sp.op_type == "Split" else None
                if mm is not None and mm.op_type == "MatMul" and len(mm.input) > 1:
                    wb = (mm.input[1], src_node.input[3])
            if wb is not None and wb[0] in inits and wb[1] in inits:
                qw = numpy_helper.to_array(inits[wb[0]]).astype(np.float32).copy()
                qb = numpy_helper.to_array(inits[wb[1]]).astype(np.float32).copy()
                h = qw.shape[1] // 3
                if h == len(s) and qb.shape[0] == 3 * h:
                    qw[:, 2 * h :] /= s[None, :]
                    qb[2 * h :] /= s
                    inits[wb[0]].CopyFrom(numpy_helper.from_array(qw, wb[0]))
                    inits[wb[1]].CopyFrom(numpy_helper.from_array(qb, wb[1]))
                    continue
            inv_name = f"ctxzip_smooth_inv_{k}"
            g.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv_name))
            out_name = f"ctxzip_smooth_x_{k}"
            new_nodes.append((n, helper.make_node("Mul", [n.input[0], inv_name], [out_name], name=f"ctxzip_smooth_{k}")))
            n.input[0] = out_name
        # insert each Mul right before its consumer (keeps the graph topologically sorted)
        before = {k: mul for k, (n, mul) in enumerate(new_nodes)}
        consumer = {n.name: k for k, (n, _) in enumerate(new_nodes)}
        order = []
        for n in g.graph.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            order.append(c)
        g.graph.ClearField("node")
        for n in order:
            if n.name in consumer:
                g.graph.node.append(before[consumer[n.name]])
            g.graph.node.append(n)
        onnx.save(g, str(dst))
        return keep_fp32

    # ------------------------------------------------------------------ inference
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Keep probability ``(batch, seq)`` for ``input_ids`` ``(batch, seq)``."""
        x = np.ascontiguousarray(input_ids, dtype=np.int64)
        m = np.ones_like(x) if attention_mask is None else np.ascontiguousarray(attention_mask, dtype=np.int64)
        if not self.unpadded or m.all():
            return self.session.run(None, {"input_ids": x, "attention_mask": m})[0]
        # the graph has no attention mask (``unpadded``): run each row on its unmasked tokens
        out = np.zeros(x.shape, dtype=np.float32)
        for r in range(x.shape[0]):
            idx = np.flatnonzero(m[r])
            if idx.size:
                row = x[r, idx][None]
                out[r, idx] = self.session.run(None, {"input_ids": row, "attention_mask": np.ones_like(row)})[0][0]
        return out

    def map(self, seqs: list[list[int]], progress: Any = None) -> list[np.ndarray]:
        """Keep probabilities of several unpadded sequences, ``(len,)`` each.

        With ``threads > 1`` and at least as many sequences as threads, the sequences are spread
        over ``threads`` workers that each run one sequence on one core (ONNX Runtime releases
        the GIL): on a small encoder this scales better than splitting every operator across
        cores. Longest sequences go first, so the workers finish together."""
        if self.threads <= 1 or len(seqs) < self.threads:
            out = []
            for s in seqs:
                out.append(self(np.asarray([s], dtype=np.int64))[0])
                if progress is not None:
                    progress.update(1)
            return out
        if self._single is None:
            self._single = self._session(1)
        sess = self._single

        def one(s: list[int]) -> np.ndarray:
            x = np.asarray([s], dtype=np.int64)
            r = sess.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0]
            if progress is not None:
                progress.update(1)
            return r

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.threads) as ex:
            return list(ex.map(one, seqs))


def _split_layer_norms(g: Any) -> None:
    """Replace every ``SkipLayerNormalization`` by elementwise ONNX ops (add, mean, centre,
    variance, reciprocal square root, scale, shift), in place.

    Same arithmetic in fp32; on a 384-wide MiniLM ONNX Runtime's CPU kernel for the fused op
    takes ~1 ms per (480, 384) call, the decomposed graph ~0.3 ms (1 thread), which is ~10% of
    the whole forward pass. Sessions must then be created with the layer-norm fusions disabled
    (``_LN_FUSIONS``)."""
    from onnx import helper, numpy_helper

    opset = next((o.version for o in g.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes = []
    consts = []
    for k, n in enumerate(g.graph.node):
        if n.op_type != "SkipLayerNormalization" or n.domain != "com.microsoft":
            nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-12)
        p = f"ctxzip_ln{k}"
        ins = list(n.input) + [""] * (5 - len(n.input))
        x, skip, gamma, beta, bias = ins[:5]
        outs = list(n.output) + [""] * (4 - len(n.output))
        y, mean_o, inv_o, sum_o = outs[:4]
        total = sum_o or f"{p}_sum"
        if bias:
            nodes.append(helper.make_node("Add", [x, skip], [f"{p}_xs"], name=f"{p}_add0"))
            nodes.append(helper.make_node("Add", [f"{p}_xs", bias], [total], name=f"{p}_add1"))
        else:
            nodes.append(helper.make_node("Add", [x, skip], [total], name=f"{p}_add0"))

        def mean(inp: str, out: str, name: str) -> Any:
            if opset >= 18:
                return helper.make_node("ReduceMean", [inp, "ctxzip_ln_axes"], [out], name=name, keepdims=1)
            return helper.make_node("ReduceMean", [inp], [out], name=name, axes=[-1], keepdims=1)

        consts.append(numpy_helper.from_array(np.asarray(eps, dtype=np.float32), f"{p}_eps"))
        nodes += [
            mean(total, mean_o or f"{p}_mean", f"{p}_mean"),
            helper.make_node("Sub", [total, mean_o or f"{p}_mean"], [f"{p}_d"], name=f"{p}_sub"),
            helper.make_node("Mul", [f"{p}_d", f"{p}_d"], [f"{p}_d2"], name=f"{p}_sq"),
            mean(f"{p}_d2", f"{p}_var", f"{p}_var"),
            helper.make_node("Add", [f"{p}_var", f"{p}_eps"], [f"{p}_ve"], name=f"{p}_addeps"),
            helper.make_node("Sqrt", [f"{p}_ve"], [f"{p}_sd"], name=f"{p}_sqrt"),
            helper.make_node("Reciprocal", [f"{p}_sd"], [inv_o or f"{p}_inv"], name=f"{p}_rcp"),
            helper.make_node("Mul", [f"{p}_d", inv_o or f"{p}_inv"], [f"{p}_n"], name=f"{p}_norm"),
            helper.make_node("Mul", [f"{p}_n", gamma], [f"{p}_g"], name=f"{p}_gamma"),
        ]
        if beta:
            nodes.append(helper.make_node("Add", [f"{p}_g", beta], [y], name=f"{p}_beta"))
        else:
            nodes.append(helper.make_node("Identity", [f"{p}_g"], [y], name=f"{p}_out"))
    if opset >= 18 and consts:
        consts.append(numpy_helper.from_array(np.asarray([-1], dtype=np.int64), "ctxzip_ln_axes"))
    g.graph.ClearField("node")
    g.graph.node.extend(nodes)
    g.graph.initializer.extend(consts)


def _pack_qkv(g: Any) -> None:
    """Give each ``MultiHeadAttention`` one packed ``X @ [Wq | Wk | Wv]`` product and a ``Split``
    instead of three products of the same input, in place: the input is then smoothed and
    quantized once instead of three times (ORT's CPU kernel takes no packed-QKV input)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in g.graph.initializer}
    producer = {o: n for n in g.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    replace: dict[str, list[Any]] = {}  # name of the first removed MatMul -> new nodes
    drop: set[str] = set()
    for k, n in enumerate(g.graph.node):
        if n.op_type != "MultiHeadAttention" or len(n.input) < 3:
            continue
        mms = [producer.get(x) for x in n.input[:3]]
        if any(m is None or m.op_type != "MatMul" or m.input[1] not in inits or consumers.get(m.output[0]) != 1
               for m in mms) or len({m.input[0] for m in mms}) != 1:
            continue
        ws = [numpy_helper.to_array(inits[m.input[1]]) for m in mms]
        if any(w.ndim != 2 for w in ws):
            continue
        wname = f"ctxzip_qkv_w_{k}"
        g.graph.initializer.append(numpy_helper.from_array(np.concatenate(ws, axis=1).astype(np.float32), wname))
        sizes = f"ctxzip_qkv_split_{k}"
        g.graph.initializer.append(numpy_helper.from_array(np.asarray([w.shape[1] for w in ws], dtype=np.int64), sizes))
        out = f"ctxzip_qkv_out_{k}"
        new = [helper.make_node("MatMul", [mms[0].input[0], wname], [out], name=f"ctxzip_qkv_{k}"),
               helper.make_node("Split", [out, sizes], [m.output[0] for m in mms], name=f"ctxzip_qkv_split_{k}", axis=-1)]
        order = [x.name for x in g.graph.node]
        first = min(mms, key=lambda m: order.index(m.name))
        replace[first.name] = new
        drop |= {m.name for m in mms}
    if not replace:
        return
    nodes = []
    for n in g.graph.node:
        if n.name in replace:
            nodes += replace[n.name]
        if n.name not in drop:
            nodes.append(n)
    g.graph.ClearField("node")
    g.graph.node.extend(nodes)
