"""The pure-Python reference limiter and breaker (``benchmarks/pure_python.py``).

It is the benchmark's baseline and the tests' model, kept in one copy: the
benchmarks folder is not a package, so it is loaded from its path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_reference() -> ModuleType:
    name = "tollway_pure_python_reference"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pure_python.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
