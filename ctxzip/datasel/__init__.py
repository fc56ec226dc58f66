"""ctxzip.datasel (see DESIGN.md)."""
