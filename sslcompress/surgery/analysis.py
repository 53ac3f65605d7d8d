"""The channel analyses of one state of a graph, computed once and shared by the passes that read it.

The zero-branch, folding and pruning passes all read the channel states and the coupling; a pass
that leaves the graph as it was leaves them valid for the next, and one that changes it says so
(``invalidate``). Everything here is keyed by ``ir.Value``, so it holds only for the graph it was
computed on.
"""

from __future__ import annotations

import onnx_ir as ir

from .channels import Channels, analyze
from .coupling import Coupling, couple


class Analysis:
    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._states: dict[ir.Value, Channels] | None = None
        self._coupling: Coupling | None = None

    @property
    def states(self) -> dict[ir.Value, Channels]:
        if self._states is None:
            self._states = analyze(self.model)  # also lays out the channel axes the coupling reads
        return self._states

    @property
    def coupling(self) -> Coupling:
        if self._coupling is None:
            self.states  # noqa: B018  (the layout first)
            self._coupling = couple(self.model)
        return self._coupling

    def invalidate(self) -> None:
        """The graph changed: what was computed no longer holds."""
        self._states = self._coupling = None


def analysis_of(model: ir.Model, analysis: Analysis | None) -> Analysis:
    """The shared analysis when it is of this model, else a fresh one."""
    return analysis if analysis is not None and analysis.model is model else Analysis(model)
