"""Group Lasso over many groups at once: norms, penalty, proximal step, subgradient, masks.

Groups of one kind never overlap, so each kind is one vectorised scatter of squared slice norms
into a norm vector and one gather of per-group scales back into the weights: a handful of
tensor ops per parameter, whatever the number of groups. Kinds do overlap (a filter and a
channel share a weight), so the proximal step applies the kinds one after another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

from ..errors import ConfigError
from .groups import KINDS, ParamGroup, axis_dim

WEIGHTINGS = ("none", "sqrt", "macs", "latency")


@dataclass
class _Member:
    param: nn.Parameter
    name: str
    axis: str
    gid: torch.Tensor  # group index per position along the axis; n_groups means "no group"


def _positions(p: torch.Tensor, axis: str) -> int:
    if axis == "fiber":
        return p[0].numel()
    d = axis_dim(axis, p.dim())
    return p.shape[d] if d is not None else 1


def _sq_along(p: torch.Tensor, axis: str) -> torch.Tensor:
    """Sum of squares of each slice along `axis`."""
    return _sum_along(p.pow(2), axis)


def _sum_along(t: torch.Tensor, axis: str) -> torch.Tensor:
    """Sum of each slice of `t` along `axis`."""
    if axis == "out":
        return t.reshape(t.shape[0], -1).sum(1)
    if axis == "in":
        return t.transpose(0, 1).reshape(t.shape[1], -1).sum(1)
    if axis == "fiber":
        return t.reshape(t.shape[0], -1).sum(0)
    if axis == "row":
        return t.sum((0, 1, 3))
    if axis == "col":
        return t.reshape(-1, t.shape[-1]).sum(0)
    return t.sum().reshape(1)


def _scale_view(s: torch.Tensor, p: torch.Tensor, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor to multiply, broadcastable scale) for `axis`."""
    nd = p.dim()
    if axis == "out":
        return p, s.view(-1, *([1] * (nd - 1)))
    if axis == "in":
        return p, s.view(1, -1, *([1] * (nd - 2)))
    if axis == "fiber":
        return p.view(p.shape[0], -1), s.view(1, -1)
    if axis == "row":
        return p, s.view(1, 1, -1, 1)
    if axis == "col":
        return p, s.view(*([1] * (nd - 1)), -1)
    return p, s.view(*([1] * nd)) if nd else s.view(())


class _KindIndex:
    """Compiled index of the groups of one kind."""

    def __init__(self, kind: str, groups: list[ParamGroup], params: dict[str, nn.Parameter], weighting: str,
                 costs: list[float] | None = None):
        self.kind = kind
        self.groups = groups
        n = len(groups)
        self.n = n
        members: dict[tuple[str, str], _Member] = {}
        for g_i, g in enumerate(groups):
            for s in g.slices:
                key = (s.param, s.axis)
                if key not in members:
                    p = params[s.param]
                    gid = torch.full((_positions(p, s.axis),), n, dtype=torch.long, device=p.device)
                    members[key] = _Member(p, s.param, s.axis, gid)
                members[key].gid[list(s.index)] = g_i
        self.members = list(members.values())
        device = self.members[0].param.device if self.members else torch.device("cpu")
        self.weight = _weights(groups, weighting, costs).to(device)

    def sq_norms(self) -> torch.Tensor:
        """Squared norm per group (length n + 1; the last slot collects unowned positions)."""
        device = self.weight.device
        dtype = torch.promote_types(self.members[0].param.dtype, torch.float32) if self.members else torch.float32
        acc = torch.zeros(self.n + 1, device=device, dtype=dtype)
        for m in self.members:
            acc = acc.index_add(0, m.gid, _sq_along(m.param, m.axis).to(dtype))
        return acc

    @torch.no_grad()
    def first_order(self) -> torch.Tensor:
        """Per group, the sum of gradient times weight over its slices (length n): minus the first-order change
        of the loss when the group is zeroed. Parameters without a gradient contribute nothing."""
        device = self.weight.device
        acc = torch.zeros(self.n + 1, device=device, dtype=torch.float32)
        for m in self.members:
            if m.param.grad is not None:
                acc = acc.index_add(0, m.gid, _sum_along(m.param.grad * m.param, m.axis).float())
        return acc[: self.n]

    @torch.no_grad()
    def scale_(self, scale: torch.Tensor) -> None:
        """Multiply every slice of group g by scale[g] (scale has n entries)."""
        full = torch.cat([scale, scale.new_ones(1)])
        for m in self.members:
            target, s = _scale_view(full[m.gid], m.param, m.axis)
            target.mul_(s)

    @torch.no_grad()
    def mask_(self, masks: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        full = torch.cat([keep, keep.new_ones(1)])
        for m in self.members:
            target, s = _scale_view(full[m.gid], masks[m.name], m.axis)
            target.mul_(s)


def _check_number(what: str, value: object) -> float:
    """`value` as a float when it is a finite number >= 0; ConfigError otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{what} must be a number, got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be finite and >= 0, got {value}.")
    return float(value)


def _check_lambdas(lambdas: object) -> dict[str, float]:
    if not isinstance(lambdas, Mapping):
        raise ConfigError(f"lambdas must map group kinds to strengths, got {type(lambdas).__name__}.")
    bad = [str(k) for k in lambdas if k not in KINDS]
    if bad:
        raise ConfigError(f"lambdas name unknown group kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}.")
    return {k: _check_number(f"lambda of {k}", v) for k, v in lambdas.items()}


def _weights(groups: list[ParamGroup], weighting: str, costs: list[float] | None = None) -> torch.Tensor:
    if weighting == "none" or not groups:
        return torch.ones(len(groups))
    if weighting == "sqrt":
        w = torch.tensor([float(g.size) for g in groups]).sqrt()
    elif weighting == "macs":
        w = torch.tensor([float(max(g.cost, 1)) for g in groups])
    elif weighting == "latency":
        if costs is None:
            raise ConfigError("latency weighting needs each group's latency cost (GroupLasso's costs)")
        w = torch.tensor(costs, dtype=torch.float64)
        if not bool(w.sum() > 0):
            return torch.ones(len(groups))  # no group saves anything measurable: weigh them alike
        w = w.float()
    else:
        raise ConfigError(f"unknown group weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")
    # Normalised to mean 1 so that a lambda means the same whatever the weighting.
    return w / w.mean()


class GroupLasso:
    """The group Lasso over `groups` of `model`: only removable groups are regularised.

    `costs`: with weighting "latency", what removing each group saves (a sequence aligned with `groups`, any
    unit: the predicted ms of finetune/latency_budget.py's group_latency_costs); each group's weight is its cost
    over the mean cost of its kind, as every weighting is normalised to mean 1 per kind.
    """

    def __init__(self, model: nn.Module, groups: list[ParamGroup], weighting: str = "none",
                 costs: Sequence[float] | None = None):
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown group weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")
        if weighting == "latency" and costs is None:
            raise ConfigError("latency weighting needs each group's latency cost: pass costs, one per group "
                              "(finetune/latency_budget.py's group_latency_costs computes them).")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"GroupLasso takes a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
            raise ConfigError(f"GroupLasso takes a list of groups from build_groups, got {type(groups).__name__}.")
        groups = list(groups)
        params = dict(model.named_parameters())
        for g in groups:
            if not isinstance(g, ParamGroup):
                raise ConfigError(f"GroupLasso takes ParamGroup items from build_groups, got {type(g).__name__}.")
            lacking = [s.param for s in g.slices if s.param not in params]
            if lacking:
                raise ConfigError(f"group {g.name!r} names parameter {lacking[0]} that the model lacks "
                                  "(groups built from another model?).")
        if costs is not None:
            if isinstance(costs, (str, bytes)) or not hasattr(costs, "__len__") or len(costs) != len(groups):
                raise ConfigError(f"GroupLasso's costs must be a sequence of one number per group ({len(groups)}).")
            costs = [_check_number(f"the cost of group {g.name!r}", c) for g, c in zip(groups, costs)]
        self.model = model
        self.all_groups = list(groups)
        self.groups = [g for g in groups if g.removable]
        self.weighting = weighting
        by_kind: dict[str, list[ParamGroup]] = {}
        cost_of: dict[str, list[float]] = {}
        for i, g in enumerate(groups):
            if g.removable:
                by_kind.setdefault(g.kind, []).append(g)
                cost_of.setdefault(g.kind, []).append(costs[i] if costs is not None else 0.0)
        self.kinds = {k: _KindIndex(k, gs, params, weighting, cost_of[k] if costs is not None else None)
                      for k, gs in by_kind.items()}

    def norms(self, kinds: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """L2 norm of each group, per kind (of `kinds` only, where given), detached."""
        with torch.no_grad():
            return {k: ix.sq_norms()[: ix.n].sqrt() for k, ix in self.kinds.items() if kinds is None or k in kinds}

    def first_order(self) -> dict[str, torch.Tensor]:
        """Per kind, each group's sum of gradient times weight (see _KindIndex.first_order)."""
        return {k: ix.first_order() for k, ix in self.kinds.items()}

    def zero_groups(self) -> dict[str, torch.Tensor]:
        """Boolean vector per kind: which groups are exactly zero."""
        with torch.no_grad():
            return {k: ix.sq_norms()[: ix.n] == 0 for k, ix in self.kinds.items()}

    def penalty(self, lambdas: dict[str, float], spared: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """sum_k lambda_k * sum_g w_g ||W_g||_2, differentiable (subgradient 0 at a zero group); groups marked
        in `spared` (a boolean vector per kind) are left out of the sum."""
        lambdas = _check_lambdas(lambdas)
        total = None
        for k, ix in self.kinds.items():
            lam = lambdas.get(k, 0.0)
            if lam == 0:
                continue
            sq = ix.sq_norms()[: ix.n]
            weight = ix.weight if spared is None or k not in spared else ix.weight * (~spared[k]).to(ix.weight)
            # clamp: the gradient of sqrt at 0 is infinite; a zero group's subgradient is taken as 0.
            term = lam * (weight * sq.clamp_min(1e-30).sqrt()).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    @torch.no_grad()
    def proximal_step(self, lr: float, lambdas: dict[str, float],
                      spared: Mapping[str, torch.Tensor] | None = None) -> None:
        """Group soft-thresholding W_g <- max(0, 1 - lr*lambda*w_g/||W_g||) W_g, kind by kind; groups marked in
        `spared` (a boolean vector per kind) are not shrunk."""
        lr = _check_number("the learning rate", lr)
        lambdas = _check_lambdas(lambdas)
        for k, ix in self.kinds.items():
            lam = lambdas.get(k, 0.0)
            if lam <= 0 or ix.n == 0:
                continue
            norm = ix.sq_norms()[: ix.n].sqrt()
            thresh = lr * lam * ix.weight
            scale = torch.where(norm > thresh, 1 - thresh / norm.clamp_min(1e-30), torch.zeros_like(norm))
            if spared is not None and k in spared:
                scale = torch.where(spared[k], torch.ones_like(scale), scale)
            ix.scale_(scale)

    @torch.no_grad()
    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Per parameter touched by any group: True where the weight lies in no zero group."""
        masks: dict[str, torch.Tensor] = {}
        for ix in self.kinds.values():
            for m in ix.members:
                masks.setdefault(m.name, torch.ones_like(m.param, dtype=torch.float32))
        for ix in self.kinds.values():
            keep = (ix.sq_norms()[: ix.n] > 0).float()
            ix.mask_(masks, keep)
        return {name: m.bool() for name, m in masks.items() if not bool(m.all())}
