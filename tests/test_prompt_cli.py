"""`ctxzip compress` and `ctxzip prompt distill` command lines."""

from __future__ import annotations

import json

import pytest

from ctxzip.cli import main

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_clf(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from ctxzip.models import encoder_path

    tok = AutoTokenizer.from_pretrained(encoder_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=2)
    d = tmp_path_factory.mktemp("clf")
    BertForTokenClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_compress_json_and_plain(tiny_clf, tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_text("The assert statement inserts debugging assertions into a program. " * 10)
    assert main(["compress", str(f), "--rate", "0.33", "--model", str(tiny_clf), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["compressed_tokens"] <= int(0.33 * d["original_tokens"]) and d["text"]
    assert main(["compress", str(f), "--rate", "3x", "--model", str(tiny_clf)]) == 0
    assert capsys.readouterr().out.strip()


def test_compress_errors(tiny_clf, tmp_path, capsys):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"\xff\xfe\xfa")
    assert main(["compress", str(f), "--model", str(tiny_clf)]) == 2
    assert "UTF-8" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "none.txt")]) == 2
    assert main(["compress", str(f), "--rate", "0"]) == 2
    assert main(["compress", str(f), "--rate", "1.5"]) == 2


def test_distill_cli_errors(capsys):
    assert main(["prompt", "distill"]) == 2
    assert main(["prompt", "distill", "--default", "--pairs", "x.json"]) == 2


def test_distill_cli_pairs(tmp_path, capsys):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": "The meeting starts at nine on Friday morning.",
                                        "compressed_prompt": "meeting nine Friday"}) for _ in range(3)))
    rc = main(["prompt", "distill", "--pairs", str(p), "--asset-dir", str(tmp_path / "a"),
               "--epochs", "1", "--train-layers", "1", "--no-progress"])
    assert rc == 0
    assert (tmp_path / "a" / "partial.safetensors").is_file()


def test_compress_sentence_filter_flag(tiny_clf, tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_text("The assert statement inserts debugging assertions. Identifiers are names.\n" * 6)
    # a --model classifier: the sentence stage is off unless asked for
    assert main(["compress", str(f), "--rate", "0.5", "--model", str(tiny_clf), "--json", "--details"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["settings"] == {"method": "lingua2", "sentence_filter": False, "token_budget_ratio": None, "whitespace": "keep"}
    assert "kept_sentences" not in d["details"]
    assert main(["compress", str(f), "--rate", "0.5", "--model", str(tiny_clf), "--sentence-filter",
                 "--token-budget-ratio", "1.2", "--json", "--details"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["settings"] == {"method": "lingua2", "sentence_filter": True, "token_budget_ratio": 1.2, "whitespace": "keep"}
    assert d["details"]["sentences"] == 12 and 0 < d["details"]["kept_sentences"] <= 12
    assert d["compressed_tokens"] <= int(0.5 * d["original_tokens"])
    # bad combinations and values are clear errors
    assert main(["compress", str(f), "--model", str(tiny_clf), "--sentence-filter", "--mode", "chunk"]) == 2
    assert "--mode global" in capsys.readouterr().err
    assert main(["compress", str(f), "--model", str(tiny_clf), "--sentence-filter", "--token-budget-ratio", "0.5"]) == 2
    assert "token_budget_ratio" in capsys.readouterr().err
    assert main(["compress", str(f), "--method", "perplexity-sentence", "--sentence-filter"]) == 2


def test_compress_whitespace_flag(tiny_clf, tmp_path, capsys):
    f = tmp_path / "table.txt"
    f.write_text("| name      | value     |\n| alpha     | 1         |\n| beta      | 2         |\n" * 8)
    outs = {}
    for ws in ("keep", "collapse"):
        assert main(["compress", str(f), "--rate", "0.9", "--model", str(tiny_clf), "--whitespace", ws]) == 0
        outs[ws] = capsys.readouterr().out
    assert "  " in outs["keep"]  # table padding between neighbouring kept words survives
    assert "  " not in outs["collapse"]
    assert main(["compress", str(f), "--rate", "0.9", "--model", str(tiny_clf), "--whitespace", "collapse", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["whitespace"] == "collapse"
    with pytest.raises(SystemExit) as e:  # argparse rejects an unknown choice
        main(["compress", str(f), "--model", str(tiny_clf), "--whitespace", "tabs"])
    assert e.value.code == 2 and "--whitespace" in capsys.readouterr().err


def test_compress_perplexity_sentence_filter(tmp_path, capsys):
    from ctxzip.models import load_tokenizer
    from ctxzip.testing import tiny_causal_lm

    tok = load_tokenizer()
    lm_dir = tmp_path / "lm"
    tiny_causal_lm("llama", vocab_size=len(tok)).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    f = tmp_path / "in.txt"
    f.write_text("The assert statement inserts debugging assertions. Identifiers are names.\n" * 6)
    assert main(["compress", str(f), "--rate", "0.5", "--method", "perplexity", "--model", str(lm_dir),
                 "--sentence-filter", "--json", "--details"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["settings"] == {"method": "perplexity", "sentence_filter": True, "token_budget_ratio": 1.0}
    assert d["details"]["sentences"] == 12 and d["details"]["kept_sentences"] >= 1
    assert d["compressed_tokens"] == int(0.5 * d["original_tokens"])


def test_compress_fast_kinds(tiny_clf, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    f = tmp_path / "in.txt"
    f.write_text("The assert statement inserts debugging assertions into a program. " * 10)
    outs = {}
    for extra in ([], ["--fast", "onnx-exact"]):
        assert main(["compress", str(f), "--rate", "0.4", "--model", str(tiny_clf), "--mode", "chunk", *extra]) == 0
        outs[tuple(extra)] = capsys.readouterr().out
    assert outs[()] == outs[("--fast", "onnx-exact")]
    assert main(["compress", str(f), "--model", str(tiny_clf), "--fast", "onnx-exact"]) == 2  # needs --mode chunk
    assert "mode='chunk'" in capsys.readouterr().err
    assert main(["compress", str(f), "--model", str(tiny_clf), "--fast", "fp4"]) == 2
    assert "fast" in capsys.readouterr().err
