"""Benchmark scripts run as ``python benchmarks/NAME.py``, which puts ``benchmarks/`` first on
``sys.path``: a script named like an installed module hides it from everything the script
imports. (``benchmarks/kernels.py`` once hid the ``kernels`` package that ``transformers``
imports on load, and every benchmark that loaded a BERT model failed.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_benchmark_scripts_do_not_shadow_installed_modules():
    clashes = []
    for script in sorted(BENCH.glob("*.py")):
        name = script.stem
        if name in sys.stdlib_module_names:
            clashes.append(f"{script.name} (standard library)")
            continue
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and Path(spec.origin).resolve().parent != BENCH:
            clashes.append(f"{script.name} ({spec.origin})")
    assert not clashes, f"benchmark scripts named like installed modules: {clashes}"


def test_fast_bound_mac_counts_match_torch_flop_counter():
    """``benchmarks/prompt_fast_bound.py`` turns operator times into rates with MACs per token
    from the config; torch's own FLOP counter on the shipped classifier must agree."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ctxzip.prompt.distill import load_default_classifier

    spec = importlib.util.spec_from_file_location("prompt_fast_bound", BENCH / "prompt_fast_bound.py")
    bound = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bound)
    model, _ = load_default_classifier()
    model.set_attn_implementation("eager")  # explicit score/value products for the counter
    n = 48
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=torch.randint(1000, 2000, (1, n)))
    counts = fc.get_flop_counts()["Global"]
    aten = torch.ops.aten
    linear = sum(v for k, v in counts.items() if k in (aten.addmm, aten.mm)) / 2 / n
    attention = sum(v for k, v in counts.items() if k not in (aten.addmm, aten.mm)) / 2 / n
    macs = bound.macs_per_token(model.config, n)
    head = model.config.hidden_size * model.config.num_labels
    assert linear == macs["linear"] + head
    assert attention == macs["attention"]
    assert bound.op_class("DynamicQuantizeMatMul") == "linear"
    assert bound.op_class("MultiHeadAttention") == "attention"
    assert bound.op_class("LayerNormalization") == "other"
