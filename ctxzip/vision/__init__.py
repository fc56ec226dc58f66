"""ctxzip.vision (see DESIGN.md)."""
