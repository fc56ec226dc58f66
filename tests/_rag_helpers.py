"""Test doubles for the RECOMP/RAG tests: a deterministic bag-of-words encoder with the
``SentenceTransformer.encode`` interface, and the packaged MiniLM's tokenizer as a fast counting
tokenizer (no causal LM needed for mechanism tests)."""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np

DIM = 256


def _bucket(w: str) -> int:
    return int(hashlib.md5(w.encode()).hexdigest()[:8], 16) % DIM


class HashEncoder:
    """Bag-of-words hashing encoder: the cosine between a query and a sentence grows with the
    words they share - enough to check selection mechanics deterministically."""

    device = "cpu"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False,
               normalize_embeddings=False, **_):
        self.calls += 1
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9_]+", t.lower()):
                if len(w) > 2:
                    out[i, _bucket(w)] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


@lru_cache(maxsize=1)
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from ctxzip.models import encoder_path

    return AutoTokenizer.from_pretrained(encoder_path(), local_files_only=True)


DOCS = [
    "The assert statement checks a condition. It raises AssertionError when the condition is "
    "false. Optimisation mode removes assert statements.",
    "A while loop repeats a block. The loop ends when its condition becomes false. A break "
    "statement leaves the loop early.",
    "Lists are mutable sequences. Tuples are immutable sequences. Both support indexing.",
]
