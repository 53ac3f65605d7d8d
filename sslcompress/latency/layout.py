"""Where ONNX Runtime's CPU provider reorders tensors between its blocked layout (NCHWc) and the plain one, at
the widths a pruning keeps.

ORT's NCHWc transformer runs a conv blocked where its input fills whole channel blocks, or is narrower than one
block (signature.blocked); a blocked conv writes its output blocked (padded to whole blocks). It reads a blocked
input, except a plain conv narrower than one block, which reads the plain layout in place. Where a tensor's
writer and a reader disagree, ORT puts a reorder between them: a ReorderOutput after a blocked writer, or a
ReorderInput before a blocked reader. The dense model of a CNN whose widths fill blocks has none, but a pruned
one pays one wherever a width leaves the blocks or falls below one block: on ResNet-20 at batch 8 with
AVX-512 (a block of 16), a model whose first stage kept 8-14 of its 16 channels spent 10% of its time in 8
ReorderOutputs of 50 us each, which no op's compute figure holds.

Channels here are what the analysis follows (ModelStructure's channel ids): the layers whose outputs share a
root write one tensor space (a residual trunk's convs and its adds), and the layers reading that root at the
same spatial size read from it. Where the writers of a space mix the layouts, the adds between them run plain:
every blocked writer pays a ReorderOutput and every blocked reader a ReorderInput. Each reader of a plain space
is charged its own ReorderInput, though ORT reorders a tensor two convs read (a block's conv and its
downsample) once: a slight over-count where widths leave the blocks at a stage's first block.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..finetune.structure import Layer, ModelStructure
from .signature import blocked, signatures_of


@dataclass(frozen=True)
class Reorder:
    layer: str  # whose input (ReorderInput) or output (ReorderOutput) ORT reorders
    side: str  # "in" | "out"


def writes_blocked(layer: Layer, cin: int, cout: int, block: int) -> bool:
    return blocked(signatures_of(layer)[0], cin, cout, block)


def reads_blocked(layer: Layer, cin: int, cout: int, block: int) -> bool:
    """A blocked conv reads blocks, except a plain one narrower than one block (ORT reads that in place)."""
    return writes_blocked(layer, cin, cout, block) and not (layer.groups == 1 and cin < block)


def _space(structure: ModelStructure, ids: list[int]) -> int | None:
    return structure.root(ids[0]) if ids else None


def reorders(structure: ModelStructure, widths: dict[str, tuple[int, int]], block: int) -> list[Reorder]:
    """The reorders a model needs at the kept (input, output) `widths` of its live layers (a layer missing from
    `widths` is deleted). None where there are no blocks (block 1: the CUDA provider)."""
    if block <= 1:
        return []
    live = {name: lay for name, lay in structure.layers.items() if name in widths}
    writers: dict[tuple, list[str]] = {}
    for name, lay in live.items():
        if lay.kind == "conv":
            writers.setdefault((_space(structure, lay.out_ids), lay.out_hw), []).append(name)
    readers: dict[tuple, list[str]] = {}
    for name, lay in live.items():
        space = _space(structure, lay.in_ids)
        if lay.kind == "conv":
            readers.setdefault((space, lay.in_hw), []).append(name)
            continue
        # A Linear reading a conv's output flattened (more features than the conv has channels) reads it
        # plain; one after a global pool reads one pixel per channel, reordered for next to nothing.
        for (wspace, hw), names in writers.items():
            if wspace == space and len(lay.in_ids) > len(structure.layers[names[0]].out_ids):
                readers.setdefault((wspace, hw), []).append(name)
    out: list[Reorder] = []
    for key in {*writers, *readers}:
        wrote = {n: writes_blocked(live[n], *widths[n], block) for n in writers.get(key, [])}
        want = {n: live[n].kind == "conv" and reads_blocked(live[n], *widths[n], block) for n in readers.get(key, [])}
        space_blocked = bool(wrote) and all(wrote.values())
        if space_blocked:
            if not all(want.values()):
                out += [Reorder(n, "out") for n in wrote]
            continue
        out += [Reorder(n, "out") for n, b in wrote.items() if b]  # a plain add after a blocked writer
        out += [Reorder(n, "in") for n, b in want.items() if b]
    return sorted(out, key=lambda r: (r.layer, r.side))
