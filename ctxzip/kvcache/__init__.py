"""ctxzip.kvcache - KV-cache compression presses for any HF causal LM (transformers 5).

``with SnapKVPress(budget=Budget(rate=0.25))(model): model(ids, past_key_values=cache)`` leaves
the compressed context in ``cache``; decoding continues from it. See ``docs/kvcache.md``.
"""

from .base import BasePress, LayerContext, ScorerPress, attention_modules, window_queries
from .cache import (
    EvictedLayer,
    RaggedLayer,
    cache_nbytes,
    dense_cache_nbytes,
    install_ctxzip_attention,
)
from .combo import EvictThenQuantizePress
from .decoding import DecodingPress
from .ems import EMSPress, global_local_score
from .gear import GEARLayer, GEARPress
from .generate import generate, prefill
from .h2o import H2OPress
from .kivi import KIVILayer, KIVIPress
from .knorm import KNormPress
from .lowrank import LowRankLayer, LowRankPress, PCACalibration, calibrate_pca
from .observed_attention import ObservedAttentionPress, observed_attention_score
from .pyramidkv import PyramidKVPress, pyramid_budgets
from .razor import HeadSplitLayer, RazorAttentionPress, retrieval_head_scores
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress
from .tova import TOVAPress

__all__ = [
    "BasePress",
    "ScorerPress",
    "LayerContext",
    "attention_modules",
    "window_queries",
    "EvictedLayer",
    "RaggedLayer",
    "cache_nbytes",
    "dense_cache_nbytes",
    "install_ctxzip_attention",
    "StreamingLLMPress",
    "SnapKVPress",
    "H2OPress",
    "KNormPress",
    "EMSPress",
    "global_local_score",
    "GEARPress",
    "GEARLayer",
    "EvictThenQuantizePress",
    "KIVIPress",
    "KIVILayer",
    "LowRankPress",
    "LowRankLayer",
    "PCACalibration",
    "calibrate_pca",
    "DecodingPress",
    "ObservedAttentionPress",
    "observed_attention_score",
    "TOVAPress",
    "PyramidKVPress",
    "pyramid_budgets",
    "RazorAttentionPress",
    "HeadSplitLayer",
    "retrieval_head_scores",
    "generate",
    "prefill",
]
