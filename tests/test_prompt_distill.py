"""Distillation: pair labelling (LLMLingua-2 format), teacher labels, training and the shipped
partial-weights artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_label_words_from_pair():
    from ctxzip.prompt.distill import label_words_from_pair

    words, labels = label_words_from_pair(
        "The quick brown fox jumps over the lazy dog.", "quick fox jumps dog"
    )
    assert words[1] == "quick"
    assert labels == [0, 1, 0, 1, 1, 0, 0, 0, 1]
    # order matters and the window bounds the search
    _, lab = label_words_from_pair("a b c d e f", "f a", window=3)
    assert lab == [1, 0, 0, 0, 0, 0]  # "f" is beyond the window, "a" matches
    with pytest.raises(ValueError):
        label_words_from_pair("a", "a", window=0)


def test_load_pairs_formats(tmp_path):
    from ctxzip.prompt.distill import load_pairs

    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"text {i}", "compressed_prompt": "text"}) for i in range(3)))
    assert load_pairs(p) == [(f"text {i}", "text") for i in range(3)]
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"original": "a b", "compressed": "a"}]))
    assert load_pairs(q) == [("a b", "a")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": 1}]))
    with pytest.raises(ValueError):
        load_pairs(bad)
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def mini_tok():
    from transformers import AutoTokenizer

    from ctxzip.models import encoder_path

    return AutoTokenizer.from_pretrained(encoder_path())


def test_pair_labels_and_training_learns(mini_tok, tmp_path):
    """Training on pair labels moves the classifier toward them (loss drops on the train set)."""
    from ctxzip.prompt.distill import (
        DistillConfig,
        export_partial,
        load_partial,
        pair_labels,
        train,
    )

    orig = "Please note that the meeting will start at nine and the budget is due on Friday."
    comp = "meeting start nine budget due Friday"
    recs = pair_labels([(orig, comp)] * 4, mini_tok)
    assert recs and set(np.unique(recs[0]["target"])) <= {0.0, 1.0}
    model, tok, log = train(recs, config=DistillConfig(epochs=6, batch_size=4, lr=1e-3, train_layers=1),
                            eval_records=recs, out_dir=tmp_path / "full", progress=False)
    assert log["epochs"][-1]["eval"]["loss"] < log["eval_before"]["loss"]
    assert (tmp_path / "full" / "config.json").is_file()
    f = export_partial(model, tmp_path / "asset", log["trained_layers"])
    assert f.stat().st_size < 10e6
    m2, _ = load_partial(tmp_path / "asset")
    x = torch.tensor([recs[0]["ids"][:30].tolist()])
    with torch.no_grad():
        assert (model(x).logits - m2(x).logits).abs().max() < 5e-2  # fp16 storage


def test_teacher_labels_soft_ranks(mini_tok):
    from ctxzip.models import load_tokenizer
    from ctxzip.prompt import PerplexityCompressor
    from ctxzip.prompt.distill import teacher_labels
    from ctxzip.testing import tiny_causal_lm

    lt = load_tokenizer()
    teacher = PerplexityCompressor(model=tiny_causal_lm("llama", vocab_size=len(lt)), lm_tokenizer=lt)
    recs = teacher_labels(["Assertions help debugging. Names are identifiers."], mini_tok, teacher, progress=False)
    t = recs[0]["target"]
    assert t.min() == 0.0 and t.max() == 1.0 and len(t) == recs[0]["word_of_token"].max() + 1
    hard = teacher_labels(["Assertions help debugging. Names are identifiers."], mini_tok, teacher, soft=False, progress=False)
    assert set(np.unique(hard[0]["target"])) <= {0.0, 1.0}


def test_default_corpus_holdout_disjoint():
    from ctxzip.prompt.distill import default_corpus, holdout_topic_keys

    train_ids = {s for s, _ in default_corpus("train", metadata_chars=0)}
    held = {f"pydoc:{k}" for k in holdout_topic_keys()}
    assert held and not (train_ids & held)
    with pytest.raises(ValueError):
        default_corpus("test")


def test_shipped_default_artifact():
    from ctxzip.prompt.distill import default_asset_dir, load_default_classifier

    f = default_asset_dir() / "partial.safetensors"
    if not f.is_file():
        pytest.skip("default classifier not built yet (ctxzip prompt distill --default)")
    assert f.stat().st_size <= 10 * 1024 * 1024
    meta = json.loads((default_asset_dir() / "meta.json").read_text())
    assert meta["trained_layers"]
    model, tok = load_default_classifier()
    assert model.config.num_labels == 2


def test_sentence_rank_labels(mini_tok):
    from ctxzip.models import load_tokenizer
    from ctxzip.prompt import PerplexityCompressor
    from ctxzip.prompt.distill import teacher_labels
    from ctxzip.prompt.perplexity import split_sentences
    from ctxzip.testing import tiny_causal_lm

    lt = load_tokenizer()
    teacher = PerplexityCompressor(model=tiny_causal_lm("llama", vocab_size=len(lt)), lm_tokenizer=lt)
    text = "Assertions help debugging. Names are identifiers. Bananas are yellow and long."
    rec = teacher_labels([text], mini_tok, teacher, sentence_weight=1.0, progress=False)[0]
    from ctxzip.prompt.distill import word_spans

    _, _, spans = word_spans(mini_tok, text)
    starts = np.asarray([a for a, _ in split_sentences(text)])
    sid = np.searchsorted(starts, spans[:, 0], side="right") - 1
    t = rec["target"]
    for s in range(3):  # one value per sentence, the three sentences ranked 0, 0.5, 1
        assert len(set(t[sid == s].tolist())) == 1
    assert sorted(set(t.tolist())) == [0.0, 0.5, 1.0]
    mixed = teacher_labels([text], mini_tok, teacher, sentence_weight=0.5, progress=False)[0]["target"]
    assert mixed.min() >= 0 and mixed.max() <= 1 and len(set(mixed.tolist())) > 3


def test_stdlib_docstring_corpus_is_train_only():
    from ctxzip.prompt.distill import _stdlib_docstrings, default_corpus

    docs = _stdlib_docstrings(20_000)
    assert docs and all(s.startswith("stdlib-doc:") for s, _ in docs)
    assert sum(len(t) for _, t in docs) >= 20_000
    held = default_corpus("holdout", docstring_chars=20_000)
    assert not any(s.startswith("stdlib-doc:") for s, _ in held)


def test_sentence_rank_loss_prefers_the_teachers_order():
    from ctxzip.prompt.distill import sentence_rank_loss

    sent = torch.tensor([[-1, 0, 0, 1, 1, 2, 2, -1]])
    teacher = [torch.tensor([3.0, 1.0, 2.0])]
    agree = torch.tensor([[0.5, 0.9, 0.8, 0.1, 0.2, 0.5, 0.5, 0.5]])  # means 0.85, 0.15, 0.5
    reverse = torch.tensor([[0.5, 0.1, 0.2, 0.9, 0.8, 0.5, 0.5, 0.5]])
    assert float(sentence_rank_loss(agree, sent, teacher)) < float(sentence_rank_loss(reverse, sent, teacher))
    # the gradient raises the sentence the teacher ranks first and lowers the last
    p = torch.full((1, 8), 0.5, requires_grad=True)
    sentence_rank_loss(p, sent, teacher).backward()
    assert p.grad[0, 1] < 0 < p.grad[0, 3]
    # one sentence or ties only: no pair, zero loss (still differentiable)
    z = sentence_rank_loss(p, torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0]]), [torch.tensor([1.0])])
    assert float(z.detach()) == 0.0 and z.requires_grad


def test_training_with_sentence_loss(mini_tok):
    from ctxzip.models import load_tokenizer
    from ctxzip.prompt import PerplexityCompressor
    from ctxzip.prompt.distill import DistillConfig, teacher_labels, train
    from ctxzip.testing import tiny_causal_lm

    lt = load_tokenizer()
    teacher = PerplexityCompressor(model=tiny_causal_lm("llama", vocab_size=len(lt)), lm_tokenizer=lt)
    text = "Assertions help debugging. Names are identifiers. Bananas are yellow and long. The end."
    recs = teacher_labels([text] * 2, mini_tok, teacher, progress=False)
    model, _, log = train(recs, config=DistillConfig(epochs=2, batch_size=2, train_layers=1, sentence_loss=1.0),
                          eval_records=recs, progress=False)
    assert len(log["epochs"]) == 2 and log["config"]["sentence_loss"] == 1.0
    with pytest.raises(ValueError, match="sentence_loss"):
        train(recs, config=DistillConfig(sentence_loss=-1.0), progress=False)
    pairs = [{k: v for k, v in r.items() if k != "sent_score"} for r in recs]
    with pytest.raises(ValueError, match="sentence_loss"):
        train(pairs, config=DistillConfig(sentence_loss=1.0), progress=False)


def test_int8_delta_storage_is_half_the_bytes(tmp_path):
    from ctxzip.prompt.distill import export_partial, load_default_classifier, load_partial

    model, tok = load_default_classifier()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a stand-in for training layers 2-3 (the shipped asset trains 4-5)
        for layer in model.bert.encoder.layer[2:4]:
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    x = torch.tensor([tok("Deltas from the base are small, so eight bits per entry suffice.")["input_ids"]])
    f16 = export_partial(model, tmp_path / "f16", [2, 3, 4, 5])
    q8 = export_partial(model, tmp_path / "q8", [2, 3, 4, 5], storage="int8-delta")
    assert q8.stat().st_size < 0.55 * f16.stat().st_size
    with torch.no_grad():
        ref = model(x).logits
        for d in ("f16", "q8"):
            m2, _ = load_partial(tmp_path / d)
            assert (m2(x).logits - ref).abs().max() < 5e-3
    assert json.loads((tmp_path / "q8" / "meta.json").read_text())["storage"] == "int8-delta"
    with pytest.raises(ValueError, match="storage"):
        export_partial(model, tmp_path / "bad", [5], storage="int4")


def test_check_default_corpus_against_recorded_sources(tmp_path, capsys):
    """``ctxzip prompt distill --check-corpus`` says whether this environment would rebuild the
    shipped default from the same text (installed packages' descriptions are part of it)."""
    from ctxzip.cli import main
    from ctxzip.prompt.distill import (
        DEFAULT_RECIPE,
        check_default_corpus,
        corpus_digest,
        default_corpus,
    )

    corpus = default_corpus("train", metadata_chars=DEFAULT_RECIPE["metadata_chars"],
                            docstring_chars=DEFAULT_RECIPE["docstring_chars"])
    sources = [s for s, _ in corpus]
    chars = sum(len(t) for _, t in corpus)

    def asset(name: str, recorded: dict) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"distill_log": {"corpus": recorded}}))
        return str(d)

    same = asset("same", {"sources": sources, "chars": chars, "sha256": corpus_digest(corpus)})
    rep = check_default_corpus(same)
    assert rep["match"] and rep["missing"] == [] and rep["extra"] == [] and rep["chars"] == chars
    # an asset built where one more package was installed, and one fewer
    other = asset("other", {"sources": ["metadata:gone-1.0.dist-info", *sources[1:]], "chars": chars})
    rep = check_default_corpus(other)
    assert not rep["match"]
    assert rep["missing"] == ["metadata:gone-1.0.dist-info"] and rep["extra"] == [sources[0]]
    # same sources, other text: the digest tells
    edited = asset("edited", {"sources": sources, "chars": chars, "sha256": "0" * 64})
    assert not check_default_corpus(edited)["match"]
    assert main(["prompt", "distill", "--check-corpus", "--asset-dir", same]) == 0
    assert json.loads(capsys.readouterr().out)["match"] is True
    assert main(["prompt", "distill", "--check-corpus", "--asset-dir", other]) == 1
    err = capsys.readouterr().err
    assert "differs from the one the shipped classifier was trained on" in err and "gone-1.0" in err
    # not an asset / an asset without a recorded corpus: clear errors, not KeyError
    with pytest.raises(FileNotFoundError, match="meta.json"):
        check_default_corpus(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="records no training corpus"):
        check_default_corpus(asset("bare", {}))
    assert main(["prompt", "distill", "--check-corpus", "--asset-dir", str(tmp_path / "nowhere")]) == 2
    # the shipped asset records its corpus, so the check runs against it by default
    assert check_default_corpus()["shipped_sources"] > 0


def test_distill_default_warns_before_training_on_another_corpus(tmp_path, monkeypatch, capsys):
    """``--default`` checks the corpus first (85 minutes of work follow); not with a custom
    corpus size, where a different corpus is the point."""
    from ctxzip.cli import main
    from ctxzip.prompt import distill as D

    calls = []
    monkeypatch.setattr(D, "check_default_corpus", lambda asset_dir=None: {
        "match": False, "sources": 3, "shipped_sources": 2, "chars": 10, "shipped_chars": 9,
        "missing": [], "extra": ["metadata:new-1.0.dist-info"]})
    monkeypatch.setattr(D, "distill_default", lambda *a, **k: calls.append(k) or {"n_train": 0})
    assert main(["prompt", "distill", "--default", "--asset-dir", str(tmp_path), "--no-progress"]) == 0
    assert "new-1.0" in capsys.readouterr().err and len(calls) == 1
    assert main(["prompt", "distill", "--default", "--asset-dir", str(tmp_path), "--metadata-chars", "1000",
                 "--no-progress"]) == 0
    assert "differs" not in capsys.readouterr().err and len(calls) == 2
