"""Run two models on the same inputs and compare: a rewritten model is never trusted unchecked.

The criterion holds each output on its own scale, ``max |a - b| <= rtol * max |a|``, so float
rounding from a reordered sum passes while any real change of the function fails; a NaN or
infinity where the other model has none counts as an infinite difference.

The tolerance ``rtol`` depends on the output's dtype (:func:`output_rtol`), never loosened for
float32: float32 and float64 outputs are held to ``rtol_of_max`` (1e-4 by default, about 840 units
of float32 rounding); float16 outputs to ``max(rtol_of_max, 2**-9)`` (see FP16_RTOL); integer and
bool outputs must match exactly.

Selections (TopK, NonMaxSuppression, ArgMax, ArgMin) are compared up to ties. Their inputs may agree
to 3e-8 and still reorder entries whose scores are tied, which changes every value that carries the
selected indices (a Gather of boxes, a Cast, a Concat of detections) without any fault. So, for a
top-level selection node the candidate shares with the reference (same op type, same output names):

1. the selection's inputs must agree by the criterion above (they are exposed as extra outputs);
2. the candidate's selection must equal the reference's up to ties: selected values agree position
   by position (as sorted multisets when TopK's ``sorted`` is 0), and a selected index may differ
   from the reference's only where the reference's scores at both indices are equal within the
   criterion (the score input's dtype and scale); indices must be in range and, for TopK and per
   (batch, class) for NonMaxSuppression, distinct; a NonMaxSuppression must select as many boxes per
   (batch, class) as the reference, compared in its (descending score) order;
3. every graph output is compared as above, the candidate's as it runs against the reference's
   with the candidate's selection pinned: the reference runs with each selection's outputs taken
   from the candidate, so whatever follows a selection (index-preserving or not: a Gather of boxes,
   a Cast, a Concat) is compared position by position on the same selection, and the candidate's
   own outputs are the ones checked.

The reference's selection nodes still run in that pinned copy, on inputs computed from the same
earlier selections, so chained selections line up too. A genuinely different selection fails at
step 2, a changed score or box at step 1, a changed computation after the selection at step 3.
When a probing copy cannot be built or loaded, the plain comparison is used (strict: ties then
count as differences). Selections inside subgraphs (If, Loop) are not pinned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ..errors import UnsupportedModelError, VerificationError
from ..runtime import create_session
from ..runtime.pinning import usable_cpus
from .inputs import Feed, FeedLike, as_feed, as_feeds, describe_inputs, random_array, random_batches

Runner = Callable[[Any], list[np.ndarray]]

# float16 has a unit roundoff of 2**-11 and a spacing (epsilon) of 2**-10 ~ 9.8e-4 relative to a
# value. Two models that compute the same function round their outputs independently, so near max|a|
# they differ by up to one spacing (2**-10 of max|a|); an fp16 graph also rounds every intermediate
# tensor, and a reordered or folded computation (what surgery writes) moves those roundings, worth
# about one more spacing. Hence two spacings, 2**-9 ~ 1.95e-3 of max|a|. A real change of the
# function (a changed weight, a dropped live channel) moves outputs by far more. float32 and float64
# keep rtol_of_max: their rounding (1e-7, 1e-16) is far below it.
FP16_RTOL = 2.0**-9

SELECTION_OPS = frozenset({"TopK", "NonMaxSuppression", "ArgMax", "ArgMin"})


def output_rtol(dtype: Any, rtol_of_max: float) -> float:
    """The relative tolerance for an output of ``dtype``: 0 (exact) for integers and bools."""
    dtype = np.dtype(dtype)
    if dtype.kind in "biu":
        return 0.0
    if dtype == np.float16:
        return max(rtol_of_max, FP16_RTOL)
    return rtol_of_max


@dataclass(frozen=True)
class VerifyResult:
    """How far a candidate's outputs are from the reference's, over ``n_inputs`` inputs.

    ``max_abs``, ``max_ref`` and ``rel`` belong to the output furthest past its tolerance (``where``
    names it, ``rtol`` is its tolerance). ``top1_agreement`` is the fraction of rows whose argmax
    agrees, for a 2-D float first output; None otherwise.
    """

    max_abs: float
    max_ref: float
    rel: float
    top1_agreement: float | None
    passed: bool
    n_inputs: int
    where: str | None = None
    rtol: float | None = None


# Verification checks values, not speed: it may use the cores it has (a few; more gain little at the
# batch sizes it runs). Sums in another order stay within the criterion, which is float rounding.
VERIFY_THREADS = max(1, min(4, len(usable_cpus()) or 1))


def _session(model: onnx.ModelProto, optimization: str = "all"):
    """A CPU session (UnsupportedModelError when ORT cannot load the model)."""
    return create_session(model, provider="cpu", threads=VERIFY_THREADS, optimization=optimization)


def _run(session, feed: Feed) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        return {n: np.asarray(v) for n, v in zip(names, session.run(None, feed))}
    except Exception as exc:
        shapes = ", ".join(f"{k} {v.dtype.name}[{'x'.join(map(str, v.shape))}]" for k, v in feed.items())
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise VerificationError(f"ONNX Runtime failed on the inputs {shapes}: {first}") from exc


def ort_runner(model: onnx.ModelProto) -> Runner:
    """A CPU ORT session with full graph optimisation, as a function of one input
    (a feed ``{name: array}``, or one array for a single-input model)."""
    specs = describe_inputs(model)
    session = _session(model)

    def run(x: FeedLike) -> list[np.ndarray]:
        return list(_run(session, as_feed(specs, x)).values())

    return run


def torch_runner(model: nn.Module) -> Runner:
    """The torch model in eval mode (its mode restored after each call), outputs as numpy; a feed's
    arrays are passed as positional arguments in their order."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def run(x: FeedLike) -> list[np.ndarray]:
        args = list(x.values()) if isinstance(x, Mapping) else [x]
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in args]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(*tensors)
        finally:
            model.train(was_training)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().cpu().numpy() for o in outs]

    return run


def _output_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a|) over the finite entries; a NaN or infinity in one output and not at the
    same place in the other is an infinite difference, so it can never hide behind a maximum.
    Integer and bool values that differ differ by at least 1, whatever float64 makes of them."""
    a, b = np.asarray(a), np.asarray(b)
    if not a.size:
        return 0.0, 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if a.dtype.kind in "biu" and b.dtype.kind in "biu":
        scale = float(np.max(np.abs(a64)))
        if np.array_equal(a, b):
            return 0.0, scale
        return max(float(np.max(np.abs(a64 - b64))), 1.0), scale
    fin_a, fin_b = np.isfinite(a64), np.isfinite(b64)
    same_special = ~fin_a & ~fin_b & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
    if np.any((fin_a != fin_b) | (~fin_a & ~same_special)):
        return math.inf, float(np.max(np.abs(a64[fin_a]))) if fin_a.any() else 0.0
    both = fin_a & fin_b
    if not both.any():
        return 0.0, 0.0
    return float(np.max(np.abs(a64[both] - b64[both]))), float(np.max(np.abs(a64[both])))


def _passes(diff: float, scale: float, rtol: float) -> bool:
    return diff <= rtol * scale


class _Tally:
    """The worst difference per compared value over all inputs, and the top-1 agreement."""

    def __init__(self, rtol_of_max: float) -> None:
        self.rtol_of_max = rtol_of_max
        self.worst: dict[str, list[float]] = {}  # what -> [max abs diff, max |ref|, rtol]
        self.agree = 0
        self.rows = 0

    def add(self, what: str, diff: float, scale: float, rtol: float) -> None:
        w = self.worst.setdefault(what, [0.0, 0.0, rtol])
        w[0], w[1], w[2] = max(w[0], diff), max(w[1], scale), min(w[2], rtol)

    def outputs(self, ref: Sequence[np.ndarray], cand: Sequence[np.ndarray], names: Sequence[str]) -> None:
        if len(ref) != len(cand):
            raise VerificationError(f"The reference has {len(ref)} outputs and the candidate {len(cand)}.")
        for name, a, b in zip(names, ref, cand):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                raise VerificationError(f"The {name} has shape {b.shape}, the reference gives {a.shape}.")
            self.add(name, *_output_difference(a, b), output_rtol(a.dtype, self.rtol_of_max))
        if ref:
            self.top1(np.asarray(ref[0]), np.asarray(cand[0]))

    def top1(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.ndim == 2 and a.shape[1] > 0 and a.dtype.kind == "f" and a.shape == b.shape:
            self.agree += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
            self.rows += a.shape[0]

    def result(self, n_inputs: int) -> VerifyResult:
        def rel_of(d: float, r: float) -> float:
            if r > 0:
                return d / r
            return 0.0 if d == 0 else math.inf

        def excess(d: float, r: float, rtol: float) -> float:
            if rtol * r > 0:
                return d / (rtol * r)
            return 0.0 if d == 0 else math.inf

        where, (max_abs, max_ref, rtol), worst = None, (0.0, 0.0, self.rtol_of_max), -1.0
        for what, (d, r, t) in self.worst.items():
            if excess(d, r, t) >= worst:
                where, (max_abs, max_ref, rtol), worst = what, (d, r, t), excess(d, r, t)
        return VerifyResult(
            max_abs=max_abs,
            max_ref=max_ref,
            rel=rel_of(max_abs, max_ref),
            top1_agreement=self.agree / self.rows if self.rows else None,
            passed=all(_passes(d, r, t) for d, r, t in self.worst.values()),
            n_inputs=n_inputs,
            where=where,
            rtol=rtol,
        )


def compare_runners(
    reference: Runner, candidate: Runner, inputs: Sequence[Any], rtol_of_max: float
) -> VerifyResult:
    """Run both on every input and gather the worst difference (positionally, no selection rule).

    Each output is held to the criterion on its own scale and with its dtype's tolerance (a small
    output cannot hide behind a large one).
    """
    tally = _Tally(rtol_of_max)
    for x in inputs:
        ref, cand = reference(x), candidate(x)
        tally.outputs(ref, cand, [f"output {i}" for i in range(len(ref))])
    return tally.result(len(inputs))


# ---------------------------------------------------------------- selections, compared up to ties


@dataclass(frozen=True)
class Selection:
    """A selection node of the reference and its twin in the candidate (same op type, same outputs)."""

    op_type: str
    node: str  # the reference node's name, or #INDEX
    ref_inputs: tuple[str, ...]
    cand_inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # "" for an output not written
    attrs: dict[str, Any] = field(default_factory=dict, compare=False)

    def label(self) -> str:
        return f"{self.op_type} {self.node!r}"


def find_selections(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[Selection]:
    """The reference's top-level selection nodes that the candidate has too, writing the same names."""
    producer = {o: node for node in candidate.graph.node for o in node.output if o}
    found = []
    for i, node in enumerate(reference.graph.node):
        if node.op_type not in SELECTION_OPS or node.domain not in ("", "ai.onnx"):
            continue
        named = [(k, o) for k, o in enumerate(node.output) if o]
        twins = {id(producer.get(o)) for _, o in named}
        twin = producer.get(named[0][1]) if named else None
        if twin is None or len(twins) != 1 or twin.op_type != node.op_type:
            continue
        if any(k >= len(twin.output) or twin.output[k] != o for k, o in named):
            continue
        found.append(Selection(
            op_type=node.op_type, node=node.name or f"#{i}", ref_inputs=tuple(node.input),
            cand_inputs=tuple(twin.input), outputs=tuple(node.output),
            attrs={a.name: helper.get_attribute_value(a) for a in node.attribute}))
    return found


def exposing(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy whose graph outputs also list ``names`` (those a node writes); ORT infers their types."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    written = {o for node in copy.graph.node for o in node.output if o}
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name and name in written and name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return copy


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def pin_outputs(model: onnx.ModelProto, pinned: Sequence[str], examples: Mapping[str, np.ndarray],
                expose: Sequence[str] = ()) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` in which the values ``pinned`` are graph inputs, to be fed from outside.

    The nodes that wrote them still run, writing fresh names (returned as ``{value: own name}``)
    that are exposed as outputs, like ``expose``; a graph output among them is renamed to its own
    name. ``examples`` holds a value of each pinned name, for its dtype and rank (every dimension
    of a pinned input is symbolic).
    """
    pinned_set = set(pinned)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    taken = ({o for n in g.node for o in n.output} | {n for node in g.node for n in node.input}
             | {v.name for v in (*g.input, *g.output, *g.value_info)} | {t.name for t in g.initializer})
    own: dict[str, str] = {}
    for node in g.node:
        for k, o in enumerate(node.output):
            if o in pinned_set:
                own[o] = _fresh(f"{o}/own", taken)
                node.output[k] = own[o]
    kept = [v for v in g.value_info if v.name not in pinned_set]
    del g.value_info[:]
    g.value_info.extend(kept)
    for j, o in enumerate(sorted(own)):
        example = np.asarray(examples[o])
        dims = [_fresh(f"pinned_{j}_{i}", taken) for i in range(example.ndim)]
        g.input.append(helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(example.dtype), dims))
    for out in g.output:
        if out.name in own:
            out.name = own[out.name]
    return exposing(copy, [*own.values(), *(n for n in expose if n not in own)]), own


def _constants(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray]:
    wanted = set(names)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _score_gap(scores: np.ndarray, ref: np.ndarray, cand: np.ndarray, axis: int, *, ordered: bool,
               distinct: bool) -> float:
    """max |score at the reference's index - score at the candidate's|, the reference's scores at both
    (sorted first when the order carries no meaning); infinite for an index out of range or repeated."""
    if ref.shape != cand.shape or ref.ndim != scores.ndim:
        return math.inf
    if cand.size and (cand.min() < 0 or cand.max() >= scores.shape[axis]):
        return math.inf
    if distinct and cand.size and np.any(np.diff(np.sort(cand, axis=axis), axis=axis) == 0):
        return math.inf
    s64 = scores.astype(np.float64)
    at_ref = np.take_along_axis(s64, ref.astype(np.int64), axis)
    at_cand = np.take_along_axis(s64, cand.astype(np.int64), axis)
    if not ordered:
        at_ref, at_cand = np.sort(at_ref, axis=axis), np.sort(at_cand, axis=axis)
    return _output_difference(at_ref, at_cand)[0]


Check = tuple[str, float, float, float]  # what, max abs difference, scale, rtol


def _finite_max(x: np.ndarray) -> float:
    x64 = np.asarray(x, dtype=np.float64)
    fin = x64[np.isfinite(x64)]
    return float(np.max(np.abs(fin))) if fin.size else 0.0


def _topk(sel: Selection, xs: list, refs: list, cands: list, rtol_of_max: float) -> list[Check]:
    scores = xs[0]
    axis = _axis(int(sel.attrs.get("axis", -1)), scores.ndim)
    ordered = bool(sel.attrs.get("sorted", 1))
    checks = []
    if len(refs) > 0 and refs[0] is not None:
        a, b = refs[0], cands[0]
        if a.shape != b.shape:
            diff, scale = math.inf, _finite_max(a)
        else:
            if not ordered:
                a, b = np.sort(a, axis=axis), np.sort(b, axis=axis)
            diff, scale = _output_difference(a, b)
        checks.append((f"{sel.label()} values {sel.outputs[0]!r}", diff, scale, output_rtol(a.dtype, rtol_of_max)))
    if len(refs) > 1 and refs[1] is not None:
        gap = _score_gap(scores, refs[1], cands[1], axis, ordered=ordered, distinct=True)
        checks.append((f"{sel.label()} indices {sel.outputs[1]!r}", gap, _finite_max(scores),
                       output_rtol(scores.dtype, rtol_of_max)))
    return checks


def _argselect(sel: Selection, xs: list, refs: list, cands: list, rtol_of_max: float) -> list[Check]:
    scores = xs[0]
    if not refs or refs[0] is None:
        return []
    axis = _axis(int(sel.attrs.get("axis", 0)), scores.ndim)
    ref, cand = refs[0], cands[0]
    if ref.shape != cand.shape:
        gap = math.inf
    else:
        if not sel.attrs.get("keepdims", 1):
            ref, cand = np.expand_dims(ref, axis), np.expand_dims(cand, axis)
        gap = _score_gap(scores, ref, cand, axis, ordered=True, distinct=False)
    return [(f"{sel.label()} indices {sel.outputs[0]!r}", gap, _finite_max(scores),
             output_rtol(scores.dtype, rtol_of_max))]


def _nms_gap(scores: np.ndarray, ref: np.ndarray, cand: np.ndarray) -> float:
    """Per (batch, class), as many boxes as the reference, in range, distinct, and at each rank a
    score tied with the reference's box of that rank."""
    if ref.shape != cand.shape or scores.ndim != 3:
        return math.inf
    n_batch, n_class, n_box = scores.shape

    def groups(rows: np.ndarray) -> dict[tuple[int, int], list[int]]:
        out: dict[tuple[int, int], list[int]] = {}
        for b, c, i in rows.reshape(-1, 3).tolist():
            out.setdefault((b, c), []).append(i)
        return out

    by_ref, by_cand = groups(ref), groups(cand)
    if by_ref.keys() != by_cand.keys() or any(len(v) != len(by_cand[k]) for k, v in by_ref.items()):
        return math.inf
    s64 = scores.astype(np.float64)
    gap = 0.0
    for (b, c), mine in by_cand.items():
        if not (0 <= b < n_batch and 0 <= c < n_class) or len(set(mine)) != len(mine):
            return math.inf
        if any(not 0 <= i < n_box for i in mine):
            return math.inf
        gap = max(gap, _output_difference(s64[b, c, by_ref[(b, c)]], s64[b, c, mine])[0])
    return gap


def _nms(sel: Selection, xs: list, refs: list, cands: list, rtol_of_max: float) -> list[Check]:
    if not refs or refs[0] is None:
        return []
    scores = xs[1]
    gap = _nms_gap(scores, refs[0], cands[0])
    return [(f"{sel.label()} selected indices {sel.outputs[0]!r}", gap, _finite_max(scores),
             output_rtol(scores.dtype, rtol_of_max))]


_RULES = {"TopK": _topk, "ArgMax": _argselect, "ArgMin": _argselect, "NonMaxSuppression": _nms}


def selection_checks(sel: Selection, ref_values: Mapping[str, np.ndarray], cand_values: Mapping[str, np.ndarray],
                     ref_own: Mapping[str, str], rtol_of_max: float) -> list[Check]:
    """The selection's inputs by the criterion, its outputs up to ties (module docstring, steps 1-2).

    ``ref_values`` holds the pinned reference's values by name: its selection inputs, and its own
    selection outputs under ``ref_own``; ``cand_values`` the candidate's selection inputs and outputs.
    """
    checks: list[Check] = []
    xs = []
    for rn, cn in zip(sel.ref_inputs, sel.cand_inputs):
        a = ref_values.get(rn) if rn else None
        b = cand_values.get(cn) if cn else None
        xs.append(None if a is None else np.asarray(a))
        if a is None or b is None:
            continue
        a, b = np.asarray(a), np.asarray(b)
        diff, scale = _output_difference(a, b) if a.shape == b.shape else (math.inf, _finite_max(a))
        checks.append((f"{sel.label()} input {rn!r}", diff, scale, output_rtol(a.dtype, rtol_of_max)))
    refs = [np.asarray(ref_values[ref_own.get(o, o)]) if o else None for o in sel.outputs]
    cands = [np.asarray(cand_values[o]) if o else None for o in sel.outputs]
    scores = xs[1] if sel.op_type == "NonMaxSuppression" and len(xs) > 1 else xs[0] if xs else None
    if scores is not None:
        return checks + _RULES[sel.op_type](sel, xs, refs, cands, rtol_of_max)
    for o, a, b in zip(sel.outputs, refs, cands):  # no scores to judge ties by: position by position
        if a is not None and b is not None:
            diff, scale = _output_difference(a, b) if a.shape == b.shape else (math.inf, _finite_max(a))
            checks.append((f"{sel.label()} output {o!r}", diff, scale, output_rtol(a.dtype, rtol_of_max)))
    return checks


def _compare_pinned(reference: onnx.ModelProto, candidate: onnx.ModelProto, selections: list[Selection],
                    feeds: Sequence[Feed], rtol_of_max: float) -> VerifyResult | None:
    """Steps 1-3 of the module docstring; None when a probing copy cannot be loaded."""
    cand_io = [n for s in selections for n in (*s.cand_inputs, *s.outputs) if n]
    ref_inputs = [n for s in selections for n in s.ref_inputs if n]
    pinned = [o for s in selections for o in s.outputs if o]
    ref_outputs = [o.name for o in reference.graph.output]
    cand_outputs = [o.name for o in candidate.graph.output]
    if len(ref_outputs) != len(cand_outputs):
        raise VerificationError(f"The reference has {len(ref_outputs)} outputs and the candidate {len(cand_outputs)}.")
    try:
        cand_session = _session(exposing(candidate, cand_io))
    except UnsupportedModelError:
        return None
    cand_consts, ref_consts = _constants(candidate, cand_io), _constants(reference, ref_inputs)
    tally = _Tally(rtol_of_max)
    ref_session, own = None, {}
    for feed in feeds:
        cand_values = {**cand_consts, **feed, **_run(cand_session, feed)}
        if ref_session is None:
            model, own = pin_outputs(reference, pinned, cand_values, expose=ref_inputs)
            try:
                ref_session = _session(model)
            except UnsupportedModelError:
                return None
        ref_feed = {**feed, **{o: cand_values[o] for o in own}}
        ref_values = {**ref_consts, **ref_feed, **_run(ref_session, ref_feed)}
        for k, (rn, cn) in enumerate(zip(ref_outputs, cand_outputs)):
            a, b = ref_values[own.get(rn, rn)], cand_values[cn]
            if k == 0:
                tally.top1(a, b)
            if rn in own and cn == rn:
                continue  # a selection's output: judged up to ties below
            if a.shape != b.shape:
                raise VerificationError(f"The output {rn!r} has shape {b.shape}, the reference gives {a.shape}.")
            tally.add(f"output {rn!r}", *_output_difference(a, b), output_rtol(a.dtype, rtol_of_max))
        for sel in selections:
            for check in selection_checks(sel, ref_values, cand_values, own, rtol_of_max):
                tally.add(*check)
    return tally.result(len(feeds))


def _compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Sequence[Feed],
                    rtol_of_max: float) -> VerifyResult:
    selections = find_selections(reference, candidate)
    if selections:
        result = _compare_pinned(reference, candidate, selections, feeds, rtol_of_max)
        if result is not None:
            return result
    run_ref, run_cand = ort_runner(reference), ort_runner(candidate)
    names = [f"output {o.name!r}" for o in reference.graph.output]
    tally = _Tally(rtol_of_max)
    for feed in feeds:
        tally.outputs(run_ref(feed), run_cand(feed), names)
    return tally.result(len(feeds))


def _all_feeds(model: onnx.ModelProto, inputs: Sequence[FeedLike] | None, n_random: int, batch: int,
               seed: int) -> list[Feed]:
    given = as_feeds(model, inputs)
    random = random_batches(model, given, n_random=n_random, batch=batch, seed=seed)
    if not random and not given:
        raise VerificationError("Verification got no inputs: n_random is 0 and no real inputs were given.")
    return random + given


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    inputs: Sequence[FeedLike] | None = None,
    *,
    n_random: int = 4,
    batch: int = 2,
    seed: int = 0,
    rtol_of_max: float = 1e-4,
) -> VerifyResult:
    """Both models in ORT on ``n_random`` seeded random feeds (:func:`~.inputs.random_batches`), then
    the given inputs (feeds, or arrays for a single-input model); selections compared up to ties."""
    feeds = _all_feeds(reference, inputs, n_random, batch, seed)
    return _compare_models(reference, candidate, feeds, rtol_of_max)


def raise_if_failed(result: VerifyResult, rtol_of_max: float, what: str = "The candidate model") -> VerifyResult:
    """VerificationError naming the worst difference, where it is and the threshold; the result otherwise."""
    if not result.passed:
        rtol = result.rtol if result.rtol is not None else rtol_of_max
        at = f" at {result.where}" if result.where else ""
        if rtol == 0:
            raise VerificationError(
                f"{what} does not match the reference: max abs difference {result.max_abs:.3g}{at}, "
                "which must match exactly.")
        raise VerificationError(
            f"{what} does not match the reference: max abs difference {result.max_abs:.3g}{at} exceeds "
            f"{rtol:g} x max |output| = {rtol * result.max_ref:.3g}."
        )
    return result


def verify_or_raise(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    inputs: Sequence[FeedLike] | None = None,
    *,
    n_random: int = 4,
    batch: int = 2,
    seed: int = 0,
    rtol_of_max: float = 1e-4,
) -> VerifyResult:
    """:func:`compare`, raising VerificationError when the candidate does not match."""
    result = compare(
        reference, candidate, inputs, n_random=n_random, batch=batch, seed=seed, rtol_of_max=rtol_of_max
    )
    return raise_if_failed(result, rtol_of_max)


def verify_against_torch(
    model: nn.Module,
    onnx_model: onnx.ModelProto,
    input_shape: tuple[int, ...],
    inputs: Sequence[FeedLike] | None = None,
    *,
    n_random: int = 4,
    batch: int = 2,
    seed: int = 0,
    rtol_of_max: float = 1e-4,
    raise_on_failure: bool = False,
) -> VerifyResult:
    """The exported model against torch in eval mode, on the same inputs and criterion as :func:`compare`.

    For a single-input model, random inputs have ``input_shape`` (with ``batch`` in dim 0 when the ONNX
    batch is symbolic) and the input's dtype; a model with several inputs gets :func:`compare`'s feeds.
    """
    specs = describe_inputs(onnx_model)
    given = as_feeds(specs, inputs)
    if len(specs) == 1 and n_random > 0:
        spec = specs[0]
        shape = tuple(input_shape)
        if spec.shape is None or (spec.shape and spec.shape[0] is None):
            shape = (batch, *shape[1:])
        rng = np.random.default_rng(seed)
        random = [{spec.name: random_array(rng, spec.dtype, shape)} for _ in range(n_random)]
    else:
        random = random_batches(onnx_model, given, n_random=n_random, batch=batch, seed=seed)
    feeds = random + given
    if not feeds:
        raise VerificationError("Verification got no inputs: n_random is 0 and no real inputs were given.")
    result = compare_runners(torch_runner(model), ort_runner(onnx_model), feeds, rtol_of_max)
    if raise_on_failure:
        raise_if_failed(result, rtol_of_max, what="The exported model")
    return result
