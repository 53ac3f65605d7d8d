"""Where a compact model first departs from the uncut one: a failed check names a node, not just a number.

An analysis, it changes nothing: copies of both models expose every value they share by name as
an extra graph output, both run in ONNX Runtime (unoptimised, so every node computes what the graph
says) on the same input, and the first node (in the compact model's topological order) whose
output differs by the verification criterion (:mod:`.verify`: each value on its own scale, with its
dtype's tolerance, integers exactly) is the answer. Values whose shapes differ, as channel pruning
makes them, cannot be compared and are skipped, so the node named is the first *comparable* one
past the fault. Values that describe shapes or hold constants (Shape, Size, Constant and
ConstantOfShape nodes) are not compared either: surgery changes channel counts in them by design,
and a changed constant shows in the nodes that read it.

Selections (TopK, NonMaxSuppression, ArgMax, ArgMin) are judged as in verification: the uncut
model runs with the compact model's selections pinned, a selection differs only when it is not the
reference's up to ties, and what follows it is compared on the same selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .inputs import Feed, FeedLike, as_feeds
from .selections import _constants, exposing, find_selections, pin_outputs, selection_checks
from .verify import _output_difference, _passes, _run, _session, output_rtol

# Their values describe shapes or are constants: not compared (module docstring).
NOT_COMPARED = frozenset({"Shape", "Size", "Constant", "ConstantOfShape"})


@dataclass(frozen=True)
class Divergence:
    """The first node of the candidate whose output ``value`` differs from the reference's.

    ``node`` is the node's name, or ``#INDEX`` for an unnamed node; ``input_index`` says which of
    the given inputs showed the difference.
    """

    node: str
    op_type: str
    value: str
    node_index: int
    max_abs: float
    max_ref: float
    input_index: int

    def describe(self) -> str:
        """One phrase for a message: node, op type and the value it writes."""
        return f"node {self.node!r} ({self.op_type}, output {self.value!r})"


def _node_outputs(model: onnx.ModelProto) -> list[str]:
    return [o for node in model.graph.node for o in node.output if o]


def _differs(ref: np.ndarray, cand: np.ndarray, rtol_of_max: float) -> tuple[bool, float, float]:
    """The verification criterion applied to one value; NaN or infinity where the other has none differs."""
    if ref.size == 0 or ref.dtype.kind not in "biuf" or cand.dtype.kind not in "biuf":
        return False, 0.0, 0.0  # nothing to compare numerically (empty, strings)
    max_abs, max_ref = _output_difference(ref, cand)
    return not _passes(max_abs, max_ref, output_rtol(ref.dtype, rtol_of_max)), max_abs, max_ref


def first_diverging_node(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    inputs: Sequence[FeedLike],
    *,
    rtol_of_max: float = 1e-4,
    max_inputs: int = 4,
) -> Divergence | None:
    """The first candidate node whose output differs from the reference value of the same name.

    ``inputs`` are feeds ``{name: array}`` (or arrays, for a single-input model). Tries them in
    order, at most ``max_inputs`` of them, and stops at the first that shows a difference. None
    when no shared value differs, or when ORT cannot run the probing copies (the analysis is a
    diagnosis; it never hides the failed verification that asked for it).
    """
    owner = {o: (i, node) for i, node in enumerate(candidate.graph.node) for o in node.output if o}
    ref_names = set(_node_outputs(reference))
    shared = [n for n in _node_outputs(candidate) if n in ref_names and owner[n][1].op_type not in NOT_COMPARED]
    if not shared or not inputs:
        return None
    try:
        return _first(reference, candidate, as_feeds(reference, list(inputs[:max_inputs])), shared, owner,
                      rtol_of_max)
    except Exception:  # ORT refuses a probe copy or a run: no diagnosis rather than a second error
        return None


def _first(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list[Feed], shared: list[str],
           owner: dict[str, tuple[int, Any]], rtol_of_max: float) -> Divergence | None:
    selections = find_selections(reference, candidate)
    selection_of = {o: s for s in selections for o in s.outputs if o}
    cand_io = [n for s in selections for n in (*s.cand_inputs, *s.outputs) if n]
    ref_inputs = [n for s in selections for n in s.ref_inputs if n]
    cand_session = _session(exposing(candidate, [*shared, *cand_io]), "disable")
    cand_consts, ref_consts = _constants(candidate, cand_io), _constants(reference, ref_inputs)
    ref_session, own = None, {}
    for k, feed in enumerate(feeds):
        cand_values = {**cand_consts, **feed, **_run(cand_session, feed)}
        if ref_session is None:
            # The reference runs on the candidate's selections (verify.py's step 3), so what follows
            # a selection is compared on the same one.
            model, own = pin_outputs(reference, list(selection_of), cand_values, expose=[*shared, *ref_inputs])
            ref_session = _session(model, "disable")
        ref_feed = {**feed, **{o: cand_values[o] for o in own}}
        ref_values = {**ref_consts, **ref_feed, **_run(ref_session, ref_feed)}
        judged = set()
        for name in shared:
            sel = selection_of.get(name)
            if sel is not None:
                if id(sel) in judged:
                    continue
                judged.add(id(sel))
                failed = [c for c in selection_checks(sel, ref_values, cand_values, own, rtol_of_max)
                          if not _passes(c[1], c[2], c[3])]
                if not failed:
                    continue
                _, max_abs, max_ref, _ = failed[0]
            else:
                a, b = ref_values.get(name), cand_values.get(name)
                if a is None or b is None or np.shape(a) != np.shape(b):
                    continue
                bad, max_abs, max_ref = _differs(np.asarray(a), np.asarray(b), rtol_of_max)
                if not bad:
                    continue
            index, node = owner[name]
            return Divergence(node=node.name or f"#{index}", op_type=node.op_type, value=name, node_index=index,
                              max_abs=max_abs, max_ref=max_ref, input_index=k)
    return None
