"""Compress a long Python module for one task with LongCodeZip (CodeCompressor).

Runs offline with the packaged SmolLM2 (first run converts it, ~30 s):

    python examples/code_compression.py
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from ctxzip.budget import Budget
from ctxzip.prompt import CodeCompressor

# a real module from the standard library, and an instruction: write `dedent`
code = Path(textwrap.__file__).read_text()
query = 'def dedent(text):\n    """Remove any common leading whitespace from every line in `text`."""'

cc = CodeCompressor()  # default: SmolLM2-135M-Instruct, fine_ratio=0.8, beta=0.5
result = cc.compress(code, query=query, budget=Budget(rate=0.25))  # keep 1/4 of the tokens

print(result.text)
print(f"\n{result.original_tokens} -> {result.compressed_tokens} tokens "
      f"({result.ratio:.1f}x, rate {result.rate:.2f}) in {result.timings['total']:.1f}s")

# the coarse ranking: which functions help most with the instruction
names = [r[3] or r[2] for r in result.details["chunk_ranges"]]
top = result.details["ranking"][:5]
print("top chunks by AMI:", [(names[i], round(result.details["chunk_scores"][i], 2)) for i in top])

# coarse stage only (whole functions), reusing the same ranking pass
whole = cc.compress(code, query=query, budget=Budget(rate=0.25), rank_only=True)
print(f"rank-only: {whole.compressed_tokens} tokens, {len(whole.details['coarse_kept'])} chunks")
