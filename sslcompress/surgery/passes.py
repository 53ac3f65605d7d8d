"""The surgery as onnx_ir passes on one in-memory model, run by a PassManager.

Each pass changes the model in place and keeps what it did (``result``) for the report; each
says what it requires of the graph before it runs and what it ensures after. The order matters:

- prepare (prepare.py): constants made by nodes become initializers, shapes inferred;
- zero residual branches first: a zero branch's inner values are wholly dead, which channel
  pruning leaves be;
- constant channels folded into the layers that read them, so they become dead;
- dead channels pruned, then shapes inferred afresh;
- features selected, kernels shrunk, and last the shape lowering (it reads the convs as they
  will run); compress() then writes the model out once and runs the full checker on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from ..errors import SSLCompressError, SurgeryError
from .analysis import Analysis, analysis_of
from .depth import remove_zero_branches
from .features import select_features
from .fold import fold_constant_channels
from .kernels import shrink_kernels
from .prepare import InferShapesPass, prepare_passes
from .prune import prune_dead_channels


class SurgeryPass(ir.passes.InPlacePass):
    """A surgery step: ``run(model)`` changes the model and returns what it did."""

    name = "surgery pass"

    def __init__(self, run: Callable[[ir.Model], Any], name: str) -> None:
        super().__init__()
        self._run = run
        self.name = name
        self.result: Any = None

    def requires(self, model: ir.Model) -> None:
        # The analyses walk nodes in order: every input must be made before it is read.
        _in_order(model, f"Before {self.name}")

    def ensures(self, model: ir.Model) -> None:
        # A rewrite that inserts a node must insert it before its readers, and leave no reader without
        # its value: the next pass walks the same order.
        _in_order(model, f"After {self.name}")
        outputs = {v for v in model.graph.outputs}
        for v in outputs:
            if v.producer() is None and v not in model.graph.inputs and not v.is_initializer():
                raise SurgeryError(f"After {self.name}: graph output {v.name!r} is made by no node.")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.result = self._run(model)
        return ir.passes.PassResult(model, True)


def _in_order(model: ir.Model, when: str) -> None:
    seen = set(model.graph.inputs) | set(model.graph.initializers.values())
    for node in model.graph:
        for v in node.inputs:
            producer = v.producer() if v is not None else None
            if producer is not None and producer.graph is model.graph and v not in seen:
                raise SurgeryError(f"{when}: node {node.name!r} reads {v.name!r} before it is made; please "
                                   "report this model.")
        seen.update(node.outputs)


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> None:
    """Run ``passes`` in order; an error of ours raised inside one comes out as itself."""
    try:
        ir.passes.PassManager(list(passes), steps=1)(model)
    except (ir.passes.PassError, ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, SSLCompressError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise SurgeryError(f"A surgery pass failed on this model ({_innermost(exc)}); please report this model.") from exc


def _innermost(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


class Surgery:
    """The passes of one surgery, with their results kept for the report."""

    def __init__(self, align: int | None = None) -> None:
        # One channel analysis for the three passes that read it, recomputed only after a change.
        self._analysis: Analysis | None = None
        self.depth = SurgeryPass(lambda m: remove_zero_branches(m, self._shared(m)), "zero residual branches")
        self.fold = SurgeryPass(lambda m: fold_constant_channels(m, self._shared(m)), "constant channel folding")
        self.prune = SurgeryPass(lambda m: prune_dead_channels(m, self._shared(m), align), "dead channel pruning")
        self.features = SurgeryPass(select_features, "feature selection")
        self.kernels = SurgeryPass(shrink_kernels, "kernel shrinking")

    def _shared(self, model: ir.Model) -> Analysis:
        self._analysis = analysis_of(model, self._analysis)
        return self._analysis

    def prepare(self, model: ir.Model) -> None:
        run_passes(model, prepare_passes())

    def cut(self, model: ir.Model) -> None:
        run_passes(model, [self.depth, self.fold, self.prune, InferShapesPass(), self.features, self.kernels,
                           InferShapesPass()])
