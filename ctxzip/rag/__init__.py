"""ctxzip.rag (see DESIGN.md)."""
