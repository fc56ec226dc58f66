"""The cache keyword across transformers releases (5.24 renamed ``past_key_values`` to ``cache``)."""

import transformers

from ctxzip._hf_compat import CACHE_KW, _version, cache_from_kwargs, cache_from_output, with_cache


def test_either_name_is_read():
    c = object()
    assert cache_from_kwargs({"cache": c}) is c
    assert cache_from_kwargs({"past_key_values": c}) is c
    assert cache_from_kwargs({"hidden_states": 1}) is None


def test_keyword_matches_the_installed_release():
    new = _version(transformers.__version__) >= (5, 24)
    assert ("cache" if new else "past_key_values") == CACHE_KW
    assert with_cache(None) == {CACHE_KW: None}
    assert _version("5.24.0") == (5, 24) and _version("5.3.0rc1") == (5, 3)
    assert _version("5.23.0.dev0") < (5, 24) <= _version("6.0")


def test_output_cache_is_found():
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        out = model(torch.arange(5)[None], use_cache=True)
    cache = cache_from_output(out)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 5
