"""PreSelect pieces: per-document BPC (sliding window inside documents), predictive strength,
balanced labels, fastText training/scoring, layer-truncated ladder rungs."""

from __future__ import annotations

import math
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxzip.datasel import (
    FastTextScorer,
    LadderModel,
    PreSelect,
    balanced_labels,
    document_bpc,
    document_nll,
    predictive_strength,
    train_fasttext,
)
from ctxzip.datasel.bpc import _windows, truncate_layers
from ctxzip.testing import tiny_causal_lm


class ByteTokenizer:
    """Bytes 0..254 are tokens; 255 is the document-start (BOS) token. For tiny models."""

    bos_token_id = 255
    eos_token_id = 255
    pad_token_id = 0

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(256)}

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[min(b, 254) for b in t.encode("utf-8")] for t in texts]}


def _manual_nll(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]),
                                                   reduction="sum"))


def test_windows_score_each_target_once() -> None:
    for n in (1, 2, 5, 16, 17, 50, 97):
        for window, stride in ((16, 8), (16, 15), (4, 1), (100, 30)):
            ws = _windows(n, window, stride)
            covered = []
            for b, e, new in ws:
                assert e - b <= window and new <= e - b - (1 if b == 0 else 0)
                covered += list(range(e - new, e))
            assert covered == list(range(1, n))


def test_document_nll_matches_direct_forward_and_is_per_document() -> None:
    model = tiny_causal_lm("llama", vocab_size=256)
    tok = ByteTokenizer()
    docs = ["short doc", "a somewhat longer document about nothing in particular", "x"]
    nll, ntok = document_nll(model, tok, docs, window=512, stride=256)
    for d, t in enumerate(docs):
        ids = [255] + list(t.encode())
        assert ntok[d] == len(ids) - 1
        assert nll[d] == pytest.approx(_manual_nll(model, ids), rel=1e-4)
    # batching with other documents (padding, length sorting) changes nothing
    alone = [document_nll(model, tok, [t], window=512, stride=256)[0][0] for t in docs]
    np.testing.assert_allclose(nll, alone, rtol=1e-4)
    bpc = document_bpc(model, tok, docs, window=512, stride=256)
    np.testing.assert_allclose(bpc, nll / (np.array([len(t) for t in docs]) * math.log(2)))


def test_document_nll_sliding_window_inside_document() -> None:
    model = tiny_causal_lm("llama", vocab_size=256)
    tok = ByteTokenizer()
    doc = "the quick brown fox jumps over the lazy dog " * 3
    ids = [255] + list(doc.encode())
    full, n_full = document_nll(model, tok, [doc], window=1024, stride=512)
    win, n_win = document_nll(model, tok, [doc], window=32, stride=16)
    assert n_full[0] == n_win[0] == len(ids) - 1
    # manual strided computation
    total = 0.0
    for b, e, new in _windows(len(ids), 32, 16):
        with torch.no_grad():
            logits = model(torch.tensor([ids[b:e]])).logits[0].float()
        L = e - b
        total += float(torch.nn.functional.cross_entropy(
            logits[L - new - 1:L - 1], torch.tensor(ids[b:e][L - new:]), reduction="sum"))
    assert win[0] == pytest.approx(total, rel=1e-4)
    assert full[0] == pytest.approx(_manual_nll(model, ids), rel=1e-4)


def test_document_nll_errors() -> None:
    model = tiny_causal_lm("llama", vocab_size=256)
    with pytest.raises(ValueError, match="empty"):
        document_nll(model, ByteTokenizer(), ["ok", ""])
    with pytest.raises(ValueError, match="stride"):
        document_nll(model, ByteTokenizer(), ["ok"], window=8, stride=8)


def test_truncate_layers_shares_weights_and_keeps_original() -> None:
    model = tiny_causal_lm("llama", vocab_size=256, num_layers=4)
    ids = torch.tensor([[255, 10, 20, 30, 40]])
    with torch.no_grad():
        ref = model(ids).logits
        small = truncate_layers(model, 2)
        out = small(ids).logits
        same = truncate_layers(model, 4)(ids).logits
    assert len(model.get_decoder().layers) == 4 and len(small.get_decoder().layers) == 2
    assert small.get_decoder().layers[0] is model.get_decoder().layers[0]
    assert not torch.allclose(out, ref)
    torch.testing.assert_close(same, ref)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)  # original untouched
    with pytest.raises(ValueError, match="keep"):
        truncate_layers(model, 5)
    g = tiny_causal_lm("gemma3", vocab_size=256, num_layers=4)
    with torch.no_grad():
        assert truncate_layers(g, 3)(ids).logits.shape == (1, 5, 256)


def test_predictive_strength_definition() -> None:
    bench = [3.0, 2.0, 1.0]  # model 0 best
    losses = [[1.0, 2.0, 3.0],   # perfect order -> 1
              [3.0, 2.0, 1.0],   # reversed -> 0
              [1.0, 3.0, 2.0],   # pairs (0,1) ok, (0,2) ok, (1,2) wrong -> 2/3
              [1.0, 1.0, 3.0]]   # tie on (0,1) counts 0 -> 2/3
    np.testing.assert_allclose(predictive_strength(losses, bench), [1, 0, 2 / 3, 2 / 3])
    # equal benchmark scores: that pair is excluded from Z
    np.testing.assert_allclose(predictive_strength([[1.0, 2.0, 3.0]], [2.0, 2.0, 1.0]), [1.0])
    with pytest.raises(ValueError, match="equal"):
        predictive_strength([[1.0, 2.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        predictive_strength([[1.0, 2.0]], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        predictive_strength([[1.0, float("nan")]], [1.0, 2.0])


def test_balanced_labels() -> None:
    s = np.array([1.0, 0.2, 1.0, 0.0, 0.5, 0.2, 1.0])
    pos, neg = balanced_labels(s)
    assert pos.tolist() == [0, 2, 6] and neg.tolist() == [3, 1, 5]
    pos, neg = balanced_labels(np.array([1.0, 1.0, 1.0, 0.3]))
    assert pos.tolist() == [0] and neg.tolist() == [3]
    with pytest.raises(ValueError, match="no document"):
        balanced_labels(np.array([0.5, 0.2]))


def _real_texts() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    prose = " ".join(topics[k] for k in sorted(topics))
    root = Path(sysconfig.get_paths()["stdlib"])
    code = "".join((root / f).read_text() for f in ("argparse.py", "difflib.py", "shlex.py"))
    return ([prose[i:i + 800] for i in range(0, 80 * 800, 800)],
            [code[i:i + 800] for i in range(0, 80 * 800, 800)])


def test_fasttext_train_save_score(tmp_path: Path) -> None:
    pytest.importorskip("fasttext")
    prose, code = _real_texts()
    texts = code[:60] + prose[:60]
    # the reference settings (3 epochs, lr 0.1) underfit 120 documents; more epochs here
    scorer = train_fasttext(texts, [1] * 60 + [0] * 60, tmp_path / "m.bin", epoch=40, lr=0.5)
    s = scorer.score_texts(code[60:] + prose[60:])
    assert s.shape == (40,) and np.all((s >= 0) & (s <= 1))
    assert s[:20].mean() > s[20:].mean() + 0.2
    s2 = pickle.loads(pickle.dumps(scorer)).score_texts(code[60:] + prose[60:])
    np.testing.assert_allclose(s, s2)
    # newlines are replaced exactly as in training
    assert scorer.score_texts(["a\nb"])[0] == pytest.approx(scorer.score_texts(["a b"])[0])
    with pytest.raises(ValueError, match="labels"):
        FastTextScorer(str(tmp_path / "m.bin"), label="__label__good").score_texts(["x"])
    with pytest.raises(FileNotFoundError):
        FastTextScorer(str(tmp_path / "none.bin"))
    with pytest.raises(ValueError, match="both labels"):
        train_fasttext(["a", "b"], [1, 1], tmp_path / "x.bin")


def test_preselect_fit_from_losses(tmp_path: Path) -> None:
    pytest.importorskip("fasttext")
    prose, code = _real_texts()
    texts = code[:50] + prose[:50]
    ps = PreSelect([LadderModel("a", 3.0), LadderModel("b", 2.0), LadderModel("c", 1.0)],
                   epoch=40, lr=0.5)
    rng = np.random.default_rng(0)
    # code documents order the models like the benchmark; prose documents do not
    losses = np.concatenate([np.sort(rng.random((50, 3)), axis=1),
                             np.sort(rng.random((50, 3)), axis=1)[:, ::-1]])
    scorer, info = ps.fit(texts, tmp_path / "ps.bin", losses=losses)
    assert info["positives"].tolist() == list(range(50))
    assert set(info["negatives"].tolist()) == set(range(50, 100))
    assert scorer.score_texts(code[60:70]).mean() > scorer.score_texts(prose[60:70]).mean()
    with pytest.raises(ValueError, match="at least 2"):
        PreSelect([LadderModel("a", 1.0)])
    with pytest.raises(ValueError, match="benchmark scores missing"):
        PreSelect([LadderModel("a"), LadderModel("b")]).benchmarks()


@pytest.mark.slow
def test_loss_scorer_real_model_prefers_real_text() -> None:
    from ctxzip.datasel import LossScorer

    prose, _ = _real_texts()
    rng = np.random.default_rng(0)
    shuffled = [" ".join(rng.permutation(t.split())) for t in prose[:6]]
    s = LossScorer("smollm2").score_texts(prose[:6] + shuffled)
    assert s[:6].mean() > s[6:].mean() + 0.3
    assert np.all(s < 0)


def test_cli_select_preselect_with_trained_classifier(tmp_path: Path, capsys) -> None:
    pytest.importorskip("fasttext")
    import json

    from ctxzip.cli import main

    prose, code = _real_texts()
    train_fasttext(code[:60] + prose[:60], [1] * 60 + [0] * 60, tmp_path / "m.bin",
                   epoch=40, lr=0.5)
    with open(tmp_path / "pool.jsonl", "w") as f:
        for i, t in enumerate(code[60:] + prose[60:]):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
        f.write("not json\n")
    rc = main(["select", "preselect", "--model", str(tmp_path / "m.bin"), "--input",
               str(tmp_path / "pool.jsonl"), "--keep-tokens", "8000", "--token-unit", "chars",
               "--out", str(tmp_path / "OUT"), "--workers", "1", "-q"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 41 and out["malformed"] == 1
    sel = [json.loads(line) for f in (tmp_path / "OUT" / "selected").glob("*.jsonl")
           for line in f.read_text().splitlines()]
    assert sum(len(s["text"]) for s in sel) <= 8000 and len(sel) == out["selected"] >= 5
    assert np.mean([int(s["id"][1:]) < 20 for s in sel]) > 0.7  # mostly the code chunks
    rc = main(["select", "preselect", "--model", str(tmp_path / "missing.bin"), "--input",
               str(tmp_path / "pool.jsonl"), "--keep", "10%", "--out", str(tmp_path / "X")])
    assert rc == 2
