"""ctxzip.datasel: select pretraining / fine-tuning data under a global budget.

- :class:`ZipFit` -- compression-based alignment to a target set (ZIP-FIT, arXiv 2410.18194).
- :mod:`~ctxzip.datasel.preselect` -- PreSelect (arXiv 2503.00808): per-document BPC under a
  model ladder, predictive strength, fastText classifier; :class:`LossScorer` the cheap variant.
- :func:`select` -- score in shards (local process pool or Ray Data), then keep a fraction, a
  document count or a token budget computed exactly over the whole corpus.
"""

from ctxzip.datasel.bpc import LossScorer, document_bpc, document_nll, truncate_layers
from ctxzip.datasel.codecs import Codec, get_codec
from ctxzip.datasel.engines import LocalEngine, RayEngine, get_engine, map_scores
from ctxzip.datasel.io import Record, ShardSpec, TextLength, iter_records, plan_shards, read_shard
from ctxzip.datasel.preselect import (
    FastTextScorer,
    LadderModel,
    PreSelect,
    balanced_labels,
    predictive_strength,
    train_fasttext,
)
from ctxzip.datasel.race import RaceResult, ZipFitRace
from ctxzip.datasel.select import SelectionSummary, decide, load_scores, select
from ctxzip.datasel.zipfit import ZipFit, ncd

__all__ = [
    "ZipFit",
    "ZipFitRace",
    "RaceResult",
    "ncd",
    "Codec",
    "get_codec",
    "PreSelect",
    "LadderModel",
    "FastTextScorer",
    "LossScorer",
    "predictive_strength",
    "balanced_labels",
    "train_fasttext",
    "document_bpc",
    "document_nll",
    "truncate_layers",
    "select",
    "decide",
    "load_scores",
    "SelectionSummary",
    "LocalEngine",
    "RayEngine",
    "get_engine",
    "map_scores",
    "Record",
    "ShardSpec",
    "TextLength",
    "iter_records",
    "plan_shards",
    "read_shard",
]
