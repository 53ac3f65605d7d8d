"""Run two models on the same inputs and compare: a rewritten model is never trusted unchecked.

The criterion holds each output on its own scale, ``max |a - b| <= rtol * max |a|``, so float
rounding from a reordered sum passes while any real change of the function fails; a NaN or
infinity in either output counts as an infinite difference (NaN in both models is a failure).

The tolerance ``rtol`` depends on the output's dtype (:func:`output_rtol`), never loosened for
float32: float32 and float64 outputs are held to ``rtol_of_max`` (1e-4 by default, about 840 units
of float32 rounding); float16 outputs to ``max(rtol_of_max, 2**-9)`` (see FP16_RTOL); integer and
bool outputs must match exactly.

Selections (TopK, NonMaxSuppression, ArgMax, ArgMin) are compared up to ties (selections.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import VerificationError
from ..runtime import create_session
from ..runtime.pinning import usable_cpus
from ..runtime.sessions import ort_message
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
    nonfinite: str | None = None  # the first output that held a NaN or infinity (in either model)


# Verification checks values, not speed: it may use the cores it has (a few; more gain little at the
# batch sizes it runs). Sums in another order stay within the criterion, which is float rounding.
VERIFY_THREADS = max(1, min(4, len(usable_cpus()) or 1))


def _run(session, feed: Feed) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        return {n: np.asarray(v) for n, v in zip(names, session.run(None, feed))}
    except Exception as exc:
        shapes = ", ".join(f"{k} {v.dtype.name}[{'x'.join(map(str, v.shape))}]" for k, v in feed.items())
        first = ort_message(exc, limit=300)
        raise VerificationError(f"ONNX Runtime failed on the inputs {shapes}: {first}") from exc


# Quantized (QDQ) graphs are verified node by node, as the ONNX spec defines them: with graph optimisation
# ORT fuses DequantizeLinear -> Conv -> QuantizeLinear into int8 kernels, and on x86 CPUs without VNNI
# (AVX2, AVX-512 without VNNI) those add u8 x s8 products in pairs that saturate at int16, so two models that
# compute the same function can differ by a quantization step where a channel count moves the pairing (a
# QDQ ResNet cut of its zero channels: 0.0044 on a 0.18 output with full optimisation, 0.0 node by node).
QUANTIZE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def verification_level(model: onnx.ModelProto) -> str:
    """The graph optimisation a model is verified at: none for a quantized (QDQ) graph, full otherwise."""
    return "disable" if any(n.op_type in QUANTIZE_OPS for n in model.graph.node) else "all"


def _session(model: onnx.ModelProto, optimization: str | None = None):
    """A CPU session at `optimization`, by default the model's verification_level (UnsupportedModelError
    when ORT cannot load the model)."""
    level = optimization or verification_level(model)
    return create_session(model, provider="cpu", threads=VERIFY_THREADS, optimization=level)


def ort_runner(model: onnx.ModelProto) -> Runner:
    """A CPU ORT session as a function of one input (a feed ``{name: array}``, or one array for a
    single-input model): full graph optimisation, or none for a quantized graph (verification_level)."""
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
    """(max |a - b|, max |a|) over the finite entries; a NaN or infinity anywhere, in either output,
    is an infinite difference: a model whose outputs are not finite computes nothing worth keeping,
    so NaN in both models is a failure, never a match. Integer and bool values that differ differ
    by at least 1, whatever float64 makes of them."""
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
    scale = float(np.max(np.abs(a64[fin_a]))) if fin_a.any() else 0.0
    if not (fin_a.all() and fin_b.all()):
        return math.inf, scale
    return float(np.max(np.abs(a64 - b64))), scale


def _all_finite(x: np.ndarray) -> bool:
    return x.dtype.kind not in "fc" or bool(np.isfinite(x).all())


def _passes(diff: float, scale: float, rtol: float) -> bool:
    return diff <= rtol * scale


class _Tally:
    """The worst difference per compared value over all inputs, and the top-1 agreement."""

    def __init__(self, rtol_of_max: float) -> None:
        self.rtol_of_max = rtol_of_max
        self.worst: dict[str, list[float]] = {}  # what -> [max abs diff, max |ref|, rtol]
        self.agree = 0
        self.rows = 0
        self.nonfinite: str | None = None

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
            if self.nonfinite is None and not (_all_finite(a) and _all_finite(b)):
                self.nonfinite = name
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
            nonfinite=self.nonfinite,
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


def _compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Sequence[Feed],
                    rtol_of_max: float) -> VerifyResult:
    from .selections import compare_pinned, find_selections  # they build on this module's runners

    selections = find_selections(reference, candidate)
    if selections:
        result = compare_pinned(reference, candidate, selections, feeds, rtol_of_max)
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
        if result.nonfinite is not None:
            raise VerificationError(
                f"{what} cannot be verified: the reference or the candidate gives NaN or infinity at "
                f"{result.nonfinite}, and a model whose outputs are not finite is never accepted.")
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
