"""Retrieve from a faiss index over the Python docs, compress the passages with RECOMP's
extractive compressor, and build the prompt.

    python examples/rag_compress.py "How do I leave a loop early?"
"""

from __future__ import annotations

import sys

from ctxzip.prompt import ExtractiveCompressor
from ctxzip.rag import RAGPipeline, index_documents
from ctxzip.rag.train_extractive import pydoc_documents

query = sys.argv[1] if len(sys.argv) > 1 else "How do I leave a loop early?"
docs = pydoc_documents()[:30]  # a small slice of pydoc_data.topics keeps the example quick
index = index_documents(docs, words=100)  # flat faiss index over 100-word passages
pipe = RAGPipeline(index, ExtractiveCompressor(), k=5)
out = pipe.run(query, budget=0.2)  # keep 20% of the retrieved tokens
for h in out.hits:
    print(f"retrieved {h.passage.id:<28} score {h.score:.3f}")
res = out.compression
print(f"\n{res.original_tokens} -> {res.compressed_tokens} tokens (rate {res.rate:.2f})")
for d in res.details["documents"]:
    print(f"  from {d['metadata']['id']}: sentences {d['kept_sentences']}")
print("\n--- prompt ---\n" + out.prompt)
