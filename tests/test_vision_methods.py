"""Each visual-token method against a direct (loop) transcription of its reference rule, plus the
scores the wrappers capture under SDPA against eager attention probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctxzip.budget import Budget
from ctxzip.testing import tiny_llava
from ctxzip.vision import (
    CorrelationGuided,
    GlobalCom2,
    ImageTokens,
    PruMerge,
    ToMe,
    VisionZip,
    prune,
    unprune,
)
from ctxzip.vision.base import ViewTokens
from ctxzip.vision.prumerge import iqr_outlier_count
from ctxzip.vision.testing import make_vlm_inputs
from ctxzip.vision.tome import bipartite_merge_step


def _view(n=36, d=8, dk=6, seed=0, cls=True, valid=None):
    g = torch.Generator().manual_seed(seed)
    side = int(n ** 0.5)
    return ViewTokens(
        feats=torch.randn(n, d, generator=g),
        scores=torch.rand(n, generator=g),
        keys=torch.randn(n, dk, generator=g),
        grid=(side, side),
        cls_feat=torch.randn(d, generator=g) if cls else None,
        valid=valid,
    )


# ------------------------------------------------------------------ VisionZip
def test_visionzip_matches_reference_rule():
    v = _view()
    k = 12
    r = VisionZip(contextual_ratio=0.25).compress_view(v, k)
    n_ctx, n_dom = 3, 9
    dom = torch.sort(torch.argsort(v.scores, descending=True)[: n_dom - 1]).values
    assert r.feats.shape[0] == k
    torch.testing.assert_close(r.feats[0], v.cls_feat)
    assert r.src[0] == -1
    assert torch.equal(r.src[1:n_dom], dom)
    rest = [i for i in range(v.n) if i not in set(dom.tolist())]
    step = len(rest) // n_ctx
    tgt = [rest[j] for j in range(0, len(rest), step)][:n_ctx]
    others = [i for i in rest if i not in tgt]
    kn = F.normalize(v.keys, dim=-1)
    expect = []
    for t in tgt:
        members = [o for o in others if int(torch.argmax(kn[o] @ kn[tgt].T)) == tgt.index(t)]
        mean = v.feats[members].mean(0) if members else torch.zeros_like(v.feats[0])
        expect.append(v.feats[t] + mean)
    torch.testing.assert_close(r.feats[n_dom:], torch.stack(expect))
    assert r.src[n_dom:].tolist() == tgt


def test_visionzip_without_cls_and_with_invalid_tokens():
    valid = torch.ones(36, dtype=torch.bool)
    valid[:10] = False
    v = _view(cls=False, valid=valid)
    r = VisionZip().compress_view(v, 8)
    assert r.feats.shape[0] == 8 and bool((r.src >= 10).all())


# ------------------------------------------------------------------ ToMe
def _tome_step_loop(x, metric, size, r):
    m = F.normalize(metric, dim=-1)
    a, b = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    best = [(float((m[i] @ m[b].T).max()), int(torch.argmax(m[i] @ m[b].T)), i) for i in a]
    order = sorted(range(len(a)), key=lambda j: -best[j][0])
    merged = {best[j][2]: b[best[j][1]] for j in order[:r]}
    acc = {j: (x[j] * size[j], size[j]) for j in b}
    for src, dst in merged.items():
        s, w = acc[dst]
        acc[dst] = (s + x[src] * size[src], w + size[src])
    unm = [a[j] for j in order[r:]]
    xs = [x[i] for i in unm] + [acc[j][0] / acc[j][1] for j in b]
    return torch.stack(xs), torch.tensor([float(size[i]) for i in unm] + [float(acc[j][1]) for j in b])


def test_tome_step_matches_loop_and_conserves_mass():
    g = torch.Generator().manual_seed(1)
    x, metric = torch.randn(11, 5, generator=g), torch.randn(11, 4, generator=g)
    size = torch.ones(11)
    xn, _, sn, anchor = bipartite_merge_step(x, metric, size, torch.arange(11), 4)
    xl, sl = _tome_step_loop(x, metric, size, 4)
    torch.testing.assert_close(xn, xl)
    torch.testing.assert_close(sn, sl)
    torch.testing.assert_close((xn * sn[:, None]).sum(0), x.sum(0))  # size-weighted mass kept
    assert xn.shape[0] == 7 and anchor.shape[0] == 7


def test_tome_reaches_budget():
    v = _view(n=49, cls=False)
    for k in (1, 7, 24, 48):
        r = ToMe().compress_view(v, k)
        assert r.feats.shape[0] == k
        assert bool((r.src[1:] > r.src[:-1]).all())  # spatial order


# ------------------------------------------------------------------ PruMerge
def test_iqr_count_matches_numpy():
    s = torch.rand(576, generator=torch.Generator().manual_seed(3)) ** 6
    a = s.numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    assert iqr_outlier_count(s) == int((a > q3 + 1.5 * (q3 - q1)).sum())


def test_prumerge_matches_reference_loop():
    v = _view(n=49, cls=False)
    k = 8
    r = PruMerge(neighbors=5).compress_view(v, k)
    left = k - 1
    idx = torch.argsort(v.scores, descending=True, stable=True)[:left]
    kn = F.normalize(v.keys, dim=-1)
    rows = []
    for i in idx.tolist():
        others = [j for j in range(v.n) if j != i]
        sim = kn[i] @ kn[others].T
        nbr = [others[j] for j in torch.topk(sim, 5).indices.tolist()]
        rows.append(v.feats[i] + (v.feats[nbr] * v.scores[nbr, None]).sum(0))
    pruned = [j for j in range(v.n) if j not in set(idx.tolist())]
    extra = (v.feats[pruned] * v.scores[pruned, None]).sum(0)
    torch.testing.assert_close(r.feats, torch.stack(rows + [extra]))
    assert r.src.tolist() == idx.tolist() + [-1]


def test_prumerge_adaptive_count():
    s = torch.full((64,), 0.01)
    s[[3, 9, 20]] = 0.5  # three clear outliers
    v = ViewTokens(feats=torch.randn(64, 4), scores=s, keys=torch.randn(64, 4), grid=(8, 8))
    out = PruMerge().compress_image(ImageTokens([v]), None)
    assert out[0].feats.shape[0] == 4  # 3 outliers + the extra token
    assert sorted(out[0].src[:3].tolist()) == [3, 9, 20]


# ------------------------------------------------------------------ GlobalCom2
def _anyres_image(n_crops=(2, 2), side=4, seed=0):
    views = [_view(n=side * side, seed=seed + i) for i in range(1 + n_crops[0] * n_crops[1])]
    return ImageTokens(views, base=0, crop_grid=n_crops, crop_views=list(range(1, len(views))))


def test_globalcom2_allocation_rule():
    img = _anyres_image()
    gc = GlobalCom2(tau=0.05)
    R = 0.25
    rates = gc.crop_rates(img.views[0], (2, 2), R)
    amap = img.views[0].scores.view(4, 4)
    s = torch.stack([amap[:2, :2].sum(), amap[:2, 2:].sum(), amap[2:, :2].sum(), amap[2:, 2:].sum()])
    sigma = torch.softmax((s - s.max()) / 0.05, 0)
    np.testing.assert_allclose(rates, torch.clamp(R * (1 + sigma - sigma.mean()), max=1).numpy(), rtol=1e-5)
    assert abs(rates.mean() - R) < 1e-6  # no clipping here: mean retention is R
    out = gc.compress_image(img, Budget(rate=R))
    assert sum(o.feats.shape[0] for o in out) == Budget(rate=R).resolve(80)
    assert out[0].feats.shape[0] == 4  # floor(R * 16) thumbnail tokens
    kept = [o.feats.shape[0] for o in out[1:]]
    assert np.argmax(kept) == np.argmax(rates) or len(set(kept)) == 1


def test_globalcom2_tau10_is_nearly_flat():
    img = _anyres_image()
    img.views[0].scores = img.views[0].scores / img.views[0].scores.sum()  # a probability row
    rates = GlobalCom2().crop_rates(img.views[0], (2, 2), 0.25)
    assert rates.max() - rates.min() < 0.01  # the PAPERS.md pitfall, checked


# ------------------------------------------------------------------ correlation
def test_correlation_density_and_allocation():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 6, generator=g)
    repetitive = ViewTokens(feats=torch.randn(16, 4), scores=torch.rand(16), keys=base[0].repeat(16, 1) + 1e-3 * base, grid=(4, 4))
    diverse = ViewTokens(feats=torch.randn(16, 4), scores=torch.rand(16), keys=torch.randn(16, 64, generator=g), grid=(4, 4))
    method = CorrelationGuided(threshold=0.9)
    d = method.densities(ImageTokens([repetitive, diverse]))
    assert d[0] == pytest.approx(method.min_density) and d[1] == pytest.approx(1.0)
    out = method.compress_image(ImageTokens([repetitive, diverse]), Budget(tokens=10))
    assert out[0].feats.shape[0] < out[1].feats.shape[0]
    assert sum(o.feats.shape[0] for o in out) == 10
    free = method.compress_image(ImageTokens([repetitive, diverse]), None)
    assert free[0].feats.shape[0] == 1 and free[1].feats.shape[0] == 16


# ------------------------------------------------------------------ captured scores == eager attention
def test_clip_cls_scores_match_eager_attention():
    model = tiny_llava(attn_implementation="eager")
    inputs = make_vlm_inputs(model, [1, 1])
    prune(model, "visionzip", 4)
    try:
        with torch.no_grad():
            model(**inputs)
            captured = model.ctxzip_vision._clip_scores()[0]
            eager = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-2]
        torch.testing.assert_close(captured, eager[:, :, 0, :].sum(1), rtol=1e-4, atol=1e-5)
    finally:
        unprune(model)


def test_visionzip_end_to_end_equals_manual_pipeline():
    """LLaVA + VisionZip through the hooks == the reference pipeline written out by hand."""
    model = tiny_llava(attn_implementation="eager")
    inputs = make_vlm_inputs(model, [1])
    k = 6
    with torch.no_grad():
        vt = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        h = vt.hidden_states[-2][0]
        attn = vt.attentions[-2][0, :, 0, 1:].sum(0)
        layer = model.model.vision_tower.encoder.layers[-2]
        keys = layer.self_attn.k_proj(layer.layer_norm1(vt.hidden_states[-3][0]))
        keys = keys.view(keys.shape[0], 2, -1).mean(1)
        view = ViewTokens(feats=h[1:], scores=attn, keys=keys[1:], grid=(4, 4), cls_feat=h[0])
        res = VisionZip().compress_view(view, k)
        img = model.model.multi_modal_projector(res.feats)
        ids = inputs["input_ids"][0]
        pos = torch.nonzero(ids == model.config.image_token_id).flatten()
        emb = model.get_input_embeddings()(ids)
        new = torch.cat([emb[: pos[0]], img, emb[pos[-1] + 1:]])[None]
        hidden = model.model.language_model(inputs_embeds=new).last_hidden_state
        manual = model.lm_head(hidden)
        prune(model, "visionzip", Budget(tokens=k))
        try:
            hooked = model(**inputs).logits
        finally:
            unprune(model)
    torch.testing.assert_close(hooked, manual, rtol=1e-4, atol=1e-5)


def test_fastv_keeps_the_top_tokens_of_eager_last_row():
    from ctxzip.vision.testing import tiny_llava_next

    model = tiny_llava_next(attn_implementation="eager")
    inputs = make_vlm_inputs(model, [1, 2])
    K, keep = 2, 7
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[K - 1][:, :, -1, :].mean(1)
        prune(model, "fastv", Budget(tokens=keep), k=K)
        try:
            out = model(**inputs)
            state = out.past_key_values._ctxzip_vision_state
        finally:
            unprune(model)
    ids = inputs["input_ids"]
    img = ids == model.config.image_token_id
    for b in range(ids.shape[0]):
        kept = set(state.keep_idx[b][state.valid[b]].tolist())
        pos = torch.nonzero(img[b]).flatten().tolist()
        runs, cur = [], [pos[0]]
        for p in pos[1:]:
            if p == cur[-1] + 1:
                cur.append(p)
            else:
                runs.append(cur)
                cur = [p]
        runs.append(cur)
        for run in runs:
            top = torch.topk(att[b, run], keep).indices
            assert {run[i] for i in top.tolist()} == kept & set(run)
        text = set(torch.nonzero(~img[b] & inputs["attention_mask"][b].bool()).flatten().tolist())
        assert text <= kept
