"""Compress a real document with the baselines and score it with the shared metric.

Run: python examples/quickstart.py
"""

from ctxzip import Budget
from ctxzip.eval import ContextEvaluator, prose_documents
from ctxzip.prompt import RandomDropCompressor, TruncationCompressor

doc = prose_documents(1)[0]
ev = ContextEvaluator()  # target LM: the offline SmolLM2
case = ev.make_case(doc.text, context_tokens=512, continuation_tokens=64, n_recall=8)
for comp in (RandomDropCompressor(), TruncationCompressor("tail")):
    res = comp.compress(case.context_text, budget=Budget(rate=0.33))
    score = ev.benefit(case, res.text)
    print(f"{res.method:14s} rate={res.rate:.2f} ratio={res.ratio:.1f}x "
          f"retained: continuation={score['continuation']:.2f} recall={score['recall']:.2f}")
