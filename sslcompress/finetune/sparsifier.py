"""The regulariser of one run and what it decides: group Lasso or l1, proximal or subgradient,
the MAC fraction it reached, the masks it leaves, and the forced zeroing of a budget."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import FinetuneConfig
from ..errors import ConfigError, TrainingError
from ..flops import Counter
from ..models import ModelSpec
from .groups import build_groups
from .loop import current_lr
from .masks import elementwise_masks
from .regularizer import GroupLasso


class Sparsifier:
    """The regulariser of one run: group Lasso (ssl) or elementwise l1, proximal or subgradient."""

    def __init__(self, model: nn.Module, spec: ModelSpec, cfg: FinetuneConfig):
        self.model, self.cfg = model, cfg
        self.input_shape = spec.input_shape
        self.counter = Counter(model, spec.input_shape)
        self.groups = build_groups(model, spec.input_shape, cfg.structures, self.counter.structure) \
            if cfg.method == "ssl" else []
        self.lasso = GroupLasso(model, self.groups, cfg.weighting) if cfg.method == "ssl" else None
        # l1 acts on conv/linear weights only, as in the paper's non-structured baseline.
        self.l1_names = [f"{n}.weight" for n in self.counter.structure.layers]
        params = dict(model.named_parameters())
        self.l1_params = [params[n] for n in self.l1_names]
        self.lambdas = ({k: cfg.lambda_for(k) for k in self.lasso.kinds} if self.lasso is not None
                        else {"l1": cfg.strength})
        self.grouped_params = sorted({s.param for g in (self.lasso.groups if self.lasso else []) for s in g.slices})
        if self.lasso is not None and not self.lasso.groups:
            raise ConfigError(f"{spec.name} has no removable {', '.join(cfg.structures)} groups to sparsify")

    def extra_loss(self):
        if self.cfg.solver != "subgradient":
            return None
        if self.lasso is not None:
            return lambda: self.lasso.penalty(self.lambdas)
        lam = self.lambdas["l1"]
        return lambda: lam * sum(p.abs().sum() for p in self.l1_params)

    def after_step(self, opt):
        params = dict(self.model.named_parameters())

        @torch.no_grad()
        def step():
            if self.cfg.solver == "proximal":
                lr = current_lr(opt)
                if self.lasso is not None:
                    self.lasso.proximal_step(lr, self.lambdas)
                else:
                    t = lr * self.lambdas["l1"]
                    for p in self.l1_params:
                        p.copy_(p.sign() * (p.abs() - t).clamp_min(0))
            else:
                # The paper's solver: subgradient in the loss, then zero what fell below threshold.
                names = self.grouped_params if self.lasso is not None else self.l1_names
                for n in names:
                    p = params[n]
                    p.masked_fill_(p.abs() < self.cfg.threshold, 0.0)
        return step

    def zero_fraction(self) -> float:
        if self.lasso is None:
            total = sum(p.numel() for p in self.l1_params)
            return float(sum(int((p == 0).sum()) for p in self.l1_params)) / max(1, total)
        zeros = self.lasso.zero_groups()
        n = sum(int(v.numel()) for v in zeros.values())
        return float(sum(int(v.sum()) for v in zeros.values())) / max(1, n)

    def macs_fraction(self) -> float:
        c = self.counter.count()
        return c.macs_gemm_fraction if "shape" in self.cfg.structures else c.macs_fraction

    def masks(self) -> dict[str, torch.Tensor]:
        if self.lasso is not None:
            return self.lasso.keep_masks()
        return elementwise_masks(self.model, self.l1_names)

    def floor(self) -> float:
        """A lower bound of the MAC fraction: every removable group zero (what pinned layers keep)."""
        probe = copy.deepcopy(self.model)
        with torch.no_grad():
            lasso = GroupLasso(probe, self.groups)
            for ix in lasso.kinds.values():
                ix.scale_(torch.zeros(ix.n))
        counted = Counter(probe, (1,), self.counter.structure).count()
        return counted.macs_gemm_fraction if "shape" in self.cfg.structures else counted.macs_fraction

    @torch.no_grad()
    def connected(self) -> bool:
        """Whether the output still depends on the input (two random inputs, two different outputs).

        Zeroing every channel of one layer cuts the network: its output becomes a constant, and
        removal would then delete the whole model while claiming a tiny MAC count.
        """
        was = self.model.training
        self.model.eval()
        try:
            param = next(self.model.parameters())
            gen = torch.Generator().manual_seed(1234)
            x = torch.randn((2, *self.input_shape[1:]), generator=gen).to(param.device, param.dtype)
            y = self.model(x)
        finally:
            self.model.train(was)
        return not torch.equal(y[0], y[1])

    @torch.no_grad()
    def enforce(self, target: float) -> int:
        """Zero the weakest removable groups (norm per MAC) until the target is met; returns how many.

        Chunks that would cut the network are undone and retried group by group, skipping the
        groups that cut it; if the target cannot be met without cutting, TrainingError.
        """
        assert self.lasso is not None
        ranked = []
        for kind, ix in self.lasso.kinds.items():
            norms = ix.sq_norms()[: ix.n].sqrt()
            for i, g in enumerate(ix.groups):
                if norms[i] > 0:
                    ranked.append((float(norms[i]) / max(g.cost, 1) ** 0.5, kind, i))
        ranked.sort()
        forced, pos, chunk = 0, 0, max(1, len(ranked) // 100)
        while self.macs_fraction() > target and pos < len(ranked):
            batch = ranked[pos:pos + chunk]
            pos += len(batch)
            saved = self._zero(batch)
            if self.connected():
                forced += len(batch)
                continue
            self._restore(saved)
            for item in batch:
                saved = self._zero([item])
                if self.connected():
                    forced += 1
                    if self.macs_fraction() <= target:
                        break
                else:
                    self._restore(saved)
        if self.macs_fraction() > target:
            raise TrainingError(
                f"target FLOPs {target:.3f} cannot be met without cutting the network (every channel of "
                f"some layer zero); the closest connected model keeps {self.macs_fraction():.3f}")
        return forced

    def _zero(self, items: list[tuple[float, str, int]]) -> dict[str, torch.Tensor]:
        """Zero these groups; returns copies of the parameters touched, for _restore."""
        params = dict(self.model.named_parameters())
        touched = {s.param for _, kind, i in items for s in self.lasso.kinds[kind].groups[i].slices}
        saved = {n: params[n].detach().clone() for n in touched}
        for kind in {k for _, k, _ in items}:
            ix = self.lasso.kinds[kind]
            scale = torch.ones(ix.n, device=ix.weight.device)
            for _, k, i in items:
                if k == kind:
                    scale[i] = 0.0
            ix.scale_(scale)
        return saved

    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for n, t in saved.items():
            params[n].copy_(t)
