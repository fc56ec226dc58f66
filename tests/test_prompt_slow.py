"""Real-model checks (SmolLM2 teacher, shipped MiniLM classifier) on held-out prose."""

from __future__ import annotations

import numpy as np
import pytest

from ctxzip.budget import Budget

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def heldout_text():
    import pydoc_data.topics as t

    from ctxzip.prompt.distill import holdout_topic_keys

    return t.topics[holdout_topic_keys()[0]][:3000]


def test_default_classifier_agrees_with_teacher(heldout_text):
    """The shipped student ranks held-out words like its teacher (it never saw this text)."""
    from transformers import AutoTokenizer

    from ctxzip.models import encoder_path
    from ctxzip.prompt import TokenClassifierCompressor
    from ctxzip.prompt.distill import DEFAULT_RECIPE, teacher_labels

    tok = AutoTokenizer.from_pretrained(encoder_path())
    rec = teacher_labels([heldout_text], tok, sentence_weight=DEFAULT_RECIPE["sentence_weight"], progress=False)[0]
    ws = TokenClassifierCompressor().score_words(heldout_text)
    assert len(ws.prob) == len(rec["target"])
    rho = np.corrcoef(np.argsort(np.argsort(ws.prob)), np.argsort(np.argsort(rec["target"])))[0, 1]
    assert rho > 0.2


def test_real_models_respect_budget(heldout_text):
    from ctxzip.prompt import PerplexityCompressor, TokenClassifierCompressor

    for c in (TokenClassifierCompressor(), PerplexityCompressor()):
        r = c.compress(heldout_text, budget=Budget(rate=0.33))
        assert 0.2 < r.rate <= 0.34
        assert isinstance(r.ratio, float) and r.ratio > 2.5


def test_teacher_and_student_beat_random_drop():
    """On a held-out document, the budget-controller teacher and the distilled default keep
    more of the context's benefit (recall target, SmolLM2 reader) than random token drop."""
    from ctxzip.eval import ContextEvaluator, prose_documents
    from ctxzip.prompt import PerplexityCompressor, RandomDropCompressor, TokenClassifierCompressor
    from ctxzip.prompt.distill import holdout_topic_keys

    held = set(holdout_topic_keys())
    doc = next(d for d in prose_documents(None, min_chars=3000, max_chars=6000) if d.id.split(":")[1] in held)
    ev = ContextEvaluator()
    case = ev.make_case(doc.text, context_tokens=512, n_recall=8, doc_id=doc.id)
    tok = ev.tokenizer
    b = Budget(rate=0.5)
    rnd = ev.benefit(case, RandomDropCompressor(seed=0, tokenizer=tok).compress(case.context_text, budget=b).text)
    teacher = PerplexityCompressor(sentence_filter=True, token_budget_ratio=1.0, tokenizer=tok)
    te = ev.benefit(case, teacher.compress(case.context_text, budget=b).text)
    st = ev.benefit(case, TokenClassifierCompressor(tokenizer=tok).compress(case.context_text, budget=b).text)
    assert te["recall"] > rnd["recall"] + 0.1
    assert st["recall"] > rnd["recall"] + 0.1
