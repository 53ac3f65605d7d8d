"""The pass that lowers a column-sparse Conv to an explicit im2col of its kept columns and a MatMul.

Viewed as a GEMM, a Conv multiplies its weight W (M filters x C*kh*kw columns) by the im2col
matrix of its input. A column of W that is zero in every filter (one channel at one kernel
offset) multiplies its im2col row by nothing, so only kept rows need building: Pad once, then
per kernel offset a strided Slice of the padded input and a Gather of the channels kept there,
Concat, and one MatMul with the compact (M, K) weight. This computes the same output exactly
(the same products, summed in another order). ORT has no sparse Conv, so this is the only way
irregular filter-shape sparsity can pay on a CPU, and it pays only at high sparsity.

Which candidates to lower is decided without looking at the clock unless asked to:

- ``predict`` (the default): where the column sparsity is at least ``threshold`` (0.75). In
  shared/reference/ort-cpu-facts.md the lowered form beat dense only above about 25% column
  sparsity for 256 channels at 14x14, 41-57% for 64 channels at 56x56 and 74% on 2 threads at
  batch 8 (and reached at most 0.45 of ideal at 90%); 75% is past all of those.
- ``on`` / ``off``: every candidate / none.
- ``auto``: time each candidate alone in ORT, once, and lower where it measured ``margin``
  faster. The result then depends on the machine and its load, so it is recorded as a plan.
- a plan: every mode records one (the candidates' output value names, each with lowered or not,
  ``LoweringResult.plan`` and ``report()["plan"]``); ``plan=`` replays those decisions exactly,
  without timing, so an ``auto`` measured once gives the same model every time after.

The pass works on an ``onnx_ir`` model in place (``lower_sparse_columns_ir``); ``lower_sparse_columns``
wraps it for an ``onnx.ModelProto``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import ConfigError
from .im2col import Candidate, find_candidates, model_opset, replace_conv, single_op_model
from .ops.base import drop_unused_constants

log = logging.getLogger(__name__)

MODES = ("off", "on", "predict", "auto")
DEFAULT_MODE = "predict"
PLAN = "plan"  # the mode a replayed plan reports
DEFAULT_THRESHOLD = 0.75
PROVIDERS = ("cpu", "cuda")

Plan = Mapping[str, bool]  # conv output value name -> lowered, in the graph's order


@dataclass(frozen=True)
class LoweringDecision:
    """One candidate Conv: lowered or not, and why. Times are best-of-samples ms, None unless measured."""

    name: str  # the node's name, else its output's: what the report's layer rows call it
    output: str  # the Conv's output value name: the plan's key
    lowered: bool
    column_sparsity: float  # zero columns / all columns of the lowered weight
    columns: tuple[int, int]  # (kept, total)
    macs: tuple[int, int]  # per sample: the dense Conv's, the lowered MatMul's
    dense_ms: float | None
    lowered_ms: float | None
    reason: str


@dataclass(frozen=True)
class LoweringResult:
    model: onnx.ModelProto | ir.Model  # the type it was given; an ir.Model is the same object, changed in place
    mode: str  # off, on, predict, auto or plan (a replayed plan)
    decisions: tuple[LoweringDecision, ...]
    threshold: float | None = None  # predict's column sparsity threshold

    @property
    def lowered(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.decisions if d.lowered)

    @property
    def plan(self) -> tuple[tuple[str, bool], ...]:
        """(conv output value name, lowered) for every candidate: replayed by ``plan=``."""
        return tuple((d.output, d.lowered) for d in self.decisions)

    def report(self) -> dict[str, Any]:
        return {"mode": self.mode, "threshold": self.threshold, "plan": [list(p) for p in self.plan],
                "convs": [{**asdict(d), "columns": list(d.columns), "macs": list(d.macs)} for d in self.decisions]}


# ---------------------------------------------------------------- entry points
def lower_sparse_columns(proto: onnx.ModelProto, mode: str | Plan | Sequence | None = None,
                         **options: Any) -> LoweringResult:
    """``lower_sparse_columns_ir`` (same options) on a ModelProto: the same proto back where nothing
    was lowered."""
    model = ir.serde.deserialize_model(proto)
    res = lower_sparse_columns_ir(model, mode, **options)
    out = ir.serde.serialize_model(model) if res.lowered else proto
    return LoweringResult(out, res.mode, res.decisions, res.threshold)


def lower_sparse_columns_ir(
    model: ir.Model,
    mode: str | Plan | Sequence | None = None,
    *,
    plan: Plan | Sequence | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    provider: str = "cpu",
    threads: int = 1,
    margin: float = 0.2,
    min_sparsity: float = 0.2,
    per_conv_s: float = 0.03,
    budget_s: float = 2.0,
    keep_zero_channels: bool = False,
) -> LoweringResult:
    """Lower candidate Convs of ``model`` in place, as ``mode`` or a replayed ``plan`` decides.

    ``mode``: off, on, predict (default: column sparsity >= ``threshold``) or auto; a plan may be given
    as ``plan=`` or in place of the mode (a mapping of conv output names to lowered, a list of such
    pairs, or a report holding one), never together with a mode. ``auto`` times only candidates with
    at least ``min_sparsity`` zero columns, each for about ``per_conv_s`` after warm-up on ``provider``
    with ``threads``, leaves the rest dense once ``budget_s`` is spent, and lowers where the lowered
    form took at most ``1 - margin`` of the dense time. Each candidate is timed alone, so the dense Conv
    pays ORT's NCHWc layout reorders that a chain of convs shares, and the lowered one not those it
    forces on its neighbours: about 10% of a 3x3 conv's time each way in our measurements, hence 20%.
    A model without candidates costs one scan of its Conv weights. ``keep_zero_channels`` leaves input
    channels whose every column is zero to the conv (an aligned cut kept them; im2col.find_candidates).
    """
    if mode is not None and not isinstance(mode, str):
        if plan is not None:
            raise ConfigError("Give a shape lowering plan once, as the mode or as plan=, not both.")
        mode, plan = None, mode
    if plan is not None:
        if mode not in (None, PLAN):
            raise ConfigError(f"Give a shape lowering mode or a plan to replay, not both (mode {mode!r}).")
        mode, wanted = PLAN, normalize_plan(plan)
    else:
        mode, wanted = mode or DEFAULT_MODE, {}
        if mode not in MODES:
            raise ConfigError(f"Shape lowering mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if provider not in PROVIDERS:
        raise ConfigError(f"Shape lowering provider must be one of {', '.join(PROVIDERS)}, got {provider!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 < threshold <= 1.0:
        raise ConfigError(f"The shape lowering threshold is a column sparsity in (0, 1], got {threshold!r}.")
    if mode == "auto":
        from ..runtime.providers import check_provider

        check_provider(provider)
    kept_threshold = float(threshold) if mode == "predict" else None
    if mode == "off":
        return LoweringResult(model, mode, ())
    candidates = find_candidates(model, keep_zero_channels) if model.graph is not None else []
    if mode == PLAN:
        _check_plan(model, candidates, wanted)
    if not candidates:
        return LoweringResult(model, mode, (), kept_threshold)
    decisions = _decide(model, candidates, mode, wanted, threshold=float(threshold), provider=provider,
                        threads=threads, margin=margin, min_sparsity=min_sparsity, per_conv_s=per_conv_s,
                        budget_s=budget_s)
    chosen = {c.output for c, d in zip(candidates, decisions, strict=True) if d.lowered}
    if chosen:
        _apply(model.graph, candidates, chosen)
    return LoweringResult(model, mode, tuple(decisions), kept_threshold)


# ---------------------------------------------------------------- plans
def normalize_plan(plan: Any) -> dict[str, bool]:
    """{conv output name: lowered} from a mapping, a list of pairs or {"output", "lowered"} entries, or a
    report that holds a plan (a lowering report, or a surgery report with "shape_lowering")."""
    if isinstance(plan, Mapping) and "shape_lowering" in plan:
        plan = plan["shape_lowering"]
        if not isinstance(plan, Mapping) or "plan" not in plan:
            raise ConfigError("The report's \"shape_lowering\" holds no \"plan\" to replay (a report from an "
                              "older sslcompress?); run the surgery again to make one.")
    if isinstance(plan, Mapping) and "plan" in plan and not isinstance(plan.get("plan"), bool):
        plan = plan["plan"]
    pairs: list[tuple[Any, Any]] = []
    if isinstance(plan, Mapping):
        pairs = list(plan.items())
    elif isinstance(plan, Sequence) and not isinstance(plan, str | bytes):
        for entry in plan:
            if isinstance(entry, Mapping) and {"output", "lowered"} <= set(entry):
                pairs.append((entry["output"], entry["lowered"]))
            elif isinstance(entry, Sequence) and not isinstance(entry, str | bytes) and len(entry) == 2:
                pairs.append((entry[0], entry[1]))
            else:
                raise ConfigError(f"A shape lowering plan entry is a pair [conv output name, lowered], got {entry!r}.")
    else:
        raise ConfigError("A shape lowering plan is a mapping of conv output names to true/false, a list of such "
                          f"pairs, or a report holding one, not a {type(plan).__name__}.")
    out: dict[str, bool] = {}
    for name, lowered in pairs:
        if not isinstance(name, str) or not isinstance(lowered, bool):
            raise ConfigError(f"A shape lowering plan entry is a pair [conv output name, true or false], got "
                              f"[{name!r}, {lowered!r}].")
        if name in out and out[name] != lowered:
            raise ConfigError(f"The shape lowering plan names the conv output {name!r} twice, once lowered and once "
                              "not.")
        out[name] = lowered
    return out


def read_plan(path: str | Path) -> dict[str, bool]:
    """The plan of an earlier surgery report (JSON: "shape_lowering" -> "plan"), or of a plan file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"The lowering plan file {path} does not exist.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"The lowering plan file {path} is not a readable JSON report ({exc}).") from exc
    if isinstance(data, Mapping) and "shape_lowering" not in data and "plan" not in data:
        raise ConfigError(f"The lowering plan file {path} holds no \"shape_lowering\" -> \"plan\"; give the JSON "
                          "report of an earlier surgery (--report).")
    return normalize_plan(data)


def _check_plan(model: ir.Model, candidates: list[Candidate], wanted: dict[str, bool]) -> None:
    names = {c.output for c in candidates}
    for output in wanted:
        if output in names:
            continue
        convs = {n.outputs[0].name for n in model.graph if n.op_type == "Conv" and n.outputs}
        if output in convs:
            raise ConfigError(f"The shape lowering plan names the conv output {output!r}, which is no longer a "
                              "candidate for lowering (its weight has no irregular zero columns left, or its shapes "
                              "changed); make the plan again on this model.")
        raise ConfigError(f"The shape lowering plan names the conv output {output!r}, which this model does not have;"
                          " was the plan made for another model?")


def _decide(model: ir.Model, candidates: list[Candidate], mode: str, wanted: dict[str, bool], *,
            threshold: float, provider: str, threads: int, margin: float, min_sparsity: float, per_conv_s: float,
            budget_s: float) -> list[LoweringDecision]:
    decisions = []
    t_end = time.perf_counter() + budget_s
    opset = model_opset(model)
    for cand in candidates:
        if mode == "on":
            decisions.append(_decision(cand, True, "mode on"))
        elif mode == PLAN:
            if cand.output in wanted:
                decisions.append(_decision(cand, wanted[cand.output], "the plan"))
            else:
                decisions.append(_decision(cand, False, "not in the plan"))
        elif mode == "predict":
            above = cand.sparsity >= threshold
            decisions.append(_decision(cand, above, f"{cand.sparsity:.0%} zero columns, "
                                       f"{'at least' if above else 'under'} the {threshold:.0%} threshold"))
        elif cand.sparsity < min_sparsity:
            decisions.append(_decision(cand, False, f"under {min_sparsity:.0%} zero columns, not timed"))
        elif time.perf_counter() > t_end:
            decisions.append(_decision(cand, False, "time budget spent, not timed"))
        else:
            t = time_candidate(cand, opset, model.ir_version, provider=provider, threads=threads, seconds=per_conv_s)
            decisions.append(_decision(cand, t.ratio <= 1.0 - margin,
                                       f"{t.ratio:.2f}x the dense time, best of {t.samples}",
                                       t.dense_ms, t.lowered_ms))
    return decisions


def _decision(cand: Candidate, lowered: bool, reason: str, dense_ms: float | None = None,
              lowered_ms: float | None = None) -> LoweringDecision:
    columns = (int(cand.keep.sum()), int(cand.keep.size))
    return LoweringDecision(cand.name, cand.output, lowered, cand.sparsity, columns, cand.macs, dense_ms,
                            lowered_ms, reason)


def _apply(graph: ir.Graph, candidates: list[Candidate], chosen: set[str]) -> None:
    by_output = {c.output: c for c in candidates}
    names = [c.name for c in candidates]
    for node in list(graph):
        if node.op_type == "Conv" and node.outputs and node.outputs[0].name in chosen:
            cand = by_output[node.outputs[0].name]
            # New value names start with the node's name; an output name is unique where node names are not.
            replace_conv(graph, node, cand, cand.name if names.count(cand.name) == 1 else cand.output)
    drop_unused_constants(graph)


@dataclass(frozen=True)
class CandidateTiming:
    """Best of ``samples`` interleaved samples each: on a loaded machine the median of a few runs swung
    0.3x-2.8x between repeats of one measurement, the best times' ratio stayed within about +-0.05."""

    dense_ms: float
    lowered_ms: float
    samples: int

    @property
    def ratio(self) -> float:
        return self.lowered_ms / self.dense_ms


def time_candidate(cand: Candidate, opset: int, ir_version: int, *, provider: str = "cpu", threads: int = 1,
                   seconds: float = 0.03) -> CandidateTiming:
    """The dense Conv alone against its lowered subgraph alone, in the runtime's interleaved rounds."""
    from ..runtime.binding import runner
    from ..runtime.sessions import create_session
    from ..runtime.timing import interleaved

    shape = (1 if not isinstance(cand.input_shape[0], int) else cand.input_shape[0], *cand.input_shape[1:])
    x = np.random.default_rng(0).standard_normal(shape).astype(cand.weight.dtype)
    runs = {}
    for name, lowered in (("dense", False), ("lowered", True)):
        session = create_session(single_op_model(cand, opset, ir_version, lowered), provider=provider,
                                 threads=threads)
        runs[name] = runner(session, x, provider)
    # Samples of single calls (grouped only below 0.1 ms), at least 5 rounds and on for `seconds`.
    raw = interleaved(runs, repeat=None, min_time=seconds, warmup=2, sample_time=1e-4)
    (_, dense), (_, low) = raw["dense"], raw["lowered"]
    timing = CandidateTiming(1e3 * min(dense), 1e3 * min(low), len(dense))
    log.debug("%s: %s, medians %.3f and %.3f ms", cand.name, timing, 1e3 * float(np.median(dense)),
              1e3 * float(np.median(low)))
    return timing
