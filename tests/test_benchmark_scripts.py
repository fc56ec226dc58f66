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
