"""Where a compact model first departs from the uncut one: a failed check names a node, not just a number.

An analysis, it changes nothing: copies of both models expose every value they share by name as
an extra graph output, both run in ONNX Runtime on the same input, and the first node (in the
compact model's topological order) whose output differs is the answer. Values whose shapes differ,
as channel pruning makes them, cannot be compared and are skipped, so the node named is the first
*comparable* one past the fault.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort


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


def _exposing(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy whose graph outputs also list ``names``; ORT infers their types."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return copy


def _session(model: onnx.ModelProto) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Unoptimised ORT, so every node computes exactly what the graph says it does."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(output_names, session.run(None, {input_name: x})))

    return run


def _differs(ref: np.ndarray, cand: np.ndarray, rtol_of_max: float) -> tuple[bool, float, float]:
    """The verification criterion applied to one value: max |a - b| <= rtol_of_max * max |a|."""
    if ref.size == 0 or ref.dtype.kind not in "biuf" or cand.dtype.kind not in "biuf":
        return False, 0.0, 0.0  # nothing to compare numerically (empty, strings)
    a, b = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    max_abs = float(np.max(np.abs(a - b)))
    max_ref = float(np.max(np.abs(a)))
    # Written as "not <=" so a NaN in the candidate counts as a difference.
    return not (max_abs <= rtol_of_max * max_ref), max_abs, max_ref


def first_diverging_node(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    inputs: Sequence[np.ndarray],
    *,
    rtol_of_max: float = 1e-4,
    max_inputs: int = 4,
) -> Divergence | None:
    """The first candidate node whose output differs from the reference value of the same name.

    Tries the inputs in order, at most ``max_inputs`` of them, and stops at the first that shows a
    difference. None when no shared value differs, or when ORT cannot run the probing copies (the
    analysis is a diagnosis; it never hides the failed verification that asked for it).
    """
    ref_names = set(_node_outputs(reference))
    shared = [name for name in _node_outputs(candidate) if name in ref_names]
    if not shared or not inputs:
        return None
    try:
        run_ref = _session(_exposing(reference, shared))
        run_cand = _session(_exposing(candidate, shared))
    except Exception:  # ORT refuses a probe copy: no diagnosis rather than a second error
        return None
    owner = {o: (i, node) for i, node in enumerate(candidate.graph.node) for o in node.output if o}
    for k, x in enumerate(inputs[:max_inputs]):
        batch = np.ascontiguousarray(x, dtype=np.float32)
        try:
            ref_values, cand_values = run_ref(batch), run_cand(batch)
        except Exception:
            return None
        for name in shared:
            a, b = ref_values.get(name), cand_values.get(name)
            if a is None or b is None or np.shape(a) != np.shape(b):
                continue
            bad, max_abs, max_ref = _differs(np.asarray(a), np.asarray(b), rtol_of_max)
            if bad:
                index, node = owner[name]
                return Divergence(
                    node=node.name or f"#{index}",
                    op_type=node.op_type,
                    value=name,
                    node_index=index,
                    max_abs=max_abs,
                    max_ref=max_ref,
                    input_index=k,
                )
    return None
