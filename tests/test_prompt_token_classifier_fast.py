"""Fast inference paths of TokenClassifierCompressor (``fast="onnx"``/``"onnx-int8"``/bf16/int8)
with a tiny random classifier on the real MiniLM tokenizer: agreement with exact mode, the
chunk-parallel runner, caching, bad input and the error when ONNX Runtime is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ctxzip.budget import Budget

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TEXT = (
    "The assert statement is a convenient way to insert debugging assertions into a program. "
    "If the expression is false, AssertionError is raised with 3 optional arguments.\n\n"
    "Identifiers (also referred to as names) are described by the following lexical "
    "definitions. Unbelievably, tokenization splits words like 'internationalization' into pieces.\n"
) * 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ctxzip.testing import save_tiny_token_classifier

    return save_tiny_token_classifier(tmp_path_factory.mktemp("clf") / "tiny-token-classifier")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTXZIP_CACHE", str(tmp_path_factory.getbasetemp() / "ctxzip-cache"))


def make(tiny_dir, **kw):
    from transformers import AutoTokenizer

    from ctxzip.prompt import TokenClassifierCompressor

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    kw.setdefault("tokenizer", tok)
    kw.setdefault("mode", "chunk")
    kw.setdefault("max_seq_len", 64)  # several chunks from TEXT
    return TokenClassifierCompressor(model=str(tiny_dir), return_word_labels=True, **kw)


def labels(c, rate=0.4):
    return np.asarray(c.compress(TEXT, budget=Budget(rate=rate)).details["word_labels"])


def test_onnx_fp32_matches_exact(tiny_dir):
    pytest.importorskip("onnxruntime")
    exact, fast = make(tiny_dir), make(tiny_dir, fast="onnx")
    ids = np.asarray(exact.classifier()[1](TEXT, add_special_tokens=False)["input_ids"])
    ch = exact.chunk(ids)
    assert len(ch) > 2
    p0, p1 = exact._token_probs(ids, ch), fast._token_probs(ids, ch)
    assert np.abs(p0 - p1).max() < 1e-4
    assert (labels(exact) == labels(fast)).all()


@pytest.mark.parametrize("drop_consecutive", [False, True])
def test_onnx_exact_decisions_equal_torch(tiny_dir, drop_consecutive):
    pytest.importorskip("onnxruntime")
    kw = dict(force_tokens=("\n", "."), drop_consecutive=drop_consecutive)
    ref = make(tiny_dir, **kw)
    ex = make(tiny_dir, fast="onnx-exact", **kw)
    for rate in (0.25, 0.4, 0.6):
        assert np.array_equal(labels(ref, rate), labels(ex, rate))


def test_onnx_exact_rechecks_near_threshold_chunks(tiny_dir, monkeypatch):
    """Every chunk is near a threshold when the margin is huge: all are re-classified by torch,
    so even an ONNX output replaced by noise gives torch's decisions."""
    pytest.importorskip("onnxruntime")
    import ctxzip.prompt.token_classifier as tc

    ref, ex = make(tiny_dir), make(tiny_dir, fast="onnx-exact")
    ex.classifier()
    orig = ex._ort.map
    rng = np.random.default_rng(0)
    monkeypatch.setattr(ex._ort, "map", lambda seqs, **k: [rng.random(p.shape) for p in orig(seqs, **k)])
    calls = []
    real = ex._token_probs

    def spy(ids, chunks, *, use_torch=False):
        if use_torch:
            calls.append(len(chunks))
        return real(ids, chunks, use_torch=use_torch)

    monkeypatch.setattr(ex, "_token_probs", spy)
    assert not np.array_equal(labels(ref), labels(ex))  # the perturbation flips decisions
    calls.clear()
    monkeypatch.setattr(tc, "EXACT_MARGIN", 1.0)
    assert np.array_equal(labels(ref), labels(ex))
    assert calls and calls[0] > 2


def test_onnx_exact_needs_chunk_mode(tiny_dir):
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="mode='chunk'"):
        make(tiny_dir, fast="onnx-exact", mode="global")


def test_onnx_int8_close_to_exact(tiny_dir):
    pytest.importorskip("onnxruntime")
    exact, fast = make(tiny_dir), make(tiny_dir, fast="onnx-int8")
    a, b = labels(exact), labels(fast)
    assert a.shape == b.shape
    assert (a == b).mean() >= 0.9
    r = fast.compress(TEXT, budget=Budget(rate=0.4))
    assert 0 < r.compressed_tokens < r.original_tokens
    # the int8 graph really is quantized, and is cached on disk for the next compressor
    path = fast._ort.path
    assert path.exists() and path.stat().st_size > 0
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention"}
    again = make(tiny_dir, fast="onnx-int8")
    again.classifier()
    assert again._ort.path == path


def test_chunk_parallel_runner_matches_sequential(tiny_dir):
    pytest.importorskip("onnxruntime")
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from ctxzip.prompt.onnx_backend import OnnxClassifier

    model = AutoModelForTokenClassification.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    one = OnnxClassifier(model, tok, quantize=False, threads=1)
    two = OnnxClassifier(model, tok, quantize=False, threads=2)
    rng = np.random.default_rng(0)
    seqs = [[101, *rng.integers(1000, 20000, n).tolist(), 102] for n in (40, 7, 25, 60, 3)]
    for a, b, s in zip(one.map(seqs), two.map(seqs), seqs):
        assert a.shape == (len(s),)
        assert np.allclose(a, b, atol=1e-5)
        assert ((a >= 0) & (a <= 1)).all()


def test_torch_fast_modes_run(tiny_dir):
    exact = labels(make(tiny_dir))
    for kind in ("int8", "bf16"):
        lab = labels(make(tiny_dir, fast=kind))
        assert lab.shape == exact.shape
        assert (lab == exact).mean() >= 0.8


def test_bad_fast_values(tiny_dir):
    for bad in ("fp8", "ONNX", 2, None):
        with pytest.raises(ValueError, match="fast"):
            make(tiny_dir, fast=bad)


def test_missing_onnxruntime_is_a_clear_error(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    from ctxzip.prompt.onnx_backend import onnxruntime_available

    assert not onnxruntime_available()
    for kind in ("onnx", "onnx-int8"):
        with pytest.raises(ImportError, match=r"ctxzip\[fast\]"):
            make(tiny_dir, fast=kind)
    # fast=True falls back to torch inference without ONNX Runtime
    c = make(tiny_dir, fast=True)
    assert len(labels(c)) > 0 and c._ort is None


def test_fast_compressor_pickles_without_session(tiny_dir):
    pytest.importorskip("onnxruntime")
    import pickle

    c = make(tiny_dir, fast="onnx-int8", tokenizer=None)
    c.classifier()
    d = c.__getstate__()
    assert d["_ort"] is None and d["_clf"] is None
    c2 = pickle.loads(pickle.dumps(c))
    assert c2.fast == "onnx-int8" and c2._ort is None


def _tiny_model(tiny_dir):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    return AutoModelForTokenClassification.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def _torch_probs(model, seq):
    with torch.inference_mode():
        return torch.softmax(model(input_ids=torch.tensor([seq])).logits, -1)[0, :, 1].numpy()


@pytest.mark.parametrize("kw", [
    dict(attention="mha"), dict(attention="fused"), dict(attention="mha", split_layer_norm=False, unpadded=False),
])
def test_onnx_graph_shapes_keep_fp32_outputs(tiny_dir, kw, tmp_path):
    """Every graph layout (MHA + packed QKV, fused Attention, no mask, split layer norms) computes
    the same fp32 function as the torch model."""
    pytest.importorskip("onnxruntime")
    import onnx

    from ctxzip.prompt.onnx_backend import OnnxClassifier

    model, tok = _tiny_model(tiny_dir)
    oc = OnnxClassifier(model, tok, quantize=False, threads=1, cache=tmp_path, **kw)
    ops = [n.op_type for n in onnx.load(str(oc.path)).graph.node]
    if kw.get("split_layer_norm", True):
        assert "SkipLayerNormalization" not in ops and "LayerNormalization" not in ops
    if kw["attention"] == "mha":
        assert "MultiHeadAttention" in ops and "Attention" not in ops
        if kw.get("unpadded", True):
            mha = [n for n in onnx.load(str(oc.path)).graph.node if n.op_type == "MultiHeadAttention"]
            assert all(len(n.input) <= 4 or n.input[4] == "" for n in mha)  # no key padding mask
            assert ops.count("Split") == len(mha)  # one packed QKV product per layer
    else:
        assert "Attention" in ops
    rng = np.random.default_rng(1)
    for n in (5, 37):
        seq = [101, *rng.integers(1000, 20000, n).tolist(), 102]
        p = oc(np.asarray([seq]))[0]
        assert np.abs(p - _torch_probs(model, seq)).max() < 1e-4


def test_onnx_int8_keeps_embeddings_and_head_fp32(tiny_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from ctxzip.prompt.onnx_backend import OnnxClassifier

    model, tok = _tiny_model(tiny_dir)
    g = onnx.load(str(OnnxClassifier(model, tok, threads=1, cache=tmp_path, fp32_ffn_out=()).path)).graph
    ops = [n.op_type for n in g.node]
    assert "EmbedLayerNormalization" in ops and "QEmbedLayerNormalization" not in ops
    assert ops.count("MatMul") == 1  # the classifier head; every other product is int8
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    g2 = onnx.load(str(OnnxClassifier(model, tok, threads=1, cache=tmp_path, fp32=(), fp32_ffn_out=()).path)).graph
    ops2 = [n.op_type for n in g2.node]
    assert "QEmbedLayerNormalization" in ops2 and "MatMul" not in ops2


def test_onnx_int8_keeps_early_ffn_outputs_fp32(tiny_dir, tmp_path):
    """The default leaves the FFN output product of encoder layers 0 and 1 in fp32 (and only
    those: the fp32 products' weights are the FFN's (intermediate, hidden) matrices)."""
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from ctxzip.prompt.onnx_backend import FP32_FFN_OUT, OnnxClassifier

    model, tok = _tiny_model(tiny_dir)
    cfg = model.config
    assert cfg.num_hidden_layers >= 2 and FP32_FFN_OUT == (0, 1)
    for layers in (FP32_FFN_OUT, (1,)):
        g = onnx.load(str(OnnxClassifier(model, tok, threads=1, cache=tmp_path, fp32_ffn_out=layers).path)).graph
        inits = {t.name: t for t in g.initializer}
        shapes = [tuple(numpy_helper.to_array(inits[n.input[1]]).shape) for n in g.node if n.op_type == "MatMul"]
        ffn = (cfg.intermediate_size, cfg.hidden_size)
        assert shapes.count(ffn) == len(layers)
        assert len(shapes) == len(layers) + 1  # plus the classifier head
    # layers past the encoder's depth change nothing
    g = onnx.load(str(OnnxClassifier(model, tok, threads=1, cache=tmp_path, fp32_ffn_out=(99,)).path)).graph
    assert [n.op_type for n in g.node].count("MatMul") == 1


def test_unpadded_graph_runs_padded_batches_row_by_row(tiny_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from ctxzip.prompt.onnx_backend import OnnxClassifier

    model, tok = _tiny_model(tiny_dir)
    oc = OnnxClassifier(model, tok, quantize=False, threads=1, cache=tmp_path)
    rng = np.random.default_rng(2)
    seqs = [[101, *rng.integers(1000, 20000, n).tolist(), 102] for n in (20, 6)]
    x = np.zeros((2, 22), dtype=np.int64)
    m = np.zeros_like(x)
    for r, s in enumerate(seqs):
        x[r, : len(s)] = s
        m[r, : len(s)] = 1
    out = oc(x, m)
    for r, s in enumerate(seqs):
        assert np.abs(out[r, : len(s)] - _torch_probs(model, s)).max() < 1e-4
        assert (out[r, len(s):] == 0).all()


def test_onnx_backend_bad_options(tiny_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from ctxzip.prompt.onnx_backend import OnnxClassifier

    model, tok = _tiny_model(tiny_dir)
    with pytest.raises(ValueError, match="attention"):
        OnnxClassifier(model, tok, attention="flash", cache=tmp_path)
    with pytest.raises(ValueError, match="fp32"):
        OnnxClassifier(model, tok, fp32=("ffn",), cache=tmp_path)
    for bad in ((-1,), ("0",), (True,), 0, "01", None):
        with pytest.raises(ValueError, match="fp32_ffn_out"):
            OnnxClassifier(model, tok, fp32_ffn_out=bad, cache=tmp_path)
    # any iterable of indices is fine (a list from a JSON config, say)
    assert OnnxClassifier(model, tok, fp32_ffn_out=[1, 0, 1], cache=tmp_path).fp32_ffn_out == (0, 1)


def test_onnx_options_reach_the_backend(tiny_dir, tmp_path):
    """``TokenClassifierCompressor(onnx_options=...)`` builds the ONNX graph with those options
    (here: every FFN output quantized, so only the head stays an fp32 MatMul)."""
    pytest.importorskip("onnxruntime")
    c = make(tiny_dir, fast="onnx-int8", onnx_options={"fp32_ffn_out": (), "cache": tmp_path})
    c.classifier()
    assert c._ort.fp32_ffn_out == ()
    import onnx

    ops = [n.op_type for n in onnx.load(str(c._ort.path)).graph.node]
    assert ops.count("MatMul") == 1
    assert labels(c).shape == labels(make(tiny_dir)).shape


def test_bad_onnx_options(tiny_dir):
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="unknown onnx_options.*quantize"):
        make(tiny_dir, fast="onnx-int8", onnx_options={"quantize": False})
    with pytest.raises(ValueError, match="unknown onnx_options.*alpah"):
        make(tiny_dir, fast="onnx-int8", onnx_options={"alpah": 0.5})
    with pytest.raises(TypeError, match="onnx_options must be a dict"):
        make(tiny_dir, fast="onnx-int8", onnx_options=[("alpha", 0.5)])


def test_onnx_exact_rechecks_the_context_level_filter(tiny_dir, monkeypatch):
    """compress_contexts keeps contexts by the order of their mean keep probabilities: with the
    ONNX output replaced by noise and a huge margin, every context is re-classified by torch and
    the kept contexts and text equal torch's."""
    pytest.importorskip("onnxruntime")
    import ctxzip.prompt.token_classifier as tc

    parts = list(dict.fromkeys(p for p in TEXT.split("\n") if p.strip())) + [
        "Tuples are immutable sequences, typically used to store collections of heterogeneous data.",
        "The with statement wraps the execution of a block with methods defined by a context manager.",
        "Return the number of items in a container; len(s) works for strings, lists and dicts.",
    ]
    ref, ex = make(tiny_dir), make(tiny_dir, fast="onnx-exact")
    ex.classifier()
    orig = ex._ort.map
    rng = np.random.default_rng(1)
    monkeypatch.setattr(ex._ort, "map", lambda seqs, **k: [rng.random(p.shape) for p in orig(seqs, **k)])
    monkeypatch.setattr(tc, "EXACT_MARGIN", 1.0)
    for rate in (0.3, 0.6):
        a = ref.compress_contexts(parts, budget=Budget(rate=rate))
        b = ex.compress_contexts(parts, budget=Budget(rate=rate))
        assert a.details["kept_contexts"] == b.details["kept_contexts"]
        assert 0 < len(a.details["kept_contexts"]) < len(parts)
        assert a.text == b.text


def test_onnx_int8_weight_types(tiny_dir, tmp_path):
    """``weights=`` picks the stored int8 weight type: signed for u8s8 kernels, unsigned (with
    zero points) for the u8u8 kernels that cannot saturate on x86 CPUs without VNNI."""
    pytest.importorskip("onnxruntime")
    import onnx

    from ctxzip.prompt.onnx_backend import OnnxClassifier

    model, tok = _tiny_model(tiny_dir)
    want = {"s8": onnx.TensorProto.INT8, "s7": onnx.TensorProto.INT8, "u8": onnx.TensorProto.UINT8}
    paths = set()
    for w, dtype in want.items():
        oc = OnnxClassifier(model, tok, threads=1, cache=tmp_path, weights=w)
        assert oc.weights == w
        paths.add(oc.path)
        g = onnx.load(str(oc.path)).graph
        qtypes = {t.data_type for t in g.initializer if t.name.endswith("_quantized")}
        assert qtypes == {dtype}
        if w != "u8":  # symmetric: 7 bits use [-64, 64], 8 bits [-127, 127]
            from onnx import numpy_helper

            vals = np.concatenate([numpy_helper.to_array(t).ravel() for t in g.initializer if t.name.endswith("_quantized")])
            assert np.abs(vals.astype(int)).max() == (64 if w == "s7" else 127)
    assert len(paths) == 3  # cached separately
    assert OnnxClassifier(model, tok, quantize=False, threads=1, cache=tmp_path, weights="u8").weights == "fp32"
    for bad in ("int8", 8, True):
        with pytest.raises(ValueError, match="weights"):
            OnnxClassifier(model, tok, weights=bad, cache=tmp_path)


def test_default_int8_weights_follow_the_cpu(monkeypatch):
    from ctxzip.prompt import onnx_backend as ob

    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(ob, "cpu_flags", lambda: {"avx2", "fma"})
    assert not ob.cpu_has_vnni() and ob.default_weights() == "u8"
    monkeypatch.setattr(ob, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    assert ob.cpu_has_vnni() and ob.default_weights() == "s8"
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    monkeypatch.setattr(ob, "cpu_flags", lambda: {"asimd"})
    assert ob.default_weights() == "s8"
