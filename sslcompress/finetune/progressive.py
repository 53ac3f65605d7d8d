"""Thinning during sparsify: channels that died stop costing time before sparsify ends.

Group Lasso kills groups one after another over the sparsify epochs, but a dead channel costs a full
forward and backward until the model is thinned. So the sparsify phase thins the model in place whenever
the channels that died since the last thinning would take at least `MIN_SAVING` of its MACs (checked at the
budget checks, where the weights are the ones a budget check just kept), and at the end of every epoch
whenever anything at all can go. Each thinning is checked for exactness by `thin` and composes with the
ones before into one plan relative to the model's own architecture, which is what checkpoints store.

A thinned channel cannot come back, where a zero group under the proximal step still could: thinning
makes death final, as the masks of fine-tuning do later anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import FinetuneConfig
from ..models import ModelSpec
from .sparsifier import Sparsifier
from .structure import ModelStructure
from .thin import ThinPlan, plan_thinning, thin

# The share of the current model's MACs the dead channels must take before a thinning mid-epoch pays for
# itself (a new structure analysis and group set each time).
MIN_SAVING = 0.10


def compose(first: ThinPlan, second: ThinPlan) -> ThinPlan:
    """One plan that cuts what `first` then `second` (planned on the model `first` left) cut."""
    if first.empty:
        return second
    if second.empty:
        return first
    keep: dict[str, dict[int, list[int]]] = {}
    shapes = dict(second.shapes)
    shapes.update(first.shapes)  # the shape before any thinning
    for name in set(first.keep) | set(second.keep):
        a, b = first.keep.get(name, {}), second.keep.get(name, {})
        dims = {}
        for d in set(a) | set(b):
            if d in a and d in b:
                dims[d] = [a[d][i] for i in b[d]]
            else:
                dims[d] = list(a.get(d) or b[d])
        keep[name] = dims
    modules = {m: dict(attrs) for m, attrs in first.modules.items()}
    for m, attrs in second.modules.items():
        modules.setdefault(m, {}).update(attrs)
    widths = dict(first.widths)
    for n, (_, oa, _, ia) in second.widths.items():
        ob, _, ib, _ = first.widths.get(n, second.widths[n])
        widths[n] = (ob, oa, ib, ia)
    means = dict(first.means)
    for m, kept in second.means.items():
        # A count kept already is the model's own; the second plan's read it back (thin._averaged).
        had = {(k.dims, k.rank) for k in means.get(m, ())}
        means[m] = (*means.get(m, ()), *(k for k in kept if (k.dims, k.rank) not in had))
    return ThinPlan(keep=keep, shapes=shapes, modules=modules, widths=widths, means=means)


def mac_saving(structure: ModelStructure, plan: ThinPlan) -> float:
    """The share of the model's layer MACs that applying `plan` would take away (from the widths it sets)."""
    total = saved = 0.0
    for lay in structure.layers.values():
        total += lay.macs
        ob, oa, ib, ia = plan.widths.get(lay.name, (1, 1, 1, 1))
        if not (ob and ib):
            continue
        if lay.carries_channels:  # depthwise: one filter per output, whatever the inputs
            kept = oa / ob
        else:  # a filter reads in / groups channels, and groups go whole with a grouped conv's
            groups_after = plan.modules.get(lay.name, {}).get("groups", lay.groups)
            kept = (oa * ia / groups_after) / (ob * ib / lay.groups)
        saved += lay.macs * (1 - kept)
    return saved / total if total else 0.0


@dataclass
class Thinned:
    """One thinning done: the sparsifier of the thinned model and what it removed."""

    sparsifier: Sparsifier
    params_before: int
    params_after: int
    summary: str


class ProgressiveThinner:
    """Thins the model being sparsified in place and keeps the composed plan.

    `reference` is the dense model's (MACs, parameters) in its own architecture, so the sparsifiers of the
    thinned models measure the budget against the same totals.
    """

    def __init__(self, spec: ModelSpec, cfg: FinetuneConfig, reference: tuple[int, int],
                 plan: ThinPlan | None = None, latency=None):
        self.spec, self.cfg, self.reference, self.latency = spec, cfg, reference, latency
        self.plan = plan or ThinPlan()
        self.count = 0
        self.failed = ""  # why the last thinning was refused; none is tried again after a refusal

    def worth_it(self, sp: Sparsifier, min_saving: float) -> bool:
        """Whether the channels dead now would take at least `min_saving` of the model's MACs (> 0: any)."""
        if self.failed:
            return False
        plan = plan_thinning(sp.model, self.spec.input_shape, counter=sp.counter)
        if plan.empty:
            return False
        return mac_saving(sp.counter.structure, plan) >= min_saving if min_saving > 0 else True

    def thin(self, sp: Sparsifier, optimizer: torch.optim.Optimizer | None) -> Thinned | None:
        """Thin `sp.model` in place (its optimizer remapped); the sparsifier of the thinned model, lambdas
        carried over, or None when thinning was refused (the reason is kept in `failed`)."""
        model: nn.Module = sp.model
        floors = sp.min_widths  # found on the model as it is, before thinning changes it under `sp`
        result = thin(model, self.spec.input_shape, optimizer=optimizer, counter=sp.counter)
        if not result.applied:
            self.failed = result.reason
            return None
        self.plan = compose(self.plan, result.plan)
        self.count += 1
        new = Sparsifier(model, self.spec, self.cfg, reference=self.reference, latency=self.latency,
                         min_widths=floors)
        new.lambdas = dict(sp.lambdas)
        return Thinned(new, result.params_before, result.params_after, result.plan.summary())
