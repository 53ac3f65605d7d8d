"""Thinning: delete the channels a sparsified model no longer uses, in the torch model itself.

After group-Lasso training, whole filters and channels are exactly zero and masks keep them so. Every
training step still spends its time on them. Thinning slices them out of the parameters and buffers
(conv filters and input channels, Linear rows and columns, BatchNorm parameters and running statistics)
so the rest of the training runs on a smaller model that computes exactly what the masked one computes.

Which channels go is what the MAC counter calls removed: a channel whose every producer slice is zero,
or that nobody reads any more, and that the graph does not pin. Residual Adds merge the ids of their
summands, so a channel leaves every summand at once. Only channels (and attention heads, with the
`num_heads` of the module whose forward reads it) are cut: zero kernel rows and columns, shape columns and
zero residual branches stay in place under their masks, since removing them would change the graph rather
than a width. A layer always keeps at least one channel and an attention one head, so no tensor of
width zero appears. Zero heads of an nn.MultiheadAttention, or of an attention whose forward reshapes its
heads back to the input's width, stay in place, masked (the export deletes them); the result's reason says so.

A mean over the channels in a forward (ConvNeXt V2's GRN) would divide by fewer channels once sliced: the plan
records its count, and the module whose forward takes it gets hooks that keep dividing by it (kept_count.py).

Equivalence holds while the zeros stay zero (their masks are carried along with `slice_tensors`);
element-wise dropout draws its random numbers over fewer elements, so it matches in distribution, not
bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from ..models import ModelSpec, build_model
from . import grouped, kept_count
from .counting import Counter
from .heads import HEAD_ATTRS, KV_HEAD_ATTRS, WIDTH_ATTRS
from .structure import Layer, ModelStructure, analyze

FORMAT = "sslcompress-thin-plan"
VERSION = 1

# Module attributes a plan may set; apply_plan refuses anything else, so a plan read from a file cannot
# reach into arbitrary attributes.
_WIDTH_ATTRS = {
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Conv3d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._BatchNorm: ("num_features",),
}


@dataclass(frozen=True)
class ThinPlan:
    """What thinning keeps: per parameter or buffer name, the kept indices along each dim it shrinks.

    ``keep`` maps e.g. ``"conv1.weight" -> {0: [0, 2, 5]}`` and ``"fc1.weight" -> {1: [...]}``;
    ``shapes`` holds each sliced tensor's shape before thinning (apply_plan checks it, so a plan is never
    applied to the wrong model or twice); ``modules`` the width attributes each touched module gets
    (``in_channels``, ``out_features``, ``groups``, ``num_features``, ...); ``widths`` a summary per layer:
    (outputs before, after, inputs before, after).
    """

    keep: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    modules: dict[str, dict[str, int]] = field(default_factory=dict)
    widths: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    # Attentions with zero heads that stay in place, masked, and why (nn.MultiheadAttention, say). A note of the
    # planning, not of the cut: to_dict leaves it out, as applying a plan never needs it.
    heads_kept: dict[str, str] = field(default_factory=dict, compare=False)
    # Per module whose forward averages over channels the plan cuts, the means that keep their count (hooks,
    # see kept_count.py); '' is the model's own forward.
    means: dict[str, tuple[kept_count.KeptMean, ...]] = field(default_factory=dict)
    # Modules whose forward averages over channels thinning would cut but cannot keep the count of, and why
    # those channels stay (masked). A note of the planning, as heads_kept is.
    means_kept: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def empty(self) -> bool:
        return not self.keep

    def removed(self, name: str) -> int:
        """Scalars of tensor `name` that thinning deletes (0 for a tensor it keeps whole)."""
        if name not in self.keep:
            return 0
        before = after = 1
        for d, n in enumerate(self.shapes[name]):
            before *= n
            after *= len(self.keep[name][d]) if d in self.keep[name] else n
        return before - after

    def summary(self) -> str:
        """One line: the layers whose width changes, outputs before -> after."""
        changed = [f"{n} {ob}->{oa}" for n, (ob, oa, ib, ia) in self.widths.items() if ob != oa or ib != ia]
        if not changed:
            return "nothing to thin"
        shown = ", ".join(changed[:8]) + (f", ... ({len(changed) - 8} more)" if len(changed) > 8 else "")
        return f"{len(changed)} layer(s) thinned (outputs): {shown}"

    def to_dict(self) -> dict[str, Any]:
        """Plain str/int/list values only, so a checkpoint read with torch.load(weights_only=True) holds it."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "keep": {n: {int(d): [int(i) for i in ix] for d, ix in dims.items()} for n, dims in self.keep.items()},
            "shapes": {n: [int(s) for s in shape] for n, shape in self.shapes.items()},
            "modules": {m: {a: int(v) for a, v in attrs.items()} for m, attrs in self.modules.items()},
            "widths": {n: [int(v) for v in w] for n, w in self.widths.items()},
        } | ({"means": {m: [[int(k.rank), int(k.count), *map(int, k.dims)] for k in kept]
                        for m, kept in self.means.items()}} if self.means else {})

    @classmethod
    def from_dict(cls, d: Any) -> ThinPlan:
        """Inverse of :meth:`to_dict`; anything malformed raises CheckpointError."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError("a thinning plan must be the dict ThinPlan.to_dict() writes.")
        if d.get("version") != VERSION:
            raise CheckpointError(f"thinning plan version {d.get('version')!r}, this sslcompress reads {VERSION}.")
        try:
            keep = {str(n): {_int(k): [_int(i) for i in ix] for k, ix in dims.items()}
                    for n, dims in d["keep"].items()}
            shapes = {str(n): tuple(_int(s) for s in shape) for n, shape in d["shapes"].items()}
            modules = {str(m): {str(a): _int(v) for a, v in attrs.items()} for m, attrs in d["modules"].items()}
            widths = {str(n): tuple(_int(v) for v in w) for n, w in d.get("widths", {}).items()}
            means = {str(m): tuple(kept_count.KeptMean(tuple(_int(v) for v in k[2:]), _int(k[0]), _int(k[1]))
                                   for k in kept) for m, kept in d.get("means", {}).items()}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"a damaged thinning plan ({type(exc).__name__}: {exc}).") from exc
        for n, dims in keep.items():
            shape = shapes.get(n)
            if shape is None:
                raise CheckpointError(f"the thinning plan slices {n} but does not record its shape.")
            for dim, ix in dims.items():
                if not 0 <= dim < len(shape) or not ix or any(not 0 <= i < shape[dim] for i in ix) \
                        or ix != sorted(set(ix)):
                    raise CheckpointError(f"the thinning plan keeps invalid indices of {n} along dim {dim}.")
        if any(len(w) != 4 for w in widths.values()):
            raise CheckpointError("the thinning plan's widths must be four integers per layer.")
        if any(not k.dims or k.count < 1 or k.rank < 1 for kept in means.values() for k in kept):
            raise CheckpointError("the thinning plan's means must each name dims, a rank and a count.")
        return cls(keep=keep, shapes=shapes, modules=modules, widths=widths, means=means)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


@dataclass(frozen=True)
class ThinResult:
    """What `thin` did: applied or not (and why not), the plan, and the parameter counts."""

    applied: bool
    plan: ThinPlan
    reason: str = ""  # one sentence when not applied; when applied, the zero heads it kept in place and why
    params_before: int = 0
    params_after: int = 0
    max_error: float | None = None  # worst |thinned - original| over the check, relative to the output scale


def _depthwise(lay: Layer) -> bool:
    return lay.carries_channels


def _removable_ids(model: nn.Module, input_shape: tuple[int, ...], st: ModelStructure,
                   counter: Counter | None = None) -> set[int]:
    """Root ids the MAC counter deletes and a torch model can lose by slicing its tensors."""
    # Grouped convs' groups are made equal by _align_grouped, which also makes their kept positions the same.
    dead = (counter or Counter(model, input_shape, st)).removal(equal_groups=False).channels
    # A channel can be sliced out only where some layer writes it: ids that enter otherwise (model input,
    # the pixels an MLP flattens, the output of an op we do not know) come from a tensor we cannot shrink.
    written = {i for lay in st.layers.values() if not lay.carries_channels for i in lay.out_ids}
    sourced = {st.root(i) for i in range(len(st.parent)) if i not in written}
    # torch.split's sizes are written in the forward: a thinned model could not split its channels there.
    split = {st.root(i) for sp in st.splits if not sp.equal_parts for part in sp.parts for i in part}
    return {r for r in dead if r not in st.pinned and r not in sourced and r not in split}


# Means over the channels whose count no hook can keep; a sliced forward would divide by the channels left.
_TWO_MEANS = ("its forward averages over the channels twice, with the same dims but different widths, and a "
              "sliced forward would divide by the channels left (the export keeps the counts and deletes them)")
_NO_OWNER = ("no hook can find its mean over the channels (no module of the model by the name its forward runs "
             "under, or dims not written as numbers), and a sliced forward would divide by the channels left (the "
             "export keeps the count and deletes them)")


def _averaged(model: nn.Module, st: ModelStructure, cut: set[int]
              ) -> tuple[set[int], dict[str, tuple[kept_count.KeptMean, ...]], dict[str, str]]:
    """For the means over the channels that lose some of `cut`: per module, the means that keep their count once
    sliced (a count kept already stays); the roots of `cut` whose mean cannot keep its count (they stay, zero
    under their masks), and per such module, why. A sum over the channels needs no count: its dead channels
    added zero."""
    wanted: dict[str, dict[tuple, set[int]]] = {}
    roots_of: dict[tuple, set[int]] = {}
    for m in st.means:
        roots = {st.root(i) for i in m.ids}
        if not m.divides or not roots & cut:
            continue
        owner = _submodule(model, m.module)
        key = (m.dims if owner is not None else None, m.rank)
        had = kept_count.kept(owner).get(key) if owner is not None and m.dims else None
        wanted.setdefault(m.module, {}).setdefault(key, set()).add(had or len(m.ids))
        roots_of.setdefault((m.module, *key), set()).update(roots & cut)
    kept: set[int] = set()
    means: dict[str, tuple[kept_count.KeptMean, ...]] = {}
    why: dict[str, str] = {}
    for module, by_key in wanted.items():
        for (dims, rank), counts in by_key.items():
            if dims is None or len(counts) > 1:
                kept |= roots_of[(module, dims, rank)]
                why[module or "the model's forward"] = _TWO_MEANS if dims is not None else _NO_OWNER
            else:
                means[module] = (*means.get(module, ()), kept_count.KeptMean(dims, rank, counts.pop()))
    return kept, means, why


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The module whose forward the analysis found a node in, where the model has it by that name."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _equal_chunks(st: ModelStructure, cut: set[int]) -> set[int]:
    """Roots of `cut` a torch.chunk keeps so that each of its parts keeps as many channels (then the thinned
    forward's chunk of the same count splits them where the model did)."""
    kept: set[int] = set()
    for sp in st.splits:
        if not sp.equal_parts:
            continue
        lost = [[i for i in part if st.root(i) in cut] for part in sp.parts]
        n = max(1, max(len(part) - len(gone) for part, gone in zip(sp.parts, lost)))
        for part, gone in zip(sp.parts, lost):
            kept.update(st.root(i) for i in gone[:n - (len(part) - len(gone))])
    return kept & cut


def _align_grouped(st: ModelStructure, cut: set[int]) -> set[int]:
    """Roots of `cut` a grouped conv keeps so that one slice of its weight cuts it: every kept group keeps
    the same input positions (a plan slices each dim alone) and as many outputs as the fullest group."""
    kept: set[int] = set()
    for lay in grouped.grouped_layers(st):
        per_out, per_in = lay.weight_shape[0] // lay.groups, lay.weight_shape[1]
        outs, ins = grouped.kept_by_group(lay, cut, st.root)
        active = grouped.active_groups(outs, ins)
        if not active:
            continue
        common = sorted({j for g in active for j in ins[g]}) or [0]
        n_out = max(1, max(len(outs[g]) for g in active))
        for g in active:
            kept.update(st.root(lay.in_ids[g * per_in + j]) for j in common if j not in ins[g])
            lost = [n for n in range(per_out) if n not in outs[g]]
            kept.update(st.root(lay.out_ids[g * per_out + n]) for n in lost[:n_out - len(outs[g])])
    return kept & cut


def _cut(model: nn.Module, input_shape: tuple[int, ...], st: ModelStructure, params: dict,
         counter: Counter | None = None) -> tuple[set[int], dict[str, str]]:
    """The roots thinning deletes: what the counter removes, less what a mean over the channels that cannot keep
    its count reads, what keeps every layer non-empty, every grouped conv sliceable and every chunk's parts equal
    (each keeps channels that may unbalance another, so they run until none asks); and per module whose mean
    kept channels so, why."""
    cut = _removable_ids(model, input_shape, st, counter)
    averaged, _, why = _averaged(model, st, cut)
    cut -= averaged
    strength = _strength(st, params)
    while True:
        cut = _keep_one_per_layer(st, cut, strength)
        kept = _align_grouped(st, cut) | _equal_chunks(st, cut)
        if not kept:
            return cut, why
        cut -= kept


def _strength(st: ModelStructure, params: dict[str, torch.Tensor]) -> dict[int, float]:
    """Sum of squares of every producer slice of each root: which channel to keep when all would go."""
    out: dict[int, float] = {}

    def add(ids: list[int], p: torch.Tensor | None) -> None:
        if p is None:
            return
        per_row = p.detach().double().pow(2).reshape(p.shape[0], -1).sum(1).tolist()  # one transfer per tensor
        for i, v in zip(ids, per_row):
            r = st.root(i)
            out[r] = out.get(r, 0.0) + v

    for lay in st.layers.values():
        add(lay.out_ids, params.get(f"{lay.name}.weight"))
        add(lay.out_ids, params.get(f"{lay.name}.bias"))
    for norm in st.norms.values():
        add(norm.ids, params.get(f"{norm.name}.weight"))
        add(norm.ids, params.get(f"{norm.name}.bias"))
    for cp in st.channel_params:
        p = params.get(cp.param)
        add(cp.ids, None if p is None else p.movedim(cp.dim, 0))
    return out


def _keep_one_per_layer(st: ModelStructure, cut: set[int], strength: dict[int, float]) -> set[int]:
    """Give back the strongest channel of any layer or norm that would lose all of its channels."""
    cut = set(cut)
    widths = [lay.out_ids for lay in st.layers.values()]
    widths += [lay.in_ids for lay in st.layers.values() if lay.groups == 1]
    widths += [norm.ids for norm in st.norms.values()]
    changed = True
    while changed:
        changed = False
        for ids in widths:
            roots = {st.root(i) for i in ids}
            if roots and roots <= cut:
                cut.discard(max(sorted(roots), key=lambda r: strength.get(r, 0.0)))
                changed = True
    return cut


@torch.no_grad()
def plan_thinning(model: nn.Module, input_shape: tuple[int, ...],
                  structure: ModelStructure | None = None, *, counter: Counter | None = None) -> ThinPlan:
    """Which rows and columns of which tensors go, for a model whose zero groups are as they are now.

    `counter`: a Counter of this model (and its structure) already built, so repeated plans skip the groups.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"plan_thinning takes a torch.nn.Module, got {type(model).__name__}.")
    st = counter.structure if counter is not None else structure or analyze(model, tuple(input_shape))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    counter = counter or Counter(model, tuple(input_shape), st)
    cut, means_kept = _cut(model, tuple(input_shape), st, params, counter)
    means = _averaged(model, st, cut)[1]

    keep: dict[str, dict[int, list[int]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    modules: dict[str, dict[str, int]] = {}
    widths: dict[str, tuple[int, int, int, int]] = {}

    def slice_dim(name: str, tensors: dict[str, torch.Tensor], dim: int, kept: list[int]) -> None:
        t = tensors.get(name)
        if t is None or len(kept) == t.shape[dim]:
            return
        keep.setdefault(name, {})[dim] = kept
        shapes[name] = tuple(int(s) for s in t.shape)

    for lay in st.layers.values():
        keep_out = [n for n, i in enumerate(lay.out_ids) if st.root(i) not in cut]
        w, b = f"{lay.name}.weight", f"{lay.name}.bias"
        keep_in = [c for c, i in enumerate(lay.in_ids) if st.root(i) not in cut]
        if _depthwise(lay):
            widths[lay.name] = (len(lay.out_ids), len(keep_out), len(lay.in_ids), len(keep_in))
            if len(keep_out) < len(lay.out_ids):
                # The outputs of group g are input channel g carried on: they go with it, one group each.
                slice_dim(w, params, 0, keep_out)
                slice_dim(b, params, 0, keep_out)
                modules[lay.name] = {"in_channels": len(keep_in), "out_channels": len(keep_out),
                                     "groups": len(keep_in)}
            continue
        if lay.grouped:
            _slice_grouped(lay, cut, st, params, slice_dim, modules, widths)
            continue
        widths[lay.name] = (len(lay.out_ids), len(keep_out), len(lay.in_ids), len(keep_in))
        if len(keep_out) == len(lay.out_ids) and len(keep_in) == len(lay.in_ids):
            continue
        slice_dim(w, params, 0, keep_out)
        slice_dim(w, params, 1, keep_in)
        slice_dim(b, params, 0, keep_out)
        if lay.kind == "conv":
            modules[lay.name] = {"in_channels": len(keep_in), "out_channels": len(keep_out)}
        else:
            modules[lay.name] = {"in_features": len(keep_in), "out_features": len(keep_out)}
    heads_kept = _slice_heads(st, counter.removal().heads, params, slice_dim, modules, widths)
    for norm in st.norms.values():
        kept = [c for c, i in enumerate(norm.ids) if st.root(i) not in cut]
        if len(kept) == len(norm.ids):
            continue
        for leaf in ("weight", "bias"):
            slice_dim(f"{norm.name}.{leaf}", params, 0, kept)
        for leaf in ("running_mean", "running_var"):
            slice_dim(f"{norm.name}.{leaf}", buffers, 0, kept)
        modules[norm.name] = {"num_features": len(kept)}
    for cp in st.channel_params:
        # A parameter with one entry per channel read outside a layer (a per-channel scale or shift).
        slice_dim(cp.param, params, cp.dim, [c for c, i in enumerate(cp.ids) if st.root(i) not in cut])
    return ThinPlan(keep=keep, shapes=shapes, modules=modules, widths=widths, heads_kept=heads_kept,
                    means=means if keep else {}, means_kept=means_kept)


def _slice_heads(st: ModelStructure, dead_heads, params, slice_dim, modules, widths) -> dict[str, str]:
    """Zero attention heads: their rows of q, k and v (every part of a packed projection), their columns of the
    output projection, and the head counts (query, and key/value in grouped-query attention) of the module whose
    forward reads them. Returns, per attention whose
    zero heads stay in place (masked), why (see Heads.keeps_heads)."""
    by_proj = {att.proj: att for att in st.heads}
    kept_whole = {}
    for proj, gone in dead_heads:
        att = by_proj[proj]
        if att.keeps_heads:
            kept_whole[att.name] = att.keeps_heads
            continue
        alive = [h for h in range(att.groups) if h not in gone]
        cols = att.cols(alive)
        for lin in att.row_layers:
            rows = att.rows(alive, lin)
            slice_dim(f"{lin}.weight", params, 0, rows)
            slice_dim(f"{lin}.bias", params, 0, rows)
            modules.setdefault(lin, {})["out_features"] = len(rows)
            ob, _, ib, ia = widths.get(lin, (st.layers[lin].weight_shape[0], 0, st.layers[lin].weight_shape[1],
                                              st.layers[lin].weight_shape[1]))
            widths[lin] = (ob, len(rows), ib, ia)
        slice_dim(f"{proj}.weight", params, 1, cols)
        modules.setdefault(proj, {})["in_features"] = len(cols)
        ob, oa, ib, _ = widths.get(proj, (st.layers[proj].weight_shape[0],) * 2 + (st.layers[proj].weight_shape[1],) * 2)
        widths[proj] = (ob, oa, ib, len(cols))
        for table, axis in att.tables:
            slice_dim(table, params, axis, att.query_heads(alive))
        counts = {att.heads_attr: len(att.query_heads(alive))}
        counts |= {att.width_attr: len(cols)} if att.width_attr else {}
        modules[att.owner] = counts | ({att.kv_attr: len(alive)} if att.kv_heads else {})
    return kept_whole


def _slice_grouped(lay: Layer, cut: set[int], st: ModelStructure, params, slice_dim, modules, widths) -> None:
    """A grouped conv loses the filters of its cut outputs and, in every kept group, the same input positions
    (_align_grouped made them the same); `groups` becomes the number of groups kept."""
    outs, ins = grouped.kept_by_group(lay, cut, st.root)
    active = grouped.active_groups(outs, ins)
    per_out = lay.weight_shape[0] // lay.groups
    keep_out = [g * per_out + n for g in active for n in outs[g]]
    local_in = ins[active[0]] if active else []
    widths[lay.name] = (len(lay.out_ids), len(keep_out), len(lay.in_ids), len(active) * len(local_in))
    if len(keep_out) == len(lay.out_ids) and len(active) * len(local_in) == len(lay.in_ids):
        return
    w, b = f"{lay.name}.weight", f"{lay.name}.bias"
    slice_dim(w, params, 0, keep_out)
    slice_dim(w, params, 1, local_in)
    slice_dim(b, params, 0, keep_out)
    modules[lay.name] = {"in_channels": len(active) * len(local_in), "out_channels": len(keep_out),
                         "groups": len(active)}


def _slice(t: torch.Tensor, dims: Mapping[int, list[int]]) -> torch.Tensor:
    out = t.detach()
    for d in sorted(dims):
        out = out.index_select(d, torch.as_tensor(dims[d], dtype=torch.long, device=t.device))
    return out.clone()


def slice_tensors(tensors: Mapping[str, torch.Tensor], plan: ThinPlan) -> dict[str, torch.Tensor]:
    """A state_dict, a set of masks or any tensors named like the model's, cut as the plan cuts the model.

    Tensors the plan does not name, or whose shape is not the one the plan cuts, pass through unchanged.
    """
    out = {}
    for name, t in tensors.items():
        dims = plan.keep.get(name)
        if dims and isinstance(t, torch.Tensor) and tuple(t.shape) == plan.shapes[name]:
            out[name] = _slice(t, dims)
        else:
            out[name] = t
    return out


@dataclass
class _Undo:
    """Every binding apply changed, to put the model back exactly as it was."""

    tensors: list[tuple[nn.Module, str, str, Any]] = field(default_factory=list)  # module, dict, leaf, old
    attrs: list[tuple[nn.Module, str, Any]] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)  # handles of the hooks that keep means' counts

    def __call__(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for module, where, leaf, old in reversed(self.tensors):
            getattr(module, where)[leaf] = old
        for module, attr, old in reversed(self.attrs):
            setattr(module, attr, old)


def _allowed_attrs(module: nn.Module) -> tuple[str, ...]:
    for cls, attrs in _WIDTH_ATTRS.items():
        if isinstance(module, cls):
            return attrs
    # An attention written out (see heads.py) reads its head count in its forward; nn.MultiheadAttention's
    # weights are never cut (its inner width is its embed_dim, see Heads.keeps_heads), so its count stays.
    if any(isinstance(getattr(module, a, None), int) for a in HEAD_ATTRS) and \
            not isinstance(module, nn.MultiheadAttention):
        return (*HEAD_ATTRS, *KV_HEAD_ATTRS, *WIDTH_ATTRS)
    return ()


def _bindings(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(tensor) -> every (module, '_parameters' | '_buffers', leaf) holding it (tied weights hold one twice)."""
    out: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for module in model.modules():
        for where in ("_parameters", "_buffers"):
            for leaf, t in getattr(module, where).items():
                if t is not None:
                    out.setdefault(id(t), []).append((module, where, leaf))
    return out


@torch.no_grad()
def _apply(model: nn.Module, plan: ThinPlan) -> _Undo:
    undo = _Undo()
    if plan.empty:
        return undo
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    # Check everything before touching anything, so a plan that does not fit leaves the model as it was.
    for name in plan.keep:
        t = named.get(name)
        if t is None:
            raise ConfigError(f"the thinning plan cuts {name}, which the model lacks.")
        if tuple(t.shape) != plan.shapes[name]:
            raise ConfigError(f"the thinning plan cuts {name} of shape {plan.shapes[name]}, the model's has "
                              f"{tuple(t.shape)} (another model, or a plan applied twice).")
    for mname, attrs in plan.modules.items():
        try:
            module = model.get_submodule(mname)
        except AttributeError as exc:
            raise ConfigError(f"the thinning plan changes module {mname}, which the model lacks.") from exc
        bad = [a for a in attrs if a not in _allowed_attrs(module)]
        if bad:
            raise ConfigError(f"the thinning plan sets {bad[0]} of {mname} ({type(module).__name__}), "
                              "not a width it may change.")
    for mname in plan.means:
        try:
            model.get_submodule(mname)
        except AttributeError as exc:
            raise ConfigError(f"the thinning plan keeps a mean's count in module {mname}, which the model lacks."
                              ) from exc
    sliced = {name: _slice(named[name], dims) for name, dims in plan.keep.items()}
    bindings = _bindings(model)
    try:
        for name, new in sliced.items():
            old = named[name]
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
                if old.grad is not None and tuple(old.grad.shape) == plan.shapes[name]:
                    new.grad = _slice(old.grad, plan.keep[name])
            for module, where, leaf in bindings.get(id(old), []):
                undo.tensors.append((module, where, leaf, old))
                getattr(module, where)[leaf] = new
        for mname, attrs in plan.modules.items():
            module = model.get_submodule(mname)
            for attr, value in attrs.items():
                undo.attrs.append((module, attr, getattr(module, attr)))
                setattr(module, attr, value)
        for mname, means in plan.means.items():
            module = model.get_submodule(mname)
            had = kept_count.kept(module)
            new_means = tuple(m for m in means if (m.dims, m.rank) not in had)
            if new_means:
                undo.hooks += kept_count.install(module, new_means)
    except BaseException:
        undo()
        raise
    return undo


def apply_plan(model: nn.Module, plan: ThinPlan) -> None:
    """Cut the model's tensors in place as the plan says and set the widths of the modules it touches.

    Cut parameters are new nn.Parameter objects (same requires_grad, gradient cut too): an optimizer that
    holds the old ones needs `remap_optimizer`, and hooks registered on the old tensors stay with them.
    Raises ConfigError, with the model unchanged, when the plan does not fit it.
    """
    _apply(model, plan)


def remap_optimizer(optimizer: torch.optim.Optimizer, old_params_by_name: Mapping[str, torch.Tensor],
                    model: nn.Module, plan: ThinPlan) -> None:
    """Point `optimizer` at the thinned model's parameters, its state cut the same way.

    `old_params_by_name` is ``dict(model.named_parameters())`` taken before `apply_plan`. Per-parameter
    state shaped like the parameter (SGD's momentum_buffer, Adam's exp_avg and exp_avg_sq, ...) is cut as
    the parameter was; anything else (step counts) is kept, so training goes on as if nothing happened.
    """
    new = dict(model.named_parameters())
    name_of = {id(p): n for n, p in old_params_by_name.items()}
    for group in optimizer.param_groups:
        params = group["params"]
        for k, p in enumerate(params):
            name = name_of.get(id(p))
            if name is None or name not in new or new[name] is p:
                continue
            q = new[name]
            params[k] = q
            state = optimizer.state.pop(p, None)
            if state is None:
                continue
            dims = plan.keep.get(name, {})
            optimizer.state[q] = {
                key: _slice(v, dims) if isinstance(v, torch.Tensor) and dims and tuple(v.shape) == tuple(p.shape)
                else v
                for key, v in state.items()
            }


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@torch.no_grad()
def _outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return [[t.detach().clone() for t in _tensors(model(x))] for x in inputs]
    finally:
        for m, training in modes.items():
            m.training = training


def _mismatch(ref: list[list[torch.Tensor]], got: list[list[torch.Tensor]]) -> tuple[str, float]:
    """('' or why the outputs differ, worst error relative to the output scale)."""
    worst = 0.0
    for a_list, b_list in zip(ref, got):
        if len(a_list) != len(b_list):
            return "the thinned model returns other outputs", worst
        for a, b in zip(a_list, b_list):
            if a.shape != b.shape:
                return f"an output has shape {tuple(b.shape)} instead of {tuple(a.shape)}", worst
            if not a.is_floating_point():
                if not torch.equal(a, b):
                    return "an integer output changed", worst
                continue
            a64, b64 = a.double(), b.double()
            scale = float(a64.abs().max()) if a64.numel() else 0.0
            err = float((a64 - b64).abs().max()) if a64.numel() else 0.0
            worst = max(worst, err / scale if scale > 0 else err)
            # Dropping exact-zero terms changes only the summation order: float rounding, relative to scale.
            if not torch.allclose(b64, a64, rtol=1e-5, atol=1e-5 * scale, equal_nan=True):
                return f"the outputs differ by {err:.3g} (output scale {scale:.3g})", worst
    return "", worst


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def thin(model: nn.Module, input_shape: tuple[int, ...], *, check: bool = True,
         optimizer: torch.optim.Optimizer | None = None, structure: ModelStructure | None = None,
         counter: Counter | None = None) -> ThinResult:
    """Plan and apply thinning in place; with `check`, keep it only if outputs match the unthinned model's.

    The check runs two random inputs of `input_shape` in eval mode (global random state untouched). If the
    analysis fails, the thinned forward raises (a hard-coded width such as ``x.view(-1, 800)``) or the
    outputs differ beyond float rounding, the model is put back exactly as it was and the result says why.
    An `optimizer` over the model's parameters is moved to the thinned ones (see `remap_optimizer`).
    """
    before = _param_count(model)
    try:
        plan = plan_thinning(model, tuple(input_shape), structure, counter=counter)
    except UnsupportedModelError as exc:
        return ThinResult(False, ThinPlan(), f"the model cannot be analysed: {exc}", before, before)
    if plan.empty:
        return ThinResult(False, plan, _with_heads_kept("no channel is removable", plan), before, before)
    inputs: list[torch.Tensor] = []
    ref: list[list[torch.Tensor]] = []
    if check:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        gen = torch.Generator(device="cpu").manual_seed(0)
        inputs = [torch.randn(tuple(input_shape), generator=gen).to(device=device, dtype=dtype) for _ in range(2)]
        try:
            ref = _outputs(model, inputs)
        except Exception as exc:
            return ThinResult(False, plan, f"the model does not run on an input of shape {tuple(input_shape)} "
                                           f"({_first_line(exc)})", before, before)
    old_params = dict(model.named_parameters())
    undo = _apply(model, plan)
    max_error = None
    if check:
        why = ""
        try:
            why, max_error = _mismatch(ref, _outputs(model, inputs))
        except Exception as exc:  # user forwards fail in every way once a width changes
            why = f"the thinned model's forward fails ({_first_line(exc)}), so it likely hard-codes a width"
        if why:
            undo()
            return ThinResult(False, plan, f"thinning was not applied: {why}.", before, before, max_error)
    if optimizer is not None:
        remap_optimizer(optimizer, old_params, model, plan)
    return ThinResult(True, plan, _with_heads_kept("", plan), before, _param_count(model), max_error)


def _with_heads_kept(reason: str, plan: ThinPlan) -> str:
    """The reason, and the zero heads and channels thinning left in place (masked, as the export deletes them)
    and why."""
    notes = []
    for what, found in (("heads", plan.heads_kept), ("channels", plan.means_kept)):
        by_reason: dict[str, list[str]] = {}
        for name, why in found.items():
            by_reason.setdefault(why, []).append(name)
        kept = "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())
        if kept:
            notes.append(f"zero {what} kept in {kept}")
    if not notes:
        return reason
    note = "; ".join(notes)
    return f"{reason} ({note})" if reason else note


def rebuild(spec: ModelSpec, plan: ThinPlan) -> nn.Module:
    """The dense model of `spec` cut to the plan's shapes (fresh values): what a thinned state_dict loads into."""
    model = build_model(spec)
    apply_plan(model, plan)
    return model
