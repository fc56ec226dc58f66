"""Visual-token pruning and merging for Hugging Face vision-language models.

``from ctxzip.vision import prune``; ``prune(model, method="visionzip", budget=Budget(tokens=64))``.
Methods (one file each): ``fastv``, ``visionzip``, ``tome``, ``prumerge``, ``globalcom2``,
``correlation``. See ``docs/vision.md``.
"""

from .base import (
    METHODS,
    ImageTokens,
    ViewResult,
    ViewTokens,
    VisualTokenMethod,
    get_method,
    register_method,
)
from .correlation import CorrelationGuided
from .fastv import FastV
from .globalcom2 import GlobalCom2
from .prumerge import PruMerge
from .tome import ToMe
from .visionzip import VisionZip
from .wrappers import VisionPruner, prune, supported_family, unprune

__all__ = [
    "prune",
    "unprune",
    "VisionPruner",
    "supported_family",
    "METHODS",
    "get_method",
    "register_method",
    "VisualTokenMethod",
    "ViewTokens",
    "ViewResult",
    "ImageTokens",
    "FastV",
    "VisionZip",
    "ToMe",
    "PruMerge",
    "GlobalCom2",
    "CorrelationGuided",
]
