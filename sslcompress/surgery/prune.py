"""The pass that deletes dead channels: every channel no one needs, wherever it flows.

Two analyses meet here. The coupling (coupling.py) gives each channel an id shared by every
tensor it flows through; the needs (`needed_channels`), propagated backward by the op rules, say
which channels of which tensors some output depends on. A ZERO channel is never needed: it
contributes nothing to any reader, zero padding included. An id is dead when no tensor that
carries it needs it and nothing pins it; deleting it removes the filter that writes it, the
parameters that follow it and the input fibre that reads it, so the pruned graph computes what
the original computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import SurgeryError
from .channels import ZERO, Channels, analyze
from .coupling import Coupling, couple
from .ops import rule_for
from .ops.base import drop_unused_constants


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    channels_removed: int  # channel ids deleted
    tensors_changed: int
    blocked: dict[str, int] = field(default_factory=dict)  # wall -> removable ids it kept


@dataclass(frozen=True)
class DeadChannels:
    """Keep-mask (True = keep) per value with a channel axis; ids deleted; what walls kept."""

    keep: dict[str, np.ndarray]
    n_dead: int
    blocked: dict[str, int]


def needed_channels(model: ir.Model, states: dict[str, Channels], c: Coupling) -> dict[str, np.ndarray]:
    """Per value with channel ids: which channels some graph output depends on. An analysis."""
    needed = {name: np.zeros(len(ids), bool) for name, ids in c.ids.items()}
    for v in model.graph.outputs:
        if v.name in needed:
            needed[v.name][:] = True
    for node in reversed(list(model.graph)):
        rule = rule_for(node)
        if rule is None or node in c.walls:
            wants: list[np.ndarray | None] = [None] * len(node.inputs)
        else:
            outs = [needed.get(v.name) if v is not None else None for v in node.outputs]
            ins = [states.get(v.name, _live(v, c)) if v is not None else None for v in node.inputs]
            wants = rule.backward(node, outs, ins)
        for v, want in zip(node.inputs, wants, strict=False):
            if v is None or v.name not in needed:
                continue
            n = len(needed[v.name])
            want = np.ones(n, bool) if want is None or len(want) != n else want
            st = states.get(v.name)
            needed[v.name] |= want & (st.state != ZERO) if st is not None else want
    return needed


def _live(v: ir.Value, c: Coupling) -> Channels | None:
    return Channels.live(len(c.ids[v.name])) if v.name in c.ids else None


def dead_channels(model: ir.Model) -> DeadChannels:
    states = analyze(model)
    c = couple(model)
    needed = needed_channels(model, states, c)
    all_roots = {c.root(i) for i in range(len(c.parent))}
    wanted: set[int] = set()
    for name, need in needed.items():
        wanted.update(c.roots_of(name)[need].tolist())
    pinned = set(c.pinned)  # union-find keeps each reason on its class's root
    blocked: dict[str, int] = {}
    for root in (all_roots - wanted) & pinned:
        blocked[c.pinned[root]] = blocked.get(c.pinned[root], 0) + 1
    alive = wanted | pinned
    # Never empty a tensor (ONNX has no zero-channel conv): a wholly dead one keeps one channel.
    # A dead residual branch is depth's business; elsewhere a dead tensor means a cut network.
    while True:
        emptied = [name for name in c.ids if not np.isin(c.roots_of(name), list(alive)).any()]
        if not emptied:
            break
        alive.add(int(c.roots_of(emptied[0])[0]))
    dead = all_roots - alive
    keep = {name: ~np.isin(c.roots_of(name), list(dead)) for name in c.ids}
    return DeadChannels(keep, len(dead), blocked)


def dead_masks(model: ir.Model) -> tuple[dict[str, np.ndarray], int]:
    d = dead_channels(model)
    return d.keep, d.n_dead


def prune_dead_channels(proto: onnx.ModelProto) -> PruneResult:
    """A new model without its dead channels."""
    model = ir.serde.deserialize_model(proto)
    dead = dead_channels(model)
    changed = 0
    if dead.n_dead:
        # Every node's masks first: a rewrite may insert a node and rename the values after it.
        plans = [(node, [dead.keep.get(v.name) if v is not None else None for v in node.inputs],
                  [dead.keep.get(v.name) if v is not None else None for v in node.outputs])
                 for node in list(model.graph)]
        for node, keep_in, keep_out in plans:
            changed += _rewrite(model.graph, node, keep_in, keep_out)
        drop_unused_constants(model.graph)
    out = ir.serde.serialize_model(model)
    # Shapes of every intermediate tensor changed: drop them and infer again.
    del out.graph.value_info[:]
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise SurgeryError(f"Pruning produced a model whose shapes do not agree ({exc}); please report this model.") from exc
    return PruneResult(out, dead.n_dead, changed, dead.blocked)


def _rewrite(graph: ir.Graph, node: ir.Node, keep_in: list[np.ndarray | None],
             keep_out: list[np.ndarray | None]) -> int:
    if all(k is None or k.all() for k in keep_in + keep_out):
        return 0
    rule = rule_for(node)
    if rule is None:  # cannot happen: a node without a rule pins all its channels
        raise AssertionError(f"{node.op_type} {node.name} lost channels but has no rule")
    return int(rule.rewrite(graph, node, keep_in, keep_out))
