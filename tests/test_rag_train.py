"""Teacher scoring and label caching of ``ctxzip rag train-extractive`` (tiny random LM)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _rag_helpers import minilm_tokenizer

from ctxzip.rag.train_extractive import ContinuationScorer, TrainConfig, _label_cached
from ctxzip.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def scorer():
    tok = minilm_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok))
    return ContinuationScorer(model, tok, batch_size=3)


def _reference(scorer, ctx, prefix, cont):
    """Unpadded, one row at a time, full logits."""
    enc = scorer.encode
    c = enc(ctx.strip() + "\n\n") if ctx and ctx.strip() else []
    tgt = enc(cont)
    row = torch.tensor([scorer.start + c + enc(prefix) + tgt])
    with torch.no_grad():
        logp = torch.log_softmax(scorer.model(input_ids=row).logits[0].float(), -1)
    n = row.shape[1]
    pos = torch.arange(n - len(tgt) - 1, n - 1)
    return float(-logp[pos, row[0, pos + 1]].mean())


def test_left_padded_scoring_matches_unpadded_rows(scorer):
    ctxs = [None, "short context.", "a much longer context " * 12, "", "mid length text here"]
    prefix, cont = "the prefix of the case goes here", "and the continuation follows it"
    got = scorer.nll(ctxs, prefix, cont)
    want = np.array([_reference(scorer, c, prefix, cont) for c in ctxs])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert got[0] == pytest.approx(got[3])  # empty context == no context
    with pytest.raises(ValueError, match="continuation is empty"):
        scorer.nll([None], prefix, "")


def test_label_cache_resumes_without_rescoring(scorer, tmp_path):
    class Ranker:
        def score(self, query, sents):
            return np.arange(len(sents), dtype=float)

    def examples():
        return [SimpleNamespace(doc_id=f"d{i}", prefix=f"prefix number {i}",
                                continuation="next words here", query=f"query {i}",
                                passages=[f"One sentence {i}. Two sentence. Three."],
                                passage_ids=[f"p{i}"], sentences=[], gains=[],
                                nll_none=float("nan")) for i in range(3)]

    cfg = TrainConfig(max_sentences=2)
    path = tmp_path / "labels.jsonl"
    first = examples()
    _label_cached(first, scorer, Ranker(), cfg, path, progress=False, chunk=2)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 3 and all(len(d["gains"]) == 2 for d in lines)

    class Boom:
        model = tokenizer = None

        def nll(self, *a, **k):
            raise AssertionError("cached cases must not be scored again")

    again = examples()
    _label_cached(again, Boom(), Ranker(), cfg, path, progress=False)
    for a, b in zip(first, again):
        assert a.sentences == b.sentences and a.gains == b.gains
        assert a.nll_none == b.nll_none
