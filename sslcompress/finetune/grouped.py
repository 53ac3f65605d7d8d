"""Grouped convolutions (ResNeXt, AlexNet's group=2): which of their channels an export deletes.

A conv with G > 1 groups and several input channels per group is G convs side by side: group g reads
input channels [g*I, (g+1)*I) and writes outputs [g*O, (g+1)*O). Cut, it must still be one conv, so every
group it keeps keeps as many inputs and as many outputs as the others. The ONNX surgery does exactly this
(surgery/ops/layers.py, Conv.settle): where the dead channels fall unevenly, the groups that lost more keep
some of theirs, the strongest first (ties: the lowest position), until all are equal; a group left with no
input and no output goes whole, and `groups` becomes the number of groups kept. This module applies the
same rule to the torch side, so that the MACs the counter predicts are those of the cut ONNX model.

An input channel of a grouped conv is read only by the outputs of its own group: it is needed while one of
those outputs is kept and reads it through a nonzero weight fibre (the surgery's backward rule).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .structure import Layer, ModelStructure


def grouped_layers(st: ModelStructure) -> list[Layer]:
    return [lay for lay in st.layers.values() if lay.grouped]


def grouped_readers(st: ModelStructure) -> dict[int, list[tuple[Layer, int]]]:
    """Root id -> every (grouped conv, input position) that reads it."""
    out: dict[int, list[tuple[Layer, int]]] = defaultdict(list)
    for lay in grouped_layers(st):
        for pos, i in enumerate(lay.in_ids):
            out[st.root(i)].append((lay, pos))
    return dict(out)


def _sizes(lay: Layer) -> tuple[int, int]:
    """(outputs, inputs) per group."""
    return lay.weight_shape[0] // lay.groups, lay.weight_shape[1]


def reads(lay: Layer, weight: torch.Tensor, pos: int, dead: set[int], root) -> bool:
    """Whether a kept output of its group reads input `pos` through a nonzero weight fibre."""
    per_out, per_in = _sizes(lay)
    g, j = divmod(pos, per_in)
    rows = [n for n in range(g * per_out, (g + 1) * per_out) if root(lay.out_ids[n]) not in dead]
    return bool(rows) and bool(weight[rows, j].any())


def kept_by_group(lay: Layer, dead: set[int], root) -> tuple[list[list[int]], list[list[int]]]:
    """Per group, the kept local output positions and the kept local input positions."""
    per_out, per_in = _sizes(lay)
    outs = [[n for n in range(per_out) if root(lay.out_ids[g * per_out + n]) not in dead] for g in range(lay.groups)]
    ins = [[j for j in range(per_in) if root(lay.in_ids[g * per_in + j]) not in dead] for g in range(lay.groups)]
    return outs, ins


def active_groups(outs: list[list[int]], ins: list[list[int]]) -> list[int]:
    """The groups a cut keeps: those with a kept input or output."""
    return [g for g, (o, i) in enumerate(zip(outs, ins)) if o or i]


def _strongest(candidates: list[int], strength: list[float], n: int) -> list[int]:
    return sorted(candidates, key=lambda p: (-strength[p], p))[:n]


def settle(st: ModelStructure, params: dict[str, torch.Tensor], dead: set[int], removed: set[str]) -> set[int]:
    """Roots of `dead` that stay so that every grouped conv (not `removed`) keeps equal groups.

    A root kept for one conv is kept wherever it flows, which may unbalance another grouped conv: the
    rule is applied again until no conv asks for more, as the surgery does.
    """
    kept: set[int] = set()
    while True:
        more: set[int] = set()
        still_dead = dead - kept
        for lay in grouped_layers(st):
            if lay.name not in removed:
                more |= _equalize(lay, params[f"{lay.name}.weight"].detach(), still_dead, st.root)
        if not more:
            return kept
        kept |= more


def _equalize(lay: Layer, weight: torch.Tensor, dead: set[int], root) -> set[int]:
    """Dead roots this conv keeps: in each kept group, the strongest dead channels up to the fullest group."""
    per_out, per_in = _sizes(lay)
    outs, ins = kept_by_group(lay, dead, root)
    active = active_groups(outs, ins)
    if not active:
        return set()  # a wholly dead conv: the cascade's business
    n_out = max(1, max(len(outs[g]) for g in active))
    n_in = max(1, max(len(ins[g]) for g in active))
    mag = weight.abs().double().reshape(weight.shape[0], per_in, -1).sum(2)  # (out, in per group)
    more: set[int] = set()
    for g in active:
        block = mag[g * per_out:(g + 1) * per_out]
        lost_out = [n for n in range(per_out) if n not in outs[g]]
        for n in _strongest(lost_out, block.sum(1).tolist(), n_out - len(outs[g])):
            more.add(root(lay.out_ids[g * per_out + n]))
        lost_in = [j for j in range(per_in) if j not in ins[g]]
        for j in _strongest(lost_in, block.sum(0).tolist(), n_in - len(ins[g])):
            more.add(root(lay.in_ids[g * per_in + j]))
    return more


def kept_weight(lay: Layer, weight: torch.Tensor, dead: set[int], root) -> torch.Tensor:
    """The weight the cut conv keeps: per kept group its kept filters over its kept input channels."""
    outs, ins = kept_by_group(lay, dead, root)
    per_out, per_in = _sizes(lay)
    blocks = [weight[[g * per_out + n for n in outs[g]]][:, ins[g]] for g in active_groups(outs, ins)]
    return torch.cat(blocks) if blocks else weight[:0]
