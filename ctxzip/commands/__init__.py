"""Subcommand groups of the ``ctxzip`` CLI: one module each, exposing ``register(subparsers)``."""
