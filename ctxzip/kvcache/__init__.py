"""ctxzip.kvcache (see DESIGN.md)."""
