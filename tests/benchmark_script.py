"""A benchmark script under benchmarks/ imported as a module, for tests of its pure parts."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py, loaded as when run: its folder on the path (the helpers it shares with the other
    benchmarks) and the module registered under its name (dataclasses look their module up by it)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop(name, None)
