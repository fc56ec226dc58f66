"""Compress a real document four ways: LLMLingua-2 (distilled MiniLM classifier), LLMLingua-1
(perplexity under SmolLM2; token level, and the budget controller: sentences, then tokens) and
LongLLMLingua (question-aware).

    python examples/prompt_compress.py
"""

import pydoc_data.topics

from ctxzip.budget import Budget
from ctxzip.prompt import PerplexityCompressor, TokenClassifierCompressor

text = pydoc_data.topics.topics["assert"] + "\n" + pydoc_data.topics.topics["pass"]

fast = TokenClassifierCompressor()  # offline default classifier, budget hit exactly
r = fast.compress(text, budget=Budget(rate=0.33))
print(f"[lingua2] {r.original_tokens} -> {r.compressed_tokens} tokens (rate {r.rate:.2f})\n{r.text}\n")

ppl = PerplexityCompressor()  # offline SmolLM2
r = ppl.compress(text, budget=Budget(rate=0.5))
print(f"[perplexity] rate {r.rate:.2f}\n{r.text}\n")

# the recommended configuration (and the default classifier's teacher): LLMLingua's budget
# controller, sentence-level coarse stage then token-level ITPC to the exact budget
teacher = PerplexityCompressor(sentence_filter=True, token_budget_ratio=1.0)
r = teacher.compress(text, budget=Budget(rate=0.5))
print(f"[perplexity, budget controller] rate {r.rate:.2f}, {r.details['kept_sentences']}/{r.details['sentences']} sentences\n{r.text}\n")

r = teacher.compress(text, budget=Budget(rate=0.5), query="What happens to assert statements under -O?")
print(f"[question-aware] rate {r.rate:.2f}\n{r.text}")
