"""Run two models on the same inputs and compare: a rewritten model is never trusted unchecked.

The criterion is relative to the size of the output, ``max |a - b| <= rtol_of_max * max |a|``,
so float rounding from a reordered sum passes while any real change of the function fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ..errors import UnsupportedModelError, VerificationError

Runner = Callable[[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class VerifyResult:
    """How far a candidate's outputs are from the reference's, over ``n_inputs`` input batches.

    ``top1_agreement`` is the fraction of rows whose argmax agrees, for a 2-D first output;
    None otherwise.
    """

    max_abs: float
    max_ref: float
    rel: float
    top1_agreement: float | None
    passed: bool
    n_inputs: int


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (IR < 4 lists initializers as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _single_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inputs = _real_inputs(model)
    if len(inputs) != 1:
        raise UnsupportedModelError(f"Verification needs a model with exactly one input, this one has {len(inputs)}.")
    return inputs[0]


def _input_shape(model: onnx.ModelProto, batch: int) -> tuple[int, ...]:
    """The declared input shape, with ``batch`` for a symbolic dim 0."""
    value = _single_input(model)
    dims = value.type.tensor_type.shape.dim
    shape: list[int] = []
    for i, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        elif i == 0:
            shape.append(batch)
        else:
            raise UnsupportedModelError(
                f"Input {value.name!r} has a dynamic dimension {i}; pass real inputs to verify this model."
            )
    return tuple(shape)


def _random_inputs(shape: tuple[int, ...], n_random: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(n_random)]


def _all_inputs(
    shape: tuple[int, ...] | None, inputs: Sequence[np.ndarray] | None, n_random: int, seed: int
) -> list[np.ndarray]:
    given = [np.ascontiguousarray(x, dtype=np.float32) for x in (inputs or [])]
    random = _random_inputs(shape, n_random, seed) if shape is not None and n_random > 0 else []
    batches = random + given
    if not batches:
        raise VerificationError("Verification got no inputs: n_random is 0 and no real inputs were given.")
    return batches


def ort_runner(model: onnx.ModelProto) -> Runner:
    """A CPU ORT session with full graph optimisation and one thread, as a function of one input."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UnsupportedModelError(f"ONNX Runtime cannot load the model: {exc}") from exc
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        try:
            return [np.asarray(o) for o in session.run(None, {name: x})]
        except Exception as exc:
            raise VerificationError(f"ONNX Runtime failed on an input of shape {x.shape}: {exc}") from exc

    return run


def torch_runner(model: nn.Module) -> Runner:
    """The torch model in eval mode (its mode restored after each call), outputs as numpy."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def run(x: np.ndarray) -> list[np.ndarray]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.from_numpy(x).to(device))
        finally:
            model.train(was_training)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().cpu().numpy() for o in outs]

    return run


def _output_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a|) over the finite entries; a NaN or infinity in one output and not at the
    same place in the other is an infinite difference, so it can never hide behind a maximum."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not a.size:
        return 0.0, 0.0
    fin_a, fin_b = np.isfinite(a64), np.isfinite(b64)
    same_special = ~fin_a & ~fin_b & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
    if np.any((fin_a != fin_b) | (~fin_a & ~same_special)):
        return math.inf, float(np.max(np.abs(a64[fin_a]))) if fin_a.any() else 0.0
    both = fin_a & fin_b
    if not both.any():
        return 0.0, 0.0
    return float(np.max(np.abs(a64[both] - b64[both]))), float(np.max(np.abs(a64[both])))


def compare_runners(
    reference: Runner, candidate: Runner, inputs: Sequence[np.ndarray], rtol_of_max: float
) -> VerifyResult:
    """Run both on every input and gather the worst difference; the core of every check here.

    Each output is held to the criterion on its own scale (a small output cannot hide behind a large
    one); `max_abs`, `max_ref` and `rel` report the output with the worst relative difference.
    """
    per_output: dict[int, list[float]] = {}  # output -> [max abs diff, max |ref|]
    agree = 0
    rows = 0
    for x in inputs:
        ref, cand = reference(x), candidate(x)
        if len(ref) != len(cand):
            raise VerificationError(f"The reference has {len(ref)} outputs and the candidate {len(cand)}.")
        for i, (a, b) in enumerate(zip(ref, cand)):
            if a.shape != b.shape:
                raise VerificationError(f"Output {i} has shape {b.shape}, the reference gives {a.shape}.")
            diff, scale = _output_difference(a, b)
            worst = per_output.setdefault(i, [0.0, 0.0])
            worst[0], worst[1] = max(worst[0], diff), max(worst[1], scale)
        if ref and ref[0].ndim == 2 and ref[0].shape[1] > 0:
            agree += int(np.sum(np.argmax(ref[0], axis=1) == np.argmax(cand[0], axis=1)))
            rows += ref[0].shape[0]

    def rel_of(d: float, r: float) -> float:
        if r > 0:
            return d / r
        return 0.0 if d == 0 else math.inf

    max_abs, max_ref, rel = 0.0, 0.0, 0.0
    for d, r in per_output.values():
        if rel_of(d, r) >= rel:
            max_abs, max_ref, rel = d, r, rel_of(d, r)
    passed = all(d <= rtol_of_max * r for d, r in per_output.values())
    return VerifyResult(
        max_abs=max_abs,
        max_ref=max_ref,
        rel=rel,
        top1_agreement=agree / rows if rows else None,
        passed=bool(passed),
        n_inputs=len(inputs),
    )


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    inputs: list[np.ndarray] | None = None,
    *,
    n_random: int = 4,
    batch: int = 2,
    seed: int = 0,
    rtol_of_max: float = 1e-4,
) -> VerifyResult:
    """Both models in ORT on ``n_random`` seeded normal batches plus the given real inputs."""
    shape = _input_shape(reference, batch) if n_random > 0 else None
    batches = _all_inputs(shape, inputs, n_random, seed)
    return compare_runners(ort_runner(reference), ort_runner(candidate), batches, rtol_of_max)


def raise_if_failed(result: VerifyResult, rtol_of_max: float, what: str = "The candidate model") -> VerifyResult:
    """VerificationError naming the worst difference and the threshold; the result otherwise."""
    if not result.passed:
        raise VerificationError(
            f"{what} does not match the reference: max abs difference {result.max_abs:.3g} exceeds "
            f"{rtol_of_max:g} x max |output| = {rtol_of_max * result.max_ref:.3g}."
        )
    return result


def verify_or_raise(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    inputs: list[np.ndarray] | None = None,
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
    inputs: list[np.ndarray] | None = None,
    *,
    n_random: int = 4,
    batch: int = 2,
    seed: int = 0,
    rtol_of_max: float = 1e-4,
    raise_on_failure: bool = False,
) -> VerifyResult:
    """The exported model against torch in eval mode, on the same inputs and criterion as :func:`compare`.

    Random inputs have ``input_shape``, with ``batch`` in dim 0 when the ONNX batch is symbolic.
    """
    dims = _single_input(onnx_model).type.tensor_type.shape.dim
    shape = tuple(input_shape)
    if dims and not dims[0].HasField("dim_value"):
        shape = (batch, *shape[1:])
    batches = _all_inputs(shape if n_random > 0 else None, inputs, n_random, seed)
    result = compare_runners(torch_runner(model), ort_runner(onnx_model), batches, rtol_of_max)
    if raise_on_failure:
        raise_if_failed(result, rtol_of_max, what="The exported model")
    return result
