"""Shared test matrix: every visual-token method x every supported VLM family (tiny random
models built offline). Checks identity at keep-all, the budget, shorter prefill, batch > 1 with
mixed images and left padding (batched == row by row, forward and generate), and cached
generation == uncached generation for the vision-stage methods."""

from __future__ import annotations

import pytest
import torch

from ctxzip.budget import Budget
from ctxzip.testing import tiny_llava
from ctxzip.vision import METHODS, prune, unprune
from ctxzip.vision.testing import make_vlm_inputs, tiny_llava_next, tiny_qwen2_vl

METHOD_NAMES = ["fastv", "visionzip", "tome", "prumerge", "globalcom2", "correlation"]
FAMILIES = {
    "llava": lambda: tiny_llava(),
    "llava_next": lambda: tiny_llava_next(),
    "qwen2_vl": lambda: tiny_qwen2_vl(),
    "qwen2_5_vl": lambda: tiny_qwen2_vl(version="2.5"),
}
PER_ROW = [1, 2, 0]
_CACHE: dict[str, tuple] = {}


def _family(name: str):
    if name not in _CACHE:
        model = FAMILIES[name]()
        inputs = make_vlm_inputs(model, PER_ROW)
        with torch.no_grad():
            ref = model(**inputs).logits
        _CACHE[name] = (model, inputs, ref)
    return _CACHE[name]


def _params(method: str) -> dict:
    return {"k": 1} if method == "fastv" else {}  # tiny_llava has 2 LLM layers


def _split_rows(inputs: dict, family: str) -> list[dict]:
    out, g = [], 0
    for b, n in enumerate(PER_ROW):
        m = inputs["attention_mask"][b].bool()
        d = {"input_ids": inputs["input_ids"][b:b + 1, m], "attention_mask": inputs["attention_mask"][b:b + 1, m]}
        if "mm_token_type_ids" in inputs:
            d["mm_token_type_ids"] = inputs["mm_token_type_ids"][b:b + 1, m]
        if n and family.startswith("qwen"):
            thw = inputs["image_grid_thw"]
            sizes = thw.prod(-1)
            st, en = int(sizes[:g].sum()), int(sizes[:g + n].sum())
            d["pixel_values"], d["image_grid_thw"] = inputs["pixel_values"][st:en], thw[g:g + n]
        elif n:
            d["pixel_values"] = inputs["pixel_values"][g:g + n]
            if "image_sizes" in inputs:
                d["image_sizes"] = inputs["image_sizes"][g:g + n]
        g += n
        out.append(d)
    return out


def test_registry_has_the_six_methods():
    assert sorted(METHODS) == sorted(METHOD_NAMES)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_keep_all_is_identity(family, method):
    model, inputs, ref = _family(family)
    prune(model, method, Budget(rate=1.0), **_params(method))
    try:
        with torch.no_grad():
            out = model(**inputs).logits
        assert torch.equal(out, ref)
        assert all(a == b for a, b in model.ctxzip_vision.last_stats)
    finally:
        unprune(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # unprune restores the model


MATRIX = [(f, m) for f in FAMILIES for m in METHOD_NAMES if f != "qwen2_5_vl" or m in ("fastv", "visionzip")]


@pytest.mark.parametrize(("family", "method"), MATRIX)
def test_budget_batch_and_generate(family, method):
    model, inputs, ref = _family(family)
    keep = 5
    prune(model, method, Budget(tokens=keep), **_params(method))
    try:
        with torch.no_grad():
            out = model(**inputs)
            stats = list(model.ctxzip_vision.last_stats)
            assert len(stats) == sum(PER_ROW)
            for before, after in stats:
                assert after == min(keep, before)
            if method != "fastv":  # the LLM sees a shorter sequence
                assert out.logits.shape[1] < ref.shape[1]
            assert torch.isfinite(out.logits).all()
            model.ctxzip_vision.last_stats = []
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
            assert model.ctxzip_vision.last_stats == stats  # generate's prefill pruned too
            rows = _split_rows(inputs, family)
            for b, row in enumerate(rows):
                single = model(**row).logits[0, -1]
                torch.testing.assert_close(single, out.logits[b, -1], rtol=1e-4, atol=1e-4)
            g1 = model.generate(**rows[1], max_new_tokens=3, do_sample=False)[0, -3:]  # the 2-image row
            assert torch.equal(g1, gen[1])
            if method != "fastv" and family == "llava_next":  # selection ignores the text: cache == no cache
                nocache = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)[:, -3:]
                assert torch.equal(nocache, gen)
    finally:
        unprune(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_rate_budget_and_original_positions(family):
    model, inputs, _ = _family(family)
    prune(model, "visionzip", Budget(rate=0.5), positions="original")
    try:
        with torch.no_grad():
            model(**inputs)
        for before, after in model.ctxzip_vision.last_stats:
            assert after == before // 2
    finally:
        unprune(model)


def test_adaptive_prumerge_and_correlation_without_budget():
    model, inputs, _ = _family("llava_next")
    for method in ("prumerge", "correlation"):
        prune(model, method)
        try:
            with torch.no_grad():
                out = model(**inputs)
            assert torch.isfinite(out.logits).all()
            assert all(1 <= a <= b for b, a in model.ctxzip_vision.last_stats)
        finally:
            unprune(model)


def test_bad_input_errors():
    model, inputs, _ = _family("llava")
    with pytest.raises(ValueError, match="unknown visual-token method"):
        prune(model, "nope", 4)
    with pytest.raises(ValueError, match="needs a budget"):
        prune(model, "visionzip")
    with pytest.raises(ValueError):
        prune(model, "visionzip", "lots")
    with pytest.raises(ValueError):
        prune(model, "visionzip", -3)
    with pytest.raises(ValueError, match="contextual_ratio"):
        prune(model, "visionzip", 4, contextual_ratio=1.5)
    with pytest.raises(ValueError, match="bad hyperparameters"):
        prune(model, "tome", 4, nonsense=1)
    with pytest.raises(ValueError, match="smaller than the number"):
        prune(model, "fastv", 4, k=2)
    with pytest.raises(ValueError, match=">= 1"):
        prune(model, "fastv", 4, k=0)
    with pytest.raises(ValueError, match="tau"):
        prune(model, "globalcom2", 4, tau=0)
    with pytest.raises(ValueError, match="cosine"):
        prune(model, "correlation", 4, threshold=2.0)
    with pytest.raises(ValueError, match="positions"):
        prune(model, "visionzip", 4, positions="shuffled")
    from ctxzip.testing import tiny_causal_lm

    with pytest.raises(TypeError, match="supports"):
        prune(tiny_causal_lm(), "visionzip", 4)
    prune(model, "visionzip", 4)
    try:
        with pytest.raises(ValueError, match="labels"):
            model(**inputs, labels=inputs["input_ids"])
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    finally:
        unprune(model)


def test_prune_twice_replaces_hooks():
    model, inputs, ref = _family("llava")
    prune(model, "tome", 4)
    prune(model, "visionzip", Budget(rate=1.0))
    try:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref)
    finally:
        unprune(model)


def test_precomputed_image_features_are_refused():
    model, inputs, _ = _family("llava")
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    prune(model, "visionzip", 4)
    try:
        with pytest.raises(ValueError, match="pre-computed"):
            ids = {k: v for k, v in inputs.items() if k != "pixel_values"}
            model(**ids, mm_encoder_outputs={"image": feats})
    finally:
        unprune(model)
    assert "get_image_features" not in model.model.__dict__  # unprune restored the method


def test_cli_methods_and_bad_budget(capsys):
    from ctxzip.cli import main

    assert main(["vision", "methods"]) == 0
    out = capsys.readouterr().out
    for name in METHOD_NAMES:
        assert name in out
    assert main(["vision", "bench", "--keep", "lots", "--size", "tiny"]) == 2
    assert "cannot parse budget" in capsys.readouterr().err
    assert main(["vision", "bench", "--reps", "0", "--size", "tiny"]) == 2
    assert main(["vision", "bench", "--size", "tiny", "--param", "oops"]) == 2


def test_eval_scoring():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "vision_eval", Path(__file__).resolve().parents[1] / "benchmarks" / "vision_eval.py"
    )
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    s = ev.score("pope", ["Yes, there is.", "No.", "yes", "I think not"], ["yes", "no", "no", "yes"])
    assert s["accuracy"] == 0.5 and s["yes_ratio"] == 0.5
    assert ev.pope_label("Not really") == "no"
    v = ev.score("vqa", ["The red car.", "blue"], ["red car", "green"])
    assert v["exact_match"] == 0.5 and v["contains"] == 0.5
