"""The regulariser of one run and what it decides: group Lasso or l1, proximal or subgradient,
the MAC and parameter fractions it reached, the masks it leaves, the widths it aligns, and the
zeroing by rank that lands a budget."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import FinetuneConfig
from ..errors import ConfigError, TrainingError
from ..models import ModelSpec
from .controller import Budget, BudgetController, check_interval, next_interval
from .counting import Counter
from .groups import build_groups
from .latency_budget import LatencyBudget, group_latency_costs, latency_step
from .loop import current_lr
from .masks import MaskSet, elementwise_masks
from .regularizer import GroupLasso

Ref = tuple[str, int]  # a removable group: its kind and its index among the lasso's groups of that kind
# Items the final ranking may skip in a row because each alone would land too far below the budget,
# before it settles for the one that lands closest.
MAX_MISSES = 32
# --importance taylor: each step's weight in the running mean of the Taylor scores (about the last 20 steps).
TAYLOR_DECAY = 0.95
# Kinds whose zero group deletes one channel (its `channel`): a filter, the readers of a channel, or both (a
# hidden neuron of an MLP block).
_CHANNEL_KINDS = ("filter", "channel", "neuron")


def _unit_key(layers) -> tuple[str, ...]:
    """A width by the layers that write it: the same in the model and in the model thinned."""
    return tuple(sorted(layers))


@dataclass(frozen=True)
class Unit:
    """The layers that write one set of channels (residual adds couple them): one width to keep aligned."""

    layers: tuple[str, ...]
    roots: tuple[int, ...]  # root channel ids, in the first layer's output order
    refs: tuple[Ref | None, ...]  # per channel, the group that zeroes it; None where no chosen group can
    exempt: str = ""  # why alignment leaves the width as it is


@dataclass(frozen=True)
class _Item:
    """What the final ranking zeroes in one go: a group, or with --align a block of a width's channels."""

    score: float
    refs: tuple[Ref, ...]
    est: dict[str, float]  # about what removing it saves, as fractions of the dense MACs and parameters


def _measure(budget: Budget) -> str:
    """What a Taylor ranking weighs each item's saving in: the latency where the budget asks for one, else the
    MACs, the parameters only where they alone are asked."""
    asked = budget.targets
    return "latency" if "latency" in asked else "params" if set(asked) == {"params"} else "macs"


class Sparsifier:
    """The regulariser of one run: group Lasso (ssl) or elementwise l1, proximal or subgradient."""

    def __init__(self, model: nn.Module, spec: ModelSpec, cfg: FinetuneConfig, *,
                 reference: tuple[int, int] | None = None, latency: LatencyBudget | None = None,
                 min_widths: dict[tuple[str, ...], int] | None = None):
        """`reference`: the MACs and parameters of the dense model in its own architecture, when `model` is that
        model already thinned; every fraction is of them, so a budget means the same before and after thinning.
        `min_widths`: with `reference`, the dense model's sparsifier's (see min_widths), which a thinned model
        cannot find itself: its widths are no longer the dense ones.
        `latency`: with --target-latency, the predicted latency is a third fraction (of the dense model's); with
        it, each group's predicted saving weighs it (--weighting latency) and sizes the final ranking's chunks."""
        self.model, self.cfg, self.latency = model, cfg, latency
        self.input_shape = spec.input_shape
        self.counter = Counter(model, spec.input_shape)
        self.groups = build_groups(model, spec.input_shape, cfg.structures, self.counter.structure) \
            if cfg.method == "ssl" else []
        # Predicted ms each group's removal saves, by id of the group (the lasso's groups are these objects).
        self._latency_of: dict[int, float] = {}
        costs = None
        if cfg.method == "ssl" and latency is not None:
            costs = group_latency_costs(latency, self.groups, latency_step(cfg.align, latency),
                                        self.counter.structure)
            self._latency_of = {id(g): c for g, c in zip(self.groups, costs)}
        elif cfg.method == "ssl" and cfg.weighting == "latency":
            raise ConfigError("--weighting latency needs the latency table: give the Sparsifier the options' "
                              "latency budget (latency_budget in finetune/latency_budget.py)")
        self.lasso = GroupLasso(model, self.groups, cfg.weighting, costs=costs if cfg.weighting == "latency"
                                else None) if cfg.method == "ssl" else None
        # l1 acts on conv/linear weights only, as in the paper's non-structured baseline.
        self.l1_names = [f"{n}.weight" for n in self.counter.structure.layers]
        params = dict(model.named_parameters())
        self.l1_params = [params[n] for n in self.l1_names]
        self.lambdas = ({k: cfg.lambda_for(k) for k in self.lasso.kinds} if self.lasso is not None
                        else {"l1": cfg.strength})
        self.grouped_params = sorted({s.param for g in (self.lasso.groups if self.lasso else []) for s in g.slices})
        if self.lasso is not None and not self.lasso.groups:
            raise ConfigError(f"{spec.name} has no removable {', '.join(cfg.structures)} groups to sparsify")
        self._units: dict[int, list[Unit]] = {}
        self._min_widths = min_widths
        self._floor: list[tuple[list[tuple[str, torch.Tensor]], torch.Tensor, int]] | None = None
        self._group_roots: dict[str, torch.Tensor] = {}
        self._dense: tuple[int, int] | None = reference
        self._costs: dict[int, tuple[float, float]] | None = None
        # --importance taylor: per kind, a running mean of each group's (gradient . weight)^2 (see observe).
        self._taylor: dict[str, torch.Tensor] = {}
        self._taylor_steps = 0
        # Only a budget ranks groups: without one the scores would never be read.
        self._observing = (cfg.importance == "taylor" and self.lasso is not None
                           and bool(cfg.targets() or cfg.target_latency is not None))

    def extra_loss(self):
        if self.cfg.solver != "subgradient":
            return None
        if self.lasso is not None:
            return lambda: self.lasso.penalty(self.lambdas, self.spared())
        lam = self.lambdas["l1"]
        return lambda: lam * sum(p.abs().sum() for p in self.l1_params)

    def after_step(self, opt):
        params = dict(self.model.named_parameters())

        @torch.no_grad()
        def step():
            if self._observing:
                self.observe()
            if self.cfg.solver == "proximal":
                lr = current_lr(opt)
                if self.lasso is not None:
                    self.lasso.proximal_step(lr, self.lambdas, self.spared())
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

    @torch.no_grad()
    def observe(self) -> None:
        """Fold this step's gradients into each group's Taylor importance: (sum over the group of gradient times
        weight)^2, to first order the loss its removal costs, squared so that steps whose signs differ do not
        cancel; an exponential mean over about the last 1/(1 - TAYLOR_DECAY) steps, as the weights move on."""
        if self.lasso is None:
            return
        self._taylor_steps += 1
        for kind, fo in self.lasso.first_order().items():
            prev = self._taylor.get(kind, torch.zeros_like(fo))
            self._taylor[kind] = prev * TAYLOR_DECAY + fo.pow(2) * (1 - TAYLOR_DECAY)

    def forget_taylor(self) -> None:
        self._taylor, self._taylor_steps = {}, 0

    def importance(self, norms: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        """Per kind, each group's score for the ranking, and whether scores are comparable across the whole
        network (Taylor: a loss) rather than only within a pool (norms). Taylor needs observed steps; before
        any (a one-shot ranking of the pretrained model) the norms stand in."""
        if self.cfg.importance != "taylor" or not self._taylor_steps:
            return norms, False
        debias = 1 - TAYLOR_DECAY ** self._taylor_steps
        return {k: (self._taylor[k] / debias).sqrt() for k in norms}, True

    def zero_fraction(self) -> float:
        if self.lasso is None:
            total = sum(p.numel() for p in self.l1_params)
            return float(sum(int((p == 0).sum()) for p in self.l1_params)) / max(1, total)
        zeros = self.lasso.zero_groups()
        n = sum(int(v.numel()) for v in zeros.values())
        return float(sum(int(v.sum()) for v in zeros.values())) / max(1, n)

    def macs_fraction(self) -> float:
        return self._fractions(self.counter.count())["macs"]

    def masks(self) -> dict[str, torch.Tensor]:
        if self.lasso is not None:
            return self.lasso.keep_masks()
        return elementwise_masks(self.model, self.l1_names)

    def fractions(self, align: int | None = None) -> dict[str, float]:
        """The MAC fraction (GEMM MACs with shape groups) and the parameter fraction that remain.

        With `align`, those the weights would keep once every width is rounded down to a multiple of it.
        """
        rounding = self.rounding(align) if align and align > 1 and self.lasso is not None else []
        saved = self._zero(rounding)
        try:
            return self._fractions(self.counter.count())
        finally:
            self._restore(saved)

    def _fractions(self, counted) -> dict[str, float]:
        macs, params = self.dense_totals()
        after = counted.macs_gemm_after if "shape" in self.cfg.structures else counted.macs_after
        out = {"macs": after / macs, "params": counted.params_after / params}
        if self.latency is not None:
            out["latency"] = self.latency.fraction(counted)
        return out

    def floor(self) -> float:
        """A lower bound of the MAC fraction: every removable group zero (what pinned layers keep)."""
        return self.floors()["macs"]

    def floors(self) -> dict[str, float]:
        """Lower bounds of the MAC and parameter fractions: every removable group zero but those of the channels
        min_widths keeps."""
        probe = copy.deepcopy(self.model)
        spared = self.spared() or {}
        with torch.no_grad():
            lasso = GroupLasso(probe, self.groups)
            for kind, ix in lasso.kinds.items():
                ix.scale_(spared[kind].float() if kind in spared else torch.zeros(ix.n))
        return self._fractions(Counter(probe, (1,), self.counter.structure).count())

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every weight and buffer, for `restore`."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        for k, v in self.model.state_dict().items():
            v.copy_(saved[k])

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

    # --- widths -------------------------------------------------------------------------------------------

    def units(self, align: int) -> list[Unit]:
        """Every width of the model (the channel set one or more layers write) and whether `align` applies."""
        if align in self._units:
            return self._units[align]
        st = self.counter.structure
        zeroer: dict[int, Ref] = {}
        for kind in ("channel", "neuron", "filter"):  # the filter group wins: it makes the channel exactly zero
            ix = self.lasso.kinds.get(kind) if self.lasso is not None else None
            for i, g in enumerate(ix.groups if ix is not None else []):
                if g.channel is not None:
                    zeroer[g.channel] = (kind, i)
        by_roots: dict[tuple[int, ...], list[str]] = {}
        for lay in st.layers.values():
            by_roots.setdefault(tuple(dict.fromkeys(st.root(i) for i in lay.out_ids)), []).append(lay.name)
        units = []
        for roots, layers in by_roots.items():
            refs = tuple(zeroer.get(r) for r in roots)
            pinned = sorted({st.pinned[r] for r in roots if r in st.pinned})
            if pinned:
                exempt = "pinned (" + "; ".join(pinned) + ")"
            elif any(ref is None for ref in refs):
                exempt = f"no {'/'.join(self.cfg.structures)} group removes its channels"
            elif len(roots) < align:
                exempt = f"narrower than {align}"
            else:
                exempt = ""
            units.append(Unit(tuple(layers), roots, refs, exempt))
        self._units[align] = units
        return units

    def _dead(self, norms: dict[str, torch.Tensor]) -> set[int]:
        """Root channels a zero filter or channel group has removed."""
        dead: set[int] = set()
        for kind in _CHANNEL_KINDS:
            ix = self.lasso.kinds.get(kind)
            if ix is None:
                continue
            zero = (norms[kind] == 0).tolist()
            dead.update(g.channel for g, z in zip(ix.groups, zero) if z and g.channel is not None)
        return dead

    @staticmethod
    def _live(unit: Unit, norms: dict[str, torch.Tensor], dead: set[int],
              kept: set[int] = frozenset()) -> list[tuple[float, Ref]]:
        """The channels of `unit` still there, weakest first, with the norm of the group that zeroes each;
        those in `kept` left out."""
        live = [(float(norms[ref[0]][ref[1]]), ref) for r, ref in zip(unit.roots, unit.refs)
                if ref is not None and r not in dead and r not in kept]
        return sorted(live)

    # --- the floor of the widths that carry the network -----------------------------------------------------

    @property
    def min_widths(self) -> dict[tuple[str, ...], int]:
        """The fewest channels each width that carries the network keeps, by its layers (sorted): --min-keep
        of its width, at least one. With --align the ranking takes whole blocks above it, so an aligned width
        stops at the first multiple of the step at or above its floor; group Lasso alone may leave it between
        the floor and one step (a width under the step is exempt from alignment, as any).

        A width carries the network when zeroing all of it leaves the output a constant: a residual trunk, a
        layer of a plain stack. A width a residual branch bypasses has none; it may empty, and the branch goes.
        Group Lasso thins a weak trunk as readily as a branch: on a CIFAR ResNet-20 (4-epoch checkpoint,
        strength 0.005, 50% of the MACs, --align 16) one sparsify epoch left the stage-3 trunk 1 of 64
        channels wide and the model at 18% top-1, where nothing fine-tuning does could widen it back."""
        if self._min_widths is None:
            self._min_widths = self._find_min_widths()
        return self._min_widths

    @torch.no_grad()
    def _find_min_widths(self) -> dict[tuple[str, ...], int]:
        keep = float(self.cfg.min_keep)
        if self.lasso is None or keep <= 0:
            return {}
        out = {}
        for unit in self.units(1):
            refs = [ref for ref in unit.refs if ref is not None]
            if not refs:
                continue
            saved = self._zero(refs)
            try:
                bypassed = self.connected()
            finally:
                self._restore(saved)
            if bypassed:
                continue
            out[_unit_key(unit.layers)] = max(1, math.ceil(keep * len(unit.roots) - 1e-9))
        return out

    def _floor_parts(self) -> list[tuple[list[tuple[str, torch.Tensor]], torch.Tensor, int]]:
        """Per width with a floor: (per kind, the indices of its channels' zeroing groups), those channels'
        roots in the same order, and how many of them it keeps (its channels no group removes count too)."""
        if self._floor is None:
            self._floor = []
            floors = self.min_widths
            for unit in self.units(1):
                n = floors.get(_unit_key(unit.layers), 0) - sum(ref is None for ref in unit.refs)
                if n <= 0:
                    continue
                by_kind: dict[str, tuple[list[int], list[int]]] = {}
                for r, ref in zip(unit.roots, unit.refs):
                    if ref is not None:
                        idx, roots = by_kind.setdefault(ref[0], ([], []))
                        idx.append(ref[1])
                        roots.append(r)
                device = self.lasso.kinds[next(iter(by_kind))].weight.device
                self._floor.append(([(k, torch.tensor(i, device=device)) for k, (i, _) in by_kind.items()],
                                    torch.tensor([r for _, rs in by_kind.values() for r in rs]), n))
        return self._floor

    def floor_kept(self, norms: dict[str, torch.Tensor] | None = None) -> set[int]:
        """The root channels the floor keeps now: of each width with one, its strongest, as many as it asks."""
        if self.lasso is None or not self.min_widths:
            return set()
        if norms is None:
            norms = self.lasso.norms(_CHANNEL_KINDS)
        kept: set[int] = set()
        for parts, roots, n in self._floor_parts():
            if n >= len(roots):
                kept.update(roots.tolist())
                continue
            strength = torch.cat([norms[k][idx] for k, idx in parts])
            kept.update(roots[strength.topk(n).indices.cpu()].tolist())
        return kept

    def spared(self) -> dict[str, torch.Tensor] | None:
        """Per channel kind, the groups the regulariser leaves alone now (those of the channels floor_kept
        keeps): the trimmed group Lasso, which penalises all but the strongest channels of a width with a floor."""
        kept = self.floor_kept()
        if not kept:
            return None
        if not self._group_roots:
            for kind in _CHANNEL_KINDS:
                ix = self.lasso.kinds.get(kind)
                if ix is not None:
                    self._group_roots[kind] = torch.tensor(
                        [-1 if g.channel is None else g.channel for g in ix.groups], device=ix.weight.device)
        wanted = torch.tensor(sorted(kept))
        return {k: torch.isin(roots, wanted.to(roots.device)) for k, roots in self._group_roots.items()}

    def rounding(self, align: int) -> list[Ref]:
        """The groups to zero so that every aligned width falls to the multiple of `align` below it,
        the weakest channels of each going (weakest as the ranking scores them: its blocks leave out the same
        ones); a width below `align` stays."""
        if self.lasso is None or align <= 1:
            return []
        norms = self.lasso.norms()
        dead = self._dead(norms)
        scores, _ = self.importance(norms)
        floors = self.min_widths
        out: list[Ref] = []
        for unit in self.units(align):
            if unit.exempt:
                continue
            live = self._live(unit, scores, dead)
            extra = len(live) % align
            # A width its floor holds above the multiple below stays as it is (weights that came this thin).
            if len(live) >= align and extra and len(live) - extra >= floors.get(_unit_key(unit.layers), 0):
                out += [ref for _, ref in live[:extra]]
        return out

    @torch.no_grad()
    def align_down(self, align: int | None) -> int:
        """Round every aligned width down to a multiple of `align`; returns how many groups that zeroed."""
        if not align or align <= 1 or self.lasso is None:
            return 0
        zeroed = 0
        for _ in range(3):  # a zeroing can kill a channel elsewhere too (a layer left without outputs)
            refs = self.rounding(align)
            if not refs:
                break
            self._zero(refs)
            zeroed += len(refs)
        return zeroed

    def _counted_widths(self) -> Callable[[Iterable[str]], tuple[int, int]]:
        """Kept and total width of the channels some layers write, as the counter sees them now."""
        layers = {lc.name: lc for lc in self.counter.count().layers}

        def width(names: Iterable[str]) -> tuple[int, int]:
            counts = [layers[n].filters for n in names if n in layers]
            return max((k for k, _ in counts), default=0), max((t for _, t in counts), default=0)
        return width

    def widths(self, align: int) -> list[dict]:
        """Kept and total width of every unit, as the counter sees them, and whether each is a multiple of `align`."""
        width = self._counted_widths()
        rows = []
        for unit in self.units(align):
            kept, total = width(unit.layers)
            exempt = unit.exempt or (f"fewer than {align} left" if 0 < kept < align else "")
            rows.append({"layers": list(unit.layers), "kept": kept, "total": total,
                         "aligned": kept % align == 0 if not exempt else None, "exempt": exempt})
        return rows

    def floor_widths(self) -> list[dict]:
        """Every width with a floor (min_widths): its layers, the floor and what it keeps, as the counter sees it."""
        width = self._counted_widths()
        return [{"layers": list(names), "min": floor, "kept": width(names)[0]}
                for names, floor in self.min_widths.items()]

    # --- the final ranking ----------------------------------------------------------------------------------

    def dense_totals(self) -> tuple[int, int]:
        if self._dense is None:
            c = self.counter.count()
            self._dense = (max(1, c.macs), max(1, c.params))
        return self._dense

    def _channel_costs(self) -> dict[int, tuple[float, float]]:
        """Per root channel, the MACs and parameters of every weight that writes or reads it: what removing
        the channel saves (a filter group's own weights are only the writing half)."""
        if self._costs is None:
            st = self.counter.structure
            params = dict(self.model.named_parameters())
            costs: dict[int, list[float]] = {}
            for lay in st.layers.values():
                numel = params[f"{lay.name}.weight"].numel()
                # Each input of a grouped conv is read by its group's filters: macs / inputs too. A depthwise
                # conv carries its input channel on to its output, one channel: counted once.
                sides = [(lay.out_ids, 1 if lay.has_bias else 0)]
                if not lay.carries_channels:
                    sides.append((lay.in_ids, 0))
                for ids, bias in sides:
                    for i in ids:
                        row = costs.setdefault(st.root(i), [0.0, 0.0])
                        row[0] += lay.macs / len(ids)
                        row[1] += numel / len(ids) + bias
            self._costs = {r: (m, p) for r, (m, p) in costs.items()}
        return self._costs

    def _pools(self) -> dict[Ref, tuple]:
        """Which groups compete with each other within one structure: a width's filter groups, its channel
        groups, a layer's shape groups, the residual branches."""
        unit_of = {r: u for u, unit in enumerate(self.units(1)) for r in unit.roots}
        pools: dict[Ref, tuple] = {}
        for kind, ix in self.lasso.kinds.items():
            for i, g in enumerate(ix.groups):
                if kind in _CHANNEL_KINDS and g.channel is not None:
                    pools[(kind, i)] = (kind, "width", unit_of.get(g.channel, -1))
                elif kind == "depth":
                    pools[(kind, i)] = (kind,)
                else:
                    pools[(kind, i)] = (kind, g.layers)
        return pools

    def _ranked(self, align: int | None, measure: str = "macs") -> list[_Item]:
        """Every nonzero removable group (with `align`: every block of `align` channels of an aligned width),
        weakest first. A width's last block may go, as its last channel may without `align`: its pool's
        strongest item, it goes only when little else scores below it, and where it would cut the network
        enforce's connection check gives it back. Keeping it would make a budget that only an emptied width
        meets (a residual branch gone) fail at the end of sparsify although lambda alone could reach it.

        An item's strength is its norm over the mean norm of its pool's live items (see _pools), as
        Torch-Pruning's group norm normalises: the weakest channel of a width competes with the weakest of
        another whatever the overall scale of their weights, and a pool's strongest item scores at least 1, so
        a width empties only when nothing elsewhere scores below that. What an item saves does not weigh in: dividing by its MACs
        (wholly or by the square root) or ranking each by its share of what its width still holds cut the
        residual trunks first and cost accuracy: a pretrained CIFAR ResNet-20 at 50% of the MACs (1 + 2
        epochs) ended at 20.17% / 20.90% error (seeds 0 / 1) with the square root of the MACs and the share,
        at 20.20% / 20.17% normalised by the mean, and LeNet-5 on MNIST at 4% at 1.01% against 0.88%.

        With --importance taylor an item's score is its Taylor importance (see observe: the loss its removal
        costs, on one scale for the whole network) per unit of what it saves in the budget's `measure`, so the
        ranking takes first what buys the budget at the least loss. The pool normalisation above scores a
        width's last block exactly 1 whatever it carries, so aligned widths are whittled to one block each
        in turn and which of those empties then is a tie; on a CIFAR ResNet-20 at --align 16 and 50% of the
        MACs it emptied every stage-3 branch (53.5% top-1 after 1 + 2 epochs, seed 0), where Taylor per MAC
        kept two of them and ended at 68.6%."""
        norms = self.lasso.norms()
        macs, params = self.dense_totals()
        channel = self._channel_costs()

        def saves(kind: str, i: int) -> tuple[float, float]:
            g = self.lasso.kinds[kind].groups[i]
            if kind in _CHANNEL_KINDS and g.channel in channel:
                return channel[g.channel]
            return float(g.cost), float(g.size)

        def latency_of(refs) -> float:
            """The refs' predicted saving as a fraction of the dense model's ms: how many to try at once (the
            predicted fraction after zeroing decides whether they stay)."""
            return sum(self._latency_of[id(self.lasso.kinds[k].groups[i])] for k, i in refs) / self.latency.dense_ms

        scores, global_scale = self.importance(norms)

        def norm_of(refs) -> float:
            return math.sqrt(sum(float(scores[k][i]) ** 2 for k, i in refs))

        def items_of(blocks: list[list[Ref]]) -> list[_Item]:
            """A pool's items, each scored by its norm over the pool's mean (Taylor scores as they are)."""
            strengths = [norm_of(b) for b in blocks]
            mean = 1.0 if global_scale else max(sum(strengths) / max(1, len(strengths)), 1e-30)
            out = []
            for refs, strength in zip(blocks, strengths):
                saved = [saves(k, i) for k, i in refs]
                est = {"macs": sum(m for m, _ in saved) / macs, "params": sum(p for _, p in saved) / params}
                est["latency"] = latency_of(refs) if self._latency_of else est["macs"]
                # A Taylor score is a loss; per unit of what the item saves, the ranking takes first what costs
                # the least accuracy for the budget it buys (a greedy knapsack).
                score = strength / max(est[measure], 1e-12) if global_scale else strength / mean
                out.append(_Item(score, tuple(refs), est))
            return out

        items, blocked = [], set()
        kept = self.floor_kept(norms)  # the channels of widths at their floor are never items
        # Nor are channels already gone: zeroing the other group of a dead channel (the readers of a zero
        # filter) saves nothing, and counted as an item it would skew the chunks enforce takes, so that the
        # model thinned and the same model unthinned (which still holds those groups) would land apart.
        dead = self._dead(norms)
        if align and align > 1:
            for unit in self.units(align):
                if unit.exempt:
                    continue
                blocked.update(unit.roots)
                live = self._live(unit, scores, dead, kept)
                live = live[len(live) % align:]
                blocks = [[ref for _, ref in live[b:b + align]] for b in range(0, len(live), align)]
                items += items_of(blocks)
        pools: dict[tuple, list[Ref]] = {}
        for ref, pool in self._pools().items():
            kind, i = ref
            g = self.lasso.kinds[kind].groups[i]
            if float(norms[kind][i]) > 0 and not (kind in _CHANNEL_KINDS and (g.channel in blocked or g.channel
                                                                             in kept or g.channel in dead)):
                pools.setdefault(pool, []).append(ref)
        for pool, refs in pools.items():
            refs.sort(key=lambda r: float(scores[r[0]][r[1]]))
            ranked = items_of([[r] for r in refs])
            # An attention keeps a head: one with none left computes a constant the export does not cut.
            items += ranked[:-1] if pool[0] == "head" else ranked
        items.sort(key=lambda it: it.score)
        return items

    @torch.no_grad()
    def enforce(self, target: float | Budget, align: int | None = None) -> int:
        """Zero the weakest removable groups (as _ranked orders them: norm over the mean of their pool) until
        the budget is met, landing as close below it as the groups allow; returns how many were zeroed.

        Groups go in chunks whose estimated saving is half the remaining gap (halved again when a chunk
        lands below the budget), so the last ones go one by one; a group that alone would land more than
        the budget's tolerance below it is passed over for the next ones, and taken only when nothing else
        within reach meets the budget. With `align`, whole blocks of `align` channels of a
        width go together, so widths stay multiples of it. A zeroing that cuts the network (the output no
        longer depends on the input) is undone; if the budget cannot be met without cutting, TrainingError.
        """
        assert self.lasso is not None
        budget = target if isinstance(target, Budget) else Budget({"macs": float(target)})
        fr = self.fractions()
        if budget.met(fr):
            return 0
        ranked = self._ranked(align, _measure(budget))
        forced, pos = 0, 0
        misses: list[tuple[float, _Item]] = []

        def attempt(batch: list[_Item]) -> dict[str, float] | None:
            """Zero `batch`; keep it and return the fractions if it stays connected and does not undershoot."""
            saved = self._zero([r for it in batch for r in it.refs])
            if self.connected():
                now = self.fractions()
                if not budget.undershot(now):
                    return now
                if len(batch) == 1:
                    misses.append((budget.slack(now), batch[0]))
            self._restore(saved)
            return None

        while True:
            in_a_row = 0
            while not budget.met(fr) and pos < len(ranked) and not (misses and in_a_row >= MAX_MISSES):
                gaps = budget.gaps(fr)
                metric = max(gaps, key=gaps.__getitem__)
                take, est = 1, ranked[pos].est[metric]
                while pos + take < len(ranked) and est + ranked[pos + take].est[metric] <= gaps[metric] / 2:
                    est += ranked[pos + take].est[metric]
                    take += 1
                # A chunk that undershoots (an estimate too low) or cuts the network is halved and tried again.
                while True:
                    batch = ranked[pos:pos + take]
                    now = attempt(batch)
                    if now is not None:
                        forced += sum(len(it.refs) for it in batch)
                        fr, in_a_row = now, 0
                        pos += take
                        break
                    if take == 1:
                        pos += 1
                        in_a_row += 1
                        break
                    take //= 2
            # Nothing within reach lands inside the tolerance: take what goes least below the budget (each
            # alone met it when tried, and zeroing more only lowers the fractions).
            misses.sort(key=lambda m: -m[0])
            for _, it in misses:
                if budget.met(fr):
                    break
                saved = self._zero(list(it.refs))
                if self.connected():
                    forced += len(it.refs)
                    fr = self.fractions()
                else:
                    self._restore(saved)
            misses.clear()
            if budget.met(fr) or pos >= len(ranked):
                break
        if not budget.met(fr):
            floor = (f" or thinning a width that carries it below --min-keep {self.cfg.min_keep:g}"
                     if self.min_widths else "")
            raise TrainingError(
                f"target {budget.describe()} cannot be met without cutting the network (every channel of "
                f"some layer zero){floor}; the closest such model keeps {fr['macs']:.3f} of the MACs and "
                f"{fr['params']:.3f} of the parameters")
        return forced

    @torch.no_grad()
    def _zero(self, refs: list[Ref]) -> dict[str, torch.Tensor]:
        """Zero these groups; returns copies of the parameters touched, for _restore."""
        if not refs:
            return {}
        params = dict(self.model.named_parameters())
        touched = {s.param for kind, i in refs for s in self.lasso.kinds[kind].groups[i].slices}
        saved = {n: params[n].detach().clone() for n in touched}
        for kind in {k for k, _ in refs}:
            ix = self.lasso.kinds[kind]
            scale = torch.ones(ix.n, device=ix.weight.device)
            for k, i in refs:
                if k == kind:
                    scale[i] = 0.0
            ix.scale_(scale)
        return saved

    @torch.no_grad()
    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for n, t in saved.items():
            params[n].copy_(t)


class BudgetWatch:
    """Checks the budget every few optimizer steps of sparsify, moves lambda with the controllers' schedule,
    and once the budget is met stops lambda (zero) and holds the zero groups at zero until the epoch ends.

    A strong lambda can remove far more than asked between two checks, and a zero weight cannot be given
    back its trained value: so the weights of the last check above the budget are kept, and a check that
    finds the budget overshot by more than its tolerance goes back to them and zeroes the weakest groups
    from there instead, which lands on the budget. Checks close in as the fraction nears the target.
    Each epoch starts afresh (its first check `interval` steps in, a copy of its first weights, no Taylor
    scores), so a run resumed at an epoch boundary checks, and ranks, where the uninterrupted run did.
    """

    def __init__(self, sp: Sparsifier, budget: Budget, controllers: dict[str, BudgetController], *,
                 steps_per_epoch: int, every: int | None, align: int | None, epoch: int, pace: bool):
        self.sp, self.budget, self.controllers, self.align, self.pace = sp, budget, controllers, align, pace
        self.steps = max(1, steps_per_epoch)
        self.interval = check_interval(self.steps, every)
        self.held: MaskSet | None = None
        self.met_at: dict[str, int] | None = None
        self.forced = 0  # groups zeroed by rank to land on the budget (with pace, also to keep up with it)
        self.paced = 0  # of them, those zeroed at checks to keep up with the schedule
        self.messages: list[str] = []
        self.checked = False  # a check just passed above the budget (its weights are the copy): a safe point to thin
        self.start_epoch(epoch)

    @property
    def holding(self) -> bool:
        return self.held is not None

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0
        if self.held is not None:
            return
        self.sp.forget_taylor()  # as a run resumed here starts: its state holds no Taylor scores
        self.last_step = 0
        self.last_slack = self.budget.slack(self.sp.fractions(self.align))
        self.copy = self.sp.snapshot()
        self.next_check = self.interval
        if self.last_slack <= 0:  # met before any step of this epoch (weights that came sparse enough)
            self._hold(self.sp.fractions(self.align))

    def after_step(self) -> None:
        """After each optimizer step (and the sparsifier's step, which is skipped while holding)."""
        self.step += 1
        if self.held is not None:
            self.held.apply_()
        elif self.step >= self.next_check:
            self.check()

    def end_epoch(self) -> bool:
        """A last check for the steps since the previous one; True once the budget is met (sparsify stops)."""
        if self.held is None and self.step > self.last_step:
            self.check()
        if self.held is None:
            self.start_epoch(self.epoch + 1)
        return self.held is not None

    def take_messages(self) -> list[str]:
        out, self.messages = self.messages, []
        return out

    def check(self) -> None:
        fr = self.sp.fractions(self.align)
        slack = self.budget.slack(fr)
        if slack <= 0:
            self._hold(fr)
            return
        span = (self.step - self.last_step) / self.steps
        elapsed = self.epoch + self.step / self.steps
        # The metric furthest behind its schedule decides.
        factor = max(c.factor(elapsed, fr[m], span) for m, c in self.controllers.items())
        self.sp.lambdas = next(iter(self.controllers.values())).scaled(self.sp.lambdas, factor)
        if self.pace:
            fr = self._keep_pace(elapsed, fr)
            slack = self.budget.slack(fr)
            if slack <= 0:
                self._hold(fr)
                return
        self.next_check = self.step + next_interval(self.last_slack, slack, self.step - self.last_step,
                                                    self.interval)
        self.last_step, self.last_slack = self.step, slack
        self.copy = self.sp.snapshot()
        self.checked = True

    def _keep_pace(self, elapsed: float, fr: dict[str, float]) -> dict[str, float]:
        """Where lambda lags the schedule by more than a landing's tolerance, zero the weakest groups down to
        the fraction the schedule asks for now. Lambda has grown for the lag already; the network then adapts
        to each small cut in the steps that follow, instead of taking the whole rest of the budget in one cut
        at the end of sparsify, and the channels that go are thinned out of the steps after them."""
        wanted = {m: max(c.wanted_at(elapsed), self.budget.targets[m]) for m, c in self.controllers.items()}
        # Along the schedule a point of lag is let be (lambda may catch up); once it asks for the target
        # itself, the budget is landed here rather than left a fraction of a point above it.
        lag = {m: self.budget.tolerance if w > self.budget.targets[m] else 0.0 for m, w in wanted.items()}
        if all(fr[m] <= w + lag[m] for m, w in wanted.items()):
            return fr
        before = self.sp.snapshot()
        try:
            zeroed = self.sp.enforce(Budget(wanted, self.budget.tolerance), self.align)
        except TrainingError:
            self.sp.restore(before)  # nothing connected meets the schedule's fraction: the end of sparsify says so
            return fr
        self.forced += zeroed
        self.paced += zeroed
        return self.sp.fractions(self.align)

    def rebind(self, sp: Sparsifier) -> None:
        """Go on with the sparsifier of the thinned model; thinned at a check, so the copy is those weights."""
        self.sp = sp
        self.copy = sp.snapshot()
        self.checked = False

    def _hold(self, fr: dict[str, float]) -> None:
        note = ""
        if self.budget.undershot(fr) and self.step > 0:
            went = self.sp.snapshot()
            self.sp.restore(self.copy)
            try:
                zeroed = self.sp.align_down(self.align) + self.sp.enforce(self.budget, self.align)
            except TrainingError:
                self.sp.restore(went)  # the overshot weights are connected; the ranking found no other way
            else:
                self.forced += zeroed
                note = (f"; the last {self.step - self.last_step} steps went {-self.budget.slack(fr) * 100:.1f} "
                        f"points past it, so the weights went back to the check before and the {zeroed} weakest "
                        "groups were zeroed instead")
        else:
            self.forced += self.sp.align_down(self.align)
        fr = self.sp.fractions()
        self.sp.lambdas = {k: 0.0 for k in self.sp.lambdas}
        self.held = MaskSet(self.sp.model, self.sp.masks())
        self.met_at = {"epoch": self.epoch, "step": self.step}
        self.messages.append(
            f"budget ({self.budget.describe()}) met in sparsify epoch {self.epoch + 1}, step {self.step}/"
            f"{self.steps}: MACs {fr['macs']:.1%}, parameters {fr['params']:.1%}{note}; lambda stops, and the "
            "zero groups stay zero for the rest of sparsify")
