"""Measuring a latency table: each layer signature's op at the grid widths the table lacks, and the whole
dense model once, in ONNX Runtime sessions made by `sslcompress.runtime.create_session`.

A width the graph pins (the model's input channels, its outputs, channels behind an op the analysis cannot
follow) never changes, so only its full width is measured. The table is filled in place: a second profile
of the same model measures nothing.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..finetune.structure import Layer, ModelStructure, analyze
from .key import TableKey
from .ops import op_model
from .predict import fingerprint, layers_latency
from .signature import Signature, signatures_of, width_grid
from .table import LatencyTable, ModelTiming, load_table

ROUNDS = 5  # samples per op; the median is kept
WARMUP = 3
SAMPLE_S = 0.005  # each sample repeats the op for about this long


@dataclass(frozen=True)
class ProfileEvent:
    """One measurement done (the shape BenchProgress reads: stage, message, done, total)."""

    stage: str  # "layers" | "model"
    message: str
    done: int
    total: int


ProgressSink = Callable[[ProfileEvent], None]


def load_or_new(path: str | Path, key: TableKey) -> LatencyTable:
    """The table at `path` when there is one (refused if measured for another key), else an empty one."""
    return load_table(path, key) if Path(path).is_file() else LatencyTable(key)


def _pinned(structure: ModelStructure, ids: list[int]) -> bool:
    return bool(ids) and all(structure.pin_reason(i) is not None for i in ids)


def _axes(structure: ModelStructure, layer: Layer, sig: Signature, step: int | None) -> tuple[list[int], list[int]]:
    """Input and output widths to measure for one call of a layer (a depthwise conv: input widths only)."""
    multiple = sig.groups if sig.kind == "conv" and not sig.depthwise else 1
    ins = [sig.in_full] if _pinned(structure, layer.in_ids) else width_grid(sig.in_full, step, multiple)
    if sig.depthwise:
        return ins, []
    outs = [sig.out_full] if _pinned(structure, layer.out_ids) else width_grid(sig.out_full, step, multiple)
    return ins, outs


def missing_points(table: LatencyTable, structure: ModelStructure, step: int | None = None
                   ) -> dict[Signature, list[tuple[int, int]]]:
    """Per signature, the grid points to measure. A grid stays rectangular (bilinear interpolation needs
    every corner): the widths wanted now join the widths the entry has, and every missing pair is measured."""
    wanted: dict[Signature, tuple[set[int], set[int]]] = {}
    for lay in structure.layers.values():
        for sig in signatures_of(lay):
            ins, outs = _axes(structure, lay, sig, step)
            have = wanted.setdefault(sig, (set(), set()))
            have[0].update(ins)
            have[1].update(outs)
    plan = {}
    for sig, (ins, outs) in wanted.items():
        entry = table.entries.get(sig.ident())
        points = entry.points if entry is not None else {}
        ins |= {i for i, _ in points}
        if sig.depthwise:
            pairs = [(w, w * sig.multiplier) for w in sorted(ins)]
        else:
            pairs = list(product(sorted(ins), sorted(outs | {o for _, o in points})))
        todo = [p for p in pairs if p not in points]
        if todo:
            plan[sig] = todo
    return plan


def time_session(model, x_shape: tuple[int, ...], key: TableKey, rounds: int = ROUNDS) -> float:
    """Median ms of one inference of `model` on a random input of `x_shape`, in a session of the key's
    provider and threads."""
    from ..runtime import create_session, interleaved, runner

    session = create_session(model, provider=key.provider, threads=key.threads)
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    (_, samples), = interleaved({"op": runner(session, x, key.provider)}, repeat=rounds, warmup=WARMUP,
                                sample_time=SAMPLE_S).values()
    return 1e3 * statistics.median(samples)


def time_op(sig: Signature, in_width: int, out_width: int, key: TableKey, rounds: int = ROUNDS) -> float:
    model, x_shape = op_model(sig, in_width, out_width, key.batch)
    return time_session(model, x_shape, key, rounds)


def time_model(model: nn.Module, input_shape: tuple[int, ...], key: TableKey, rounds: int = ROUNDS) -> float:
    """Median ms of the whole model, exported as `export --onnx` does (BatchNorm folded), at the key's batch."""
    from ..surgery.export import export_onnx

    training = model.training
    try:
        exported = export_onnx(model.eval(), (1, *input_shape[1:]), dynamic_batch=True).model
    finally:
        model.train(training)
    return time_session(exported, (key.batch, *input_shape[1:]), key, rounds)


def profile_model(model: nn.Module, input_shape: tuple[int, ...], key: TableKey, table: LatencyTable | None = None,
                  step: int | None = None, on_progress: ProgressSink | None = None, *, name: str | None = None,
                  rounds: int = ROUNDS, structure: ModelStructure | None = None) -> LatencyTable:
    """Measure what `table` lacks for `model` on inputs of `input_shape` (its batch is the key's) and return
    the table, filled in place (a new one without `table`): each layer signature's op on its width grid
    (`step` apart, see signature.width_grid) and, once per model, the whole dense model's latency."""
    from ..runtime import check_provider

    check_provider(key.provider)  # a missing GPU package is one sentence before any work
    if table is None:
        table = LatencyTable(key)
    elif table.key != key:
        raise ConfigError("the latency table was measured for another machine, runtime or session settings "
                          "than the key given")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    structure = structure or analyze(model, tuple(input_shape))
    plan = missing_points(table, structure, step)
    fp = fingerprint(structure)
    whole = fp not in table.models
    total = sum(len(points) for points in plan.values()) + whole
    done = 0
    for sig, points in plan.items():
        entry = table.entry(sig)
        for cin, cout in points:
            entry.points[(cin, cout)] = time_op(sig, cin, cout, key, rounds)
            done += 1
            if on_progress is not None:
                on_progress(ProfileEvent("layers", f"{sig.ident()} at {cin} -> {cout}", done, total))
    if whole:
        with torch.no_grad():
            total_ms = time_model(model, input_shape, key, rounds)
        table.models[fp] = ModelTiming(name or type(model).__name__, total_ms, layers_latency(table, structure))
        done += 1
        if on_progress is not None:
            on_progress(ProfileEvent("model", "whole dense model", done, total))
    return table
