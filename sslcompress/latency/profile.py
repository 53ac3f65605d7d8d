"""Measuring a latency table: each layer signature's op at the grid widths the table lacks, and the whole
dense model once, in ONNX Runtime sessions made by `sslcompress.runtime.create_session`.

A width the graph pins (the model's input channels, its outputs, channels behind an op the analysis cannot
follow) never changes, so only its full width is measured. A conv's free input width is measured at the grid's
widths and at the off-block widths one below each multiple of 8 (signature.py says why). The table is filled in place: a second profile
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

from ..errors import ConfigError, SSLCompressError
from ..finetune.structure import Layer, ModelStructure, analyze
from .kernel import kernel_parts, net_ms, profiler_floor_ms
from .key import TableKey
from .ops import op_model
from .predict import curve_key, fingerprint, layers_parts, reorders_ms
from .signature import CHANNEL_BLOCK, Signature, below_block, off_block, signatures_of, width_grid
from .table import LatencyTable, ModelTiming, StaleTableError, WholeRun, load_table

ROUNDS = 5  # samples per op; the median is kept
WARMUP = 3
SAMPLE_S = 0.005  # each sample repeats the op for about this long
WHOLE_ROUNDS = 4  # the whole models calibrate every prediction: timed longer than one op
WHOLE_SAMPLE_S = 0.02
RANDOM_VARIANTS = 4  # random narrowings timed whole besides the uniform ones: the calibration's spread
PASSES = 3  # on the CPU, each grid point is read once per pass over the grid, the median kept (profile_model)
RANDOM_KEEP = (0.25, 0.9)  # the share of a width each keeps, drawn uniformly per width


@dataclass(frozen=True)
class ProfileEvent:
    """One measurement done (the shape BenchProgress reads: stage, message, done, total)."""

    stage: str  # "layers" | "model"
    message: str
    done: int
    total: int


ProgressSink = Callable[[ProfileEvent], None]


def load_or_new(path: str | Path, key: TableKey, on_stale: Callable[[str], None] | None = None) -> LatencyTable:
    """The table at `path` when there is one (refused if measured for another key), else an empty one. A table of
    another format version is a cache this sslcompress cannot read: an empty one replaces it once saved, and
    `on_stale` hears why."""
    if not Path(path).is_file():
        return LatencyTable(key)
    try:
        return load_table(path, key)
    except StaleTableError as exc:
        if on_stale is not None:
            on_stale(f"{exc}: measuring afresh, the new table replaces it")
        return LatencyTable(key)


def _pinned(structure: ModelStructure, ids: list[int]) -> bool:
    return bool(ids) and all(structure.pin_reason(i) is not None for i in ids)


def _axes(structure: ModelStructure, layer: Layer, sig: Signature, step: int | None, block: int
          ) -> tuple[list[int], list[int]]:
    """Input and output widths to measure for one call of a layer (a depthwise conv: input widths only)."""
    multiple = sig.groups if sig.kind == "conv" and not sig.depthwise else 1
    ins = [sig.in_full] if _pinned(structure, layer.in_ids) else width_grid(sig.in_full, step, multiple, block)
    if sig.blockable and multiple == 1 and len(ins) > 1:
        # the widths that leave ORT's blocked layout, and the widest read in place below one block (signature.py)
        ins = sorted({*ins, *off_block(ins, block), *(below_block(ins, block) if sig.groups == 1 else [])})
    if sig.depthwise:
        return ins, []
    outs = [sig.out_full] if _pinned(structure, layer.out_ids) else width_grid(sig.out_full, step, multiple, block)
    return ins, outs


def missing_points(table: LatencyTable, structure: ModelStructure, step: int | None = None
                   ) -> dict[Signature, list[tuple[int, int]]]:
    """Per signature, the grid points to measure. A grid stays rectangular (bilinear interpolation needs
    every corner): the widths wanted now join the widths the entry has, and every missing pair is measured."""
    wanted: dict[Signature, tuple[set[int], set[int]]] = {}
    for lay in structure.layers.values():
        for sig in signatures_of(lay):
            ins, outs = _axes(structure, lay, sig, step, table.key.block)
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


def time_sessions(models: dict[str, object], x_shape: tuple[int, ...], key: TableKey, rounds: int = ROUNDS,
                  sample_time: float = SAMPLE_S) -> dict[str, float]:
    """Median ms of one inference of each model on a random input of `x_shape`, in sessions of the key's
    provider and threads, timed in the same rounds (rotating order) so that the machine's drift falls on all."""
    from ..runtime import create_session, interleaved, runner

    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    runs = {n: runner(create_session(m, provider=key.provider, threads=key.threads), x, key.provider)
            for n, m in models.items()}
    raw = interleaved(runs, repeat=rounds, warmup=WARMUP, sample_time=sample_time)
    return {n: 1e3 * statistics.median(samples) for n, (_, samples) in raw.items()}


def time_session(model, x_shape: tuple[int, ...], key: TableKey, rounds: int = ROUNDS) -> float:
    """Median ms of one inference of `model` (an ONNX model) on a random input of `x_shape`."""
    return time_sessions({"op": model}, x_shape, key, rounds)["op"]


def time_op(sig: Signature, in_width: int, out_width: int, key: TableKey, rounds: int = ROUNDS,
            floor: float = 0.0, share: float = 1.0) -> float:
    """ms of the op at these widths: on the CPU its compute time inside a model (kernel.py, the profiler's
    node times less its `floor`, profiler_floor_ms), read over `share` of `rounds` x SAMPLE_S seconds;
    elsewhere one session call of it alone."""
    return time_op_parts(sig, in_width, out_width, key, rounds, floor, share)[0]


def time_op_parts(sig: Signature, in_width: int, out_width: int, key: TableKey, rounds: int = ROUNDS,
                  floor: float = 0.0, share: float = 1.0) -> tuple[float, float, float]:
    """time_op, and the ms of the ReorderInput and ReorderOutput ORT put around the op (each less the
    profiler's `floor`; 0 where there was none, and on a provider without blocks)."""
    model, x_shape = op_model(sig, in_width, out_width, key.batch)
    if key.provider != "cpu":
        return time_session(model, x_shape, key, rounds), 0.0, 0.0
    got = kernel_parts(model, x_shape, key.threads, rounds * SAMPLE_S * share, WARMUP)
    return (net_ms(got.compute, floor),
            *(net_ms(r, floor) if r > 0 else 0.0 for r in (got.reorder_in, got.reorder_out)))


def missing_curves(table: LatencyTable, structure: ModelStructure) -> list[str]:
    """The output sizes of the model's 2-D convs that the table has no reorder curve for (CPU blocks only)."""
    if table.key.provider != "cpu" or table.key.block <= 1:
        return []
    sizes = {curve_key(lay.out_hw) for lay in structure.layers.values()
             if lay.kind == "conv" and not lay.one_dimensional}
    return sorted(sizes - set(table.reorder_curves))


def time_reorder(hw: str, width: int, key: TableKey, rounds: int = ROUNDS, floor: float = 0.0,
                 share: float = 1.0) -> float:
    """ms of the ReorderOutput of `width` channels of size `hw` ("32x32"), less the profiler's `floor`: read
    after a 1x1 conv of 8 inputs (narrower than any block, so ORT runs it blocked on its plain input)."""
    h, w = (int(v) for v in hw.split("x"))
    return time_op_parts(Signature("conv", width, 8, in_hw=(h, w)), 8, width, key, rounds, floor, share)[2]


def _exported(model: nn.Module, input_shape: tuple[int, ...]):
    """The model exported as `export --onnx` does (BatchNorm folded), batch dynamic."""
    from ..surgery.export import export_onnx

    training = model.training
    try:
        return export_onnx(model.eval(), (1, *input_shape[1:]), dynamic_batch=True).model
    finally:
        model.train(training)


def _narrowed(model: nn.Module, input_shape: tuple[int, ...], structure: ModelStructure,
              keep: Callable[[int], int]) -> nn.Module | None:
    """A copy of `model` whose every free width (the channels a set of layers writes, coupled through residual
    adds) keeps `keep(width)` channels, the others' filter groups zeroed; None where no width is free."""
    import copy

    from ..finetune.groups import build_groups

    groups = {g.channel: g for g in build_groups(model, input_shape, ("filter",), structure) if g.removable}
    widths = {}
    for lay in structure.layers.values():
        roots = tuple(dict.fromkeys(structure.root(i) for i in lay.out_ids))
        if len(roots) > 1 and all(r in groups for r in roots):
            widths.setdefault(roots, [groups[r] for r in roots[keep(len(roots)):]])
    slices = [s for gone in widths.values() for g in gone for s in g.slices]
    if not slices or any(s.axis not in ("out", "in") for s in slices):
        return None
    variant = copy.deepcopy(model).eval()
    params = dict(variant.named_parameters())
    with torch.no_grad():
        for s in slices:
            params[s.param].index_fill_(0 if s.axis == "out" else 1, torch.tensor(list(s.index)), 0.0)
    return variant


def _aligned(width: float, block: int) -> int:
    """A width rounded to a multiple of the channel block where it holds one (so it stays blocked)."""
    if block > 1 and width >= block:
        return max(block, block * round(width / block))
    return max(1, int(width))


def off_block_variant(model: nn.Module, input_shape: tuple[int, ...], structure: ModelStructure) -> nn.Module | None:
    """Every free width one channel narrower: the convs reading them leave ORT's blocked layout."""
    return _narrowed(model, input_shape, structure, lambda w: w - 1)


def half_variant(model: nn.Module, input_shape: tuple[int, ...], structure: ModelStructure,
                 block: int = CHANNEL_BLOCK) -> nn.Module | None:
    """Every free width halved (blocked where it was): a model whose layers cost far less, the fixed costs
    between them the same."""
    return _narrowed(model, input_shape, structure,
                     lambda w: _aligned(w / 2, block) if w >= 2 * block else max(1, w // 2))


def random_variant(model: nn.Module, input_shape: tuple[int, ...], structure: ModelStructure, seed: int,
                   block: int = CHANNEL_BLOCK, aligned: bool = False,
                   share: tuple[float, float] = RANDOM_KEEP) -> nn.Module | None:
    """Every free width keeping a random share of its channels (uniform in `share`), drawn per width, rounded
    to the block with `aligned`: a model like the ones a pruning leaves, its blocked and plain convs mixed, and
    the layout changes between them that neither the ops alone nor the uniform variants show."""
    rng = np.random.default_rng(seed)

    def keep(w: int) -> int:
        k = max(1, round(w * rng.uniform(*share)))
        return min(w, _aligned(k, block)) if aligned else k

    return _narrowed(model, input_shape, structure, keep)


def calibration_variants(model: nn.Module, input_shape: tuple[int, ...], structure: ModelStructure,
                         block: int = CHANNEL_BLOCK) -> dict[str, nn.Module]:
    """The narrowed models timed whole beside the dense one (see predict.py): off-block, half, and
    RANDOM_VARIANTS random ones, every other one aligned to the block."""
    made = {"off-block": off_block_variant(model, input_shape, structure),
            "half": half_variant(model, input_shape, structure, block)}
    for i in range(RANDOM_VARIANTS):
        aligned = block > 1 and i % 2 == 1
        made[f"random-{'aligned-' if aligned else ''}{i + 1}"] = random_variant(
            model, input_shape, structure, seed=i, block=block, aligned=aligned)
    return {label: v for label, v in made.items() if v is not None}


def _cut(variant: nn.Module, input_shape: tuple[int, ...]):
    """The variant exported and cut by the surgery; None where the surgery cannot cut or verify it (the
    calibration then does without it: predict.py)."""
    from ..surgery.compress import compress

    try:
        result = compress(_exported(variant, input_shape), shape_lowering="off")
    except SSLCompressError:
        return None
    return result.model if result.verification.passed else None


def time_whole_models(model: nn.Module, input_shape: tuple[int, ...], key: TableKey, table: LatencyTable,
                      structure: ModelStructure, name: str, rounds: int = ROUNDS) -> ModelTiming:
    """The dense model and its narrowed variants (calibration_variants) timed whole, in the same rounds
    (WHOLE_ROUNDS x `rounds`: they are measured once and calibrate every prediction), beside their layers'
    table sums."""
    from ..finetune.counting import Counter

    with torch.no_grad():
        variants = {"dense": model, **calibration_variants(model, input_shape, structure, key.block)}
        onnx_models = {"dense": _exported(model, input_shape)}
        for label, variant in list(variants.items())[1:]:
            cut = _cut(variant, input_shape)
            if cut is None:
                del variants[label]
            else:
                onnx_models[label] = cut
        totals = time_sessions(onnx_models, (key.batch, *input_shape[1:]), key, WHOLE_ROUNDS * rounds,
                               WHOLE_SAMPLE_S)
    runs = []
    for label, variant in variants.items():
        count = None if label == "dense" else Counter(variant, input_shape, structure).count()
        runs.append(WholeRun(label, totals[label], *layers_parts(table, structure, count),
                             reorders_ms(table, structure, count)))
    return ModelTiming(name, runs)


def profile_model(model: nn.Module, input_shape: tuple[int, ...], key: TableKey, table: LatencyTable | None = None,
                  step: int | None = None, on_progress: ProgressSink | None = None, *, name: str | None = None,
                  rounds: int = ROUNDS, structure: ModelStructure | None = None) -> LatencyTable:
    """Measure what `table` lacks for `model` on inputs of `input_shape` (its batch is the key's) and return
    the table, filled in place (a new one without `table`): each layer signature's op on its width grid
    (`step` apart, see signature.width_grid) and, once per model, the whole dense model and two narrowed
    variants (the calibration, predict.py)."""
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
    passes = PASSES if key.provider == "cpu" else 1
    curves = missing_curves(table, structure)
    curve_readings: dict[tuple[str, int], list[float]] = {}
    total = passes * (sum(len(points) for points in plan.values()) + len(curves) * (key.block + 1)) + whole
    done = 0
    floor = profiler_floor_ms(key.threads) if (plan or curves) and key.provider == "cpu" else 0.0
    # Each point is read in `passes` passes over the whole grid, a share of its time in each, and the median
    # kept: on a shared machine one window of a few ms can run 2-3x slow (a neighbour's memory traffic), and
    # a point read in one window alone took that into the table (two profiles one minute apart differed by
    # a median 20% per point, 2-3x at the tenth worst, where the whole models agreed within 2%).
    readings: dict[tuple[Signature, int, int], list[tuple[float, float, float]]] = {}
    for _ in range(passes):
        for sig, points in plan.items():
            for cin, cout in points:
                readings.setdefault((sig, cin, cout), []).append(
                    time_op_parts(sig, cin, cout, key, rounds, floor, share=1 / passes))
                done += 1
                if on_progress is not None:
                    on_progress(ProfileEvent("layers", f"{sig.ident()} at {cin} -> {cout}", done, total))
    for hw in curves:
        for w in range(1, key.block + 2):
            for _ in range(passes):
                curve_readings.setdefault((hw, w), []).append(time_reorder(hw, w, key, rounds, floor, 1 / passes))
                done += 1
                if on_progress is not None:
                    on_progress(ProfileEvent("layers", f"a reorder of {w} channels at {hw}", done, total))
    for (hw, w), values in curve_readings.items():
        table.reorder_curves.setdefault(hw, {})[w] = statistics.median(values)
    for (sig, cin, cout), values in readings.items():
        ms, reorder_in, reorder_out = (statistics.median(v) for v in zip(*values, strict=True))
        table.entry(sig).points[(cin, cout)] = ms
        table.entry(sig).reorders[(cin, cout)] = (reorder_in, reorder_out)
    if whole:
        table.models[fp] = time_whole_models(model, input_shape, key, table, structure,
                                             name or type(model).__name__, rounds)
        done += 1
        if on_progress is not None:
            on_progress(ProfileEvent("model", "the whole dense model and its narrowed variants", done, total))
    return table
