"""ctxzip.kernels (see DESIGN.md)."""
