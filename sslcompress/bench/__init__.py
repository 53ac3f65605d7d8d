"""Stage 3: timing dense, unstructured-sparse and structured-sparse forms of one model (and, with --int8, the
dense and the structured model quantized to INT8).

    run_bench(BenchConfig(target="runs/lenet5-digits"))  -> BenchResult (to_dict/from_dict, JSON)
    render_markdown(result), plot(result, "bench.png")
    build_variants(target, dense=..., unstructured=..., structured=...)  -> VariantSet
    magnitude_match(dense_proto, structured_proto)  the unstructured variant
    study_model(dense, unstructured, structured)    the per-layer GEMM study on a model's convs
    paper_table("alexnet")                          the paper's Table 4 on this CPU

Modules: variants (the models, in an ordered VariantSet), int8 (the INT8 variants, how the speed-ups
compound), sessions (ORT settings, I/O binding), timing (interleaved rounds,
statistics), memory (peak RSS in a process of its own), accuracy, modelstudy and paper (per-layer GEMM
studies on top of layers/gemm/table4), results, report (tables, Markdown), plot, run (the whole run).
Names load lazily: `benchmarks/paper_table4.py` imports `sslcompress.bench.layers` with torch and numpy alone.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BenchConfig": "config",
    "BenchEvent": "run",
    "run_bench": "run",
    "check_config": "run",
    "BenchResult": "results",
    "VariantInfo": "results",
    "UNSTRUCTURED_NOTE": "results",
    "Timing": "timing",
    "MemoryUse": "memory",
    "LayerStudy": "modelstudy",
    "study_model": "modelstudy",
    "PaperTable": "paper",
    "paper_table": "paper",
    "render_markdown": "report",
    "plot": "plot",
    "PlotUnavailableError": "plot",
    "ProviderUnavailableError": "sessions",
    "Variant": "variants",
    "VariantSet": "variants",
    "LayerNonzeros": "variants",
    "build_variants": "variants",
    "magnitude_match": "variants",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
