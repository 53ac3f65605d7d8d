"""Parameter groups of Structured Sparsity Learning, built from a model's channel structure.

A group is a set of weight slices whose joint L2 norm the group Lasso drives to zero. Groups
follow the graph's coupling (see structure.py): the filter group of a channel owns every slice
that writes that channel (the conv filters and biases of all summands of a residual Add and the
BatchNorm scale and shift of each), so a zero group gives an exactly-zero channel; the channel
group owns every slice that reads it. A neuron group owns both, for a hidden unit between Linear (or 1x1
conv) layers; a head group owns an attention head's rows of q, k and v (of each part of a packed qkv or
in_proj_weight) and its columns of the output projection (see heads.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..group_kinds import KINDS, parse_kinds
from .structure import ModelStructure, analyze

# Axis names of a slice: "out" = dim 0, "in" = dim 1, "fiber" = a column of W.flatten(1)
# (one W[:, c, m, k] of the lowered matrix), "row" = dim 2 of a Conv2d, "col" = the last dim (a Conv2d's dim 3,
# a Conv1d's taps), "all" = the tensor.
AXES = ("out", "in", "fiber", "row", "col", "all")


def axis_dim(axis: str, ndim: int) -> int | None:
    """The dim of a tensor of `ndim` dims that slices along `axis` run on: None for "fiber" and "all" (no one
    dim) and where the tensor has no such dim (a bias has no "in", a Conv1d weight no "row")."""
    if axis == "out":
        return 0 if ndim > 0 else None
    if axis == "in":
        return 1 if ndim > 1 else None
    if axis == "row":
        return 2 if ndim > 3 else None
    if axis == "col":
        return ndim - 1 if ndim > 2 else None
    return None


@dataclass(frozen=True)
class Slice:
    """Positions `index` along `axis` of parameter `param`."""

    param: str
    axis: str
    index: tuple[int, ...]


@dataclass(frozen=True)
class ParamGroup:
    """One group of the group Lasso."""

    name: str
    kind: str
    slices: tuple[Slice, ...]
    size: int  # number of scalar parameters
    cost: int  # multiply-accumulates per sample of the weights it owns
    removable: bool  # whether an export could delete what a zero group frees
    reason: str = ""  # why it is not removable
    layers: tuple[str, ...] = ()  # conv/linear layers it touches
    channel: int | None = None  # root channel id, for filter and channel groups


def build_groups(model: nn.Module, input_shape: tuple[int, ...], kinds: str | tuple[str, ...] = KINDS,
                 structure: ModelStructure | None = None) -> list[ParamGroup]:
    """All groups of the requested kinds, removable or not, in a stable order."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"build_groups takes a torch.nn.Module, got {type(model).__name__}.")
    if (not isinstance(input_shape, (tuple, list)) or not input_shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)):
        raise UnsupportedModelError(f"An input shape must be positive integers, got {input_shape!r}.")
    if isinstance(kinds, (str, tuple, list)):
        kinds = parse_kinds(kinds)
    else:
        raise ConfigError(f"group kinds must be a tuple of names from {', '.join(KINDS)}, got {type(kinds).__name__}.")
    if structure is not None and not isinstance(structure, ModelStructure):
        raise ConfigError(f"structure must be a ModelStructure from analyze() or None, got {type(structure).__name__}.")
    structure = structure or analyze(model, input_shape)
    params = dict(model.named_parameters())
    out: list[ParamGroup] = []
    if "filter" in kinds:
        out += _filter_groups(structure, params)
    if "channel" in kinds:
        out += _channel_groups(structure, params)
    if "shape" in kinds:
        out += _shape_groups(structure, params)
    if "kernel_row" in kinds or "kernel_col" in kinds:
        out += _kernel_line_groups(structure, params, kinds)
    if "depth" in kinds:
        out += _depth_groups(structure, params, model)
    if "neuron" in kinds:
        out += _neuron_groups(structure, params)
    if "head" in kinds:
        out += _head_groups(structure, params)
    return out


def _merge(slices: list[tuple[str, str, int]]) -> tuple[Slice, ...]:
    by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
    for param, axis, i in slices:
        by_key[(param, axis)].append(i)
    return tuple(Slice(p, a, tuple(sorted(ix))) for (p, a), ix in by_key.items())


def _slice_numel(params: dict, s: Slice) -> int:
    shape = tuple(params[s.param].shape)
    total = 1
    for d in shape:
        total *= d
    if s.axis == "all":
        return total
    if s.axis == "fiber":
        return shape[0] * len(s.index)
    d = axis_dim(s.axis, len(shape))
    return total // (shape[d] if d is not None else 1) * len(s.index)


def _group(kind: str, name: str, slices: list[tuple[str, str, int]] | tuple[Slice, ...], params: dict,
           structure: ModelStructure, removable: bool, reason: str = "", channel: int | None = None) -> ParamGroup:
    merged = _merge(slices) if isinstance(slices, list) else slices
    weight_of = {f"{lay.name}.weight": lay for lay in structure.layers.values()}
    size = sum(_slice_numel(params, s) for s in merged)
    cost = sum(_slice_numel(params, s) * weight_of[s.param].macs_per_weight
               for s in merged if s.param in weight_of)
    layers = tuple(dict.fromkeys(weight_of[s.param].name for s in merged if s.param in weight_of))
    return ParamGroup(name, kind, merged, size, cost, removable, reason, layers, channel)


def _producers(structure: ModelStructure, params: dict) -> dict[int, list[tuple[str, str, int]]]:
    prod: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    for lay in structure.layers.values():
        for n, i in enumerate(lay.out_ids):
            r = structure.root(i)
            prod[r].append((f"{lay.name}.weight", "out", n))
            if lay.has_bias:
                prod[r].append((f"{lay.name}.bias", "out", n))
    for norm in structure.norms.values():
        if not norm.affine:
            continue
        for c, i in enumerate(norm.ids):
            r = structure.root(i)
            prod[r].append((f"{norm.name}.weight", "out", c))
            prod[r].append((f"{norm.name}.bias", "out", c))
    for cp in structure.channel_params:
        # GRN's scale and shift: entry c goes with channel c (a zero shift keeps a zero channel zero).
        axis = _param_axis(cp.dim, params[cp.param].dim()) if cp.param in params else None
        for c, i in enumerate(cp.ids):
            if axis is not None:
                prod[structure.root(i)].append((cp.param, axis, c))
    return {r: [s for s in v if s[0] in params] for r, v in prod.items()}


def _param_axis(dim: int, ndim: int) -> str | None:
    """The axis name of a slice along `dim` of a tensor of `ndim` dims (the inverse of axis_dim)."""
    for axis in ("out", "in", "row", "col"):
        if axis_dim(axis, ndim) == dim:
            return axis
    return None


def _consumers(structure: ModelStructure) -> dict[int, list[tuple[str, str, int]]]:
    cons: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    for lay in structure.layers.values():
        if lay.groups != 1:
            # A depthwise conv carries its channel on (its filter is a producer slice); a grouped conv reads a
            # channel through one group's filters only, which is no slice of W[:, c] (see _channel_groups).
            continue
        for pos, i in enumerate(lay.in_ids):
            cons[structure.root(i)].append((f"{lay.name}.weight", "in", pos))
    return cons


def _label(slices: list[tuple[str, str, int]]) -> str:
    first = slices[0]
    layer = first[0].rsplit(".", 1)[0]
    others = {s[0].rsplit(".", 1)[0] for s in slices} - {layer}
    more = f" +{len(others)} coupled" if others else ""
    return f"{layer}[{first[2]}]{more}"


def _filter_groups(structure: ModelStructure, params: dict) -> list[ParamGroup]:
    groups = []
    for r, slices in sorted(_producers(structure, params).items()):
        if not slices:
            continue
        reason = structure.pinned.get(r, "")
        groups.append(_group("filter", f"filter {_label(slices)}", slices, params, structure,
                             removable=not reason, reason=reason, channel=r))
    return groups


def _channel_groups(structure: ModelStructure, params: dict) -> list[ParamGroup]:
    groups = []
    # A grouped conv reads a channel through a fibre of one group's filters, which no slice here holds: a
    # channel it reads too stays while it does, whatever this group's norm.
    grouped_reader = {structure.root(i): lay.name for lay in structure.layers.values() if lay.grouped
                      for i in lay.in_ids}
    # A mean over the channels reads them too, and a nonzero channel changes it: only a zero filter group frees
    # such a channel, never its readers' columns alone.
    mean_reader = structure.mean_reads()
    for r, slices in sorted(_consumers(structure).items()):
        reason = structure.pinned.get(r, "")
        if not reason and r in grouped_reader:
            reason = f"also read by grouped convolution {grouped_reader[r]}"
        if not reason and r in mean_reader:
            reason = f"also read by a mean over the channels in {mean_reader[r]} (which a nonzero channel changes)"
        if reason == "model input":
            continue  # image channels of a conv input: nothing to gain, nothing an export deletes
        layer = slices[0][0].rsplit(".", 1)[0]
        positions = [s[2] for s in slices if s[0] == slices[0][0]]
        label = f"{layer}[:, {positions[0]}]" if len(positions) == 1 else f"{layer}[:, {positions[0]}..{positions[-1]}]"
        others = {s[0] for s in slices} - {slices[0][0]}
        label += f" +{len(others)} coupled" if others else ""
        groups.append(_group("channel", f"channel {label}", slices, params, structure,
                             removable=not reason, reason=reason, channel=r))
    return groups


def _shape_groups(structure: ModelStructure, params: dict) -> list[ParamGroup]:
    groups = []
    for lay in structure.layers.values():
        # A Conv1d's shape columns are none: the export lowers 2-D convs only to a GEMM of their kept columns,
        # so a zero column of a Conv1d would save nothing there (its zero outer taps are kernel_col groups).
        if lay.kind != "conv" or lay.groups != 1 or lay.one_dimensional:
            continue
        _, cin, kh, kw = lay.weight_shape
        if kh * kw == 1:
            continue  # a 1x1 conv's columns are its input channels; channel groups cover them
        for c in range(cin):
            for m in range(kh):
                for k in range(kw):
                    col = (c * kh + m) * kw + k
                    groups.append(_group("shape", f"shape {lay.name}[:, {c}, {m}, {k}]",
                                         [(f"{lay.name}.weight", "fiber", col)], params, structure, True))
    return groups


def _kernel_line_groups(structure: ModelStructure, params: dict, kinds: tuple[str, ...]) -> list[ParamGroup]:
    groups = []
    for lay in structure.layers.values():
        if lay.kind != "conv" or lay.groups != 1:
            continue
        kh, kw = lay.kernel
        if "kernel_row" in kinds and kh > 1:
            for m in range(kh):
                groups.append(_group("kernel_row", f"kernel_row {lay.name}[:, :, {m}, :]",
                                     [(f"{lay.name}.weight", "row", m)], params, structure, True))
        if "kernel_col" in kinds and kw > 1:
            for k in range(kw):
                where = f"[:, :, {k}]" if lay.one_dimensional else f"[:, :, :, {k}]"
                groups.append(_group("kernel_col", f"kernel_col {lay.name}{where}",
                                     [(f"{lay.name}.weight", "col", k)], params, structure, True))
    return groups


def _depth_groups(structure: ModelStructure, params: dict, model: nn.Module) -> list[ParamGroup]:
    groups = []
    for br in structure.branches:
        slices = tuple(Slice(f"{m}.{pname}", "all", (0,))
                       for m in br.modules for pname, _ in model.get_submodule(m).named_parameters(recurse=False))
        groups.append(_group("depth", f"depth {_branch_name(br, model)}", slices, params, structure, True))
    return groups


def _branch_name(br, model: nn.Module) -> str:
    """The module that holds the branch (a ResNet block, its projection shortcut beside the branch); where that
    module also holds what runs before the branch (a transformer block's attention before its MLP), the
    branch's own parts of it too: blocks.3[norm2,mlp]."""
    prefix = _common_prefix(br.modules)
    if not prefix:
        return br.add_node
    children = list(model.get_submodule(prefix).named_children())
    inside = {m[len(prefix) + 1:].split(".")[0] for m in br.modules if m != prefix}
    beside = {m[len(prefix) + 1:].split(".")[0] for m in br.shortcut if m.startswith(prefix + ".")}
    before = [name for name, child in children
              if name not in inside | beside and any(True for _ in child.parameters())]
    if not before:
        return prefix
    return f"{prefix}[{','.join(name for name, _ in children if name in inside)}]"


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    return ".".join(common)


def _pointwise(lay) -> bool:
    """A layer that maps features to features one position at a time: a Linear or an ungrouped 1x1 conv."""
    return lay.kind == "linear" or (lay.kind == "conv" and lay.groups == 1 and lay.kernel == (1, 1))


def _neuron_groups(structure: ModelStructure, params: dict) -> list[ParamGroup]:
    """One hidden unit of an MLP block: the rows (and biases, and any norm's scale and shift) that write it
    and the columns that read it, in Linear or 1x1-conv layers only. A zero group is an exactly-zero unit
    that nothing reads, so the export deletes it from both layers."""
    pointwise = {f"{lay.name}.weight" for lay in structure.layers.values() if _pointwise(lay)}
    layer_params = {f"{lay.name}.{p}" for lay in structure.layers.values() for p in ("weight", "bias")}
    consumers = _consumers(structure)
    groups = []
    for r, written in sorted(_producers(structure, params).items()):
        read = consumers.get(r, [])
        weights = [s[0] for s in written + read if s[0] in layer_params and s[0].endswith(".weight")]
        if not written or not read or not all(w in pointwise for w in weights):
            continue
        slices = written + read
        reason = structure.pinned.get(r, "")
        groups.append(_group("neuron", f"neuron {_label(written)}", slices, params, structure,
                             removable=not reason, reason=reason, channel=r))
    return groups


def head_slices(att, h: int) -> list[tuple[str, str, int]]:
    """Head h of an attention (in grouped-query attention, key/value head h with its query heads): its rows of
    q, k and v (and biases; every part of a packed projection) and its columns of the output projection."""
    rows = [(param, "out", r) for param in att.row_params for r in att.rows([h], param)]
    return rows + [(att.col_param, "in", c) for c in att.cols([h])]


def _head_groups(structure: ModelStructure, params: dict) -> list[ParamGroup]:
    """One attention head each (see heads.py), or one key/value head with the query heads that read it; a zero
    head adds nothing to the output, so it goes whole."""
    groups = []
    for att in structure.heads:
        for h in range(att.groups):
            slices = [s for s in head_slices(att, h) if s[0] in params]
            group = _group("head", f"head {att.name}[{h}]", slices, params, structure, True)
            # nn.MultiheadAttention's projections are no layers of the analysis: the attention stands for them,
            # so its heads compete with each other and not with another attention's (Sparsifier._pools).
            layers = group.layers or (att.name,)
            groups.append(ParamGroup(group.name, group.kind, group.slices, group.size,
                                     group.cost + att.product_macs, True, "", layers))
    return groups
