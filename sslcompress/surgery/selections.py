"""Selections (TopK, NonMaxSuppression, ArgMax, ArgMin) are compared up to ties. Their inputs may agree
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UnsupportedModelError, VerificationError
from ..onnx_names import fresh_name
from .inputs import Feed
from .verify import VerifyResult, _output_difference, _run, _session, _Tally, output_rtol

SELECTION_OPS = frozenset({"TopK", "NonMaxSuppression", "ArgMax", "ArgMin"})


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
                own[o] = fresh_name(f"{o}/own", taken)
                node.output[k] = own[o]
    kept = [v for v in g.value_info if v.name not in pinned_set]
    del g.value_info[:]
    g.value_info.extend(kept)
    for j, o in enumerate(sorted(own)):
        example = np.asarray(examples[o])
        dims = [fresh_name(f"pinned_{j}_{i}", taken) for i in range(example.ndim)]
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


def compare_pinned(reference: onnx.ModelProto, candidate: onnx.ModelProto, selections: list[Selection],
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
