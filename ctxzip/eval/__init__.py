"""Shared quality metric (context benefit retained) and real local corpora."""

from ctxzip.eval.corpora import Document, code_documents, prose_documents, stdlib_python_files
from ctxzip.eval.metric import (
    TARGETS,
    ContextEvaluator,
    EvalCase,
    context_benefit,
    pooled_benefit,
    pooled_benefit_diff,
)

__all__ = [
    "Document",
    "prose_documents",
    "code_documents",
    "stdlib_python_files",
    "ContextEvaluator",
    "EvalCase",
    "context_benefit",
    "pooled_benefit",
    "pooled_benefit_diff",
    "TARGETS",
]
