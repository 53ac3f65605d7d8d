"""The pass that deletes dead channels: every channel no one needs, wherever it flows.

Two analyses meet here. The coupling (coupling.py) gives each channel an id shared by every
value it flows through; the needs (`needed_channels`), propagated backward by the op rules, say
which channels of which values some output depends on. A ZERO channel is never needed: it
contributes nothing to any reader, zero padding included. An id is dead when no value that
carries it needs it and nothing pins it; deleting it removes the filter that writes it, the
parameters that follow it and the input fibre that reads it, so the pruned graph computes what
the original computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .analysis import Analysis, analysis_of
from .axes import reads_on_its_axis
from .channels import ZERO, Channels
from .coupling import Coupling
from .ops import rule_for
from .ops.base import drop_unused_constants


@dataclass(frozen=True)
class PruneResult:
    channels_removed: int  # channel ids deleted
    tensors_changed: int
    blocked: dict[str, int] = field(default_factory=dict)  # wall (with its reason) -> removable ids it kept
    zeros_kept: dict[str, int] = field(default_factory=dict)  # why -> ZERO channels found but not deleted


@dataclass(frozen=True)
class DeadChannels:
    """Keep-mask (True = keep) per value with a channel axis; ids deleted; what walls kept."""

    keep: dict[ir.Value, np.ndarray]
    n_dead: int
    blocked: dict[str, int]
    zeros_kept: dict[str, int]


def needed_channels(model: ir.Model, states: dict[ir.Value, Channels], c: Coupling) -> dict[ir.Value, np.ndarray]:
    """Per value with channel ids: which channels some graph output depends on. An analysis."""
    needed = {v: np.zeros(len(ids), bool) for v, ids in c.ids.items()}
    for v in model.graph.outputs:
        if v in needed:
            needed[v][:] = True
    for node in reversed(list(model.graph)):
        rule = rule_for(node)
        if rule is None or node in c.walls:
            wants: list[np.ndarray | None] = [None] * len(node.inputs)
        else:
            outs = [needed.get(v) if v is not None else None for v in node.outputs]
            fits = reads_on_its_axis(rule, node)
            ins = [(states.get(v, _live(v, c)) if ok else None) if v is not None else None
                   for v, ok in zip(node.inputs, fits, strict=True)]
            wants = rule.backward(node, outs, ins)
            wants = [w if ok else None for w, ok in zip(wants, fits, strict=False)]
        for v, want in zip(node.inputs, wants, strict=False):
            if v is None or v not in needed:
                continue
            n = len(needed[v])
            want = np.ones(n, bool) if want is None or len(want) != n else want
            st = states.get(v)
            needed[v] |= want & (st.state != ZERO) if st is not None else want
    return needed


def _live(v: ir.Value, c: Coupling) -> Channels | None:
    return Channels.live(len(c.ids[v])) if v in c.ids else None


# The layers whose widths the runtime's kernels like in steps: their data input and their output.
ALIGNED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def dead_channels(model: ir.Model, analysis: Analysis | None = None, align: int | None = None) -> DeadChannels:
    """What the cut deletes. With `align`, a layer's input and output widths are left at multiples of it
    (or their full width) by keeping some of their dead channels: those compute what they computed in the
    uncut model (zeros, or what no output reads), so the cut stays exact and its kernels run on the
    runtime's blocked paths."""
    if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ValueError(f"align must be a positive integer, got {align!r}")
    analysis = analysis_of(model, analysis)
    states, c = analysis.states, analysis.coupling
    needed = needed_channels(model, states, c)
    all_roots = {c.root(i) for i in range(len(c.parent))}
    wanted: set[int] = set()
    for v, need in needed.items():
        wanted.update(c.roots_of(v)[need].tolist())
    pinned = set(c.pinned)  # union-find keeps each reason on its class's root
    blocked: dict[str, int] = {}
    for root in (all_roots - wanted) & pinned:
        blocked[c.pinned[root]] = blocked.get(c.pinned[root], 0) + 1
    alive = wanted | pinned
    settled: dict[int, str] = {}  # root -> why a rule's settle kept it
    # Never empty a value (ONNX has no zero-channel conv): a wholly dead one keeps one channel.
    # A dead residual branch is depth's business; elsewhere a dead value means a cut network. A part of a
    # Split that nothing reads is the exception: its size goes to 0, and its channels with it.
    while True:
        emptied = [v for v in c.ids if not np.isin(c.roots_of(v), list(alive)).any() and not _unread_part(v)]
        if emptied:
            alive.add(int(c.roots_of(emptied[0])[0]))
            continue
        # --- settle hook: rules that can only write some cuts (a grouped Conv keeps its groups equal)
        # keep more channels; a channel kept is kept wherever it flows, so ask again until none asks.
        more = _settle(model, c, alive)
        if not more and align is not None and align > 1:
            more = _aligned(model, c, alive, align)
        if not more:
            break
        for root, why in more.items():
            alive.add(root)
            settled.setdefault(root, why)
    dead = all_roots - alive
    keep = {v: ~np.isin(c.roots_of(v), list(dead)) for v in c.ids}
    return DeadChannels(keep, len(dead), blocked, _zeros_kept(states, c, keep, settled))


def _unread_part(v: ir.Value) -> bool:
    """An output of a Split that nothing reads (the query and key parts of a packed projection whose
    attention runs over one key, a chunk the forward drops). ONNX allows parts of size 0, so it may be
    emptied: the layer that writes it then loses all of its channels, as the count removes them."""
    node = v.producer()
    return node is not None and node.op_type == "Split" and node.domain in ("", "ai.onnx") and not v.uses() \
        and not v.is_graph_output()


def _settle(model: ir.Model, c: Coupling, alive: set[int]) -> dict[int, str]:
    """Roots not yet alive that some rule's ``settle`` wants kept, with the rule's reason."""
    from .ops.base import OpRule

    alive_list = list(alive)
    more: dict[int, str] = {}
    for node in model.graph:
        rule = rule_for(node)
        if rule is None or type(rule).settle is OpRule.settle or node in c.walls:
            continue
        fits = reads_on_its_axis(rule, node)

        def mask(v):
            return np.isin(c.roots_of(v), alive_list) if v is not None and v in c.ids else None
        keep_in = [mask(v) if ok else None for v, ok in zip(node.inputs, fits, strict=True)]
        keep_out = [mask(v) for v in node.outputs]
        answer = rule.settle(node, keep_in, keep_out)
        if answer is None:
            continue
        for values, masks in ((node.inputs, answer.inputs), (node.outputs, answer.outputs)):
            for v, m in zip(values, masks, strict=False):
                if v is None or m is None or v not in c.ids:
                    continue
                for root in c.roots_of(v)[m].tolist():
                    if root not in alive:
                        more.setdefault(int(root), f"{node.op_type} {node.name or node.outputs[0].name} "
                                                   f"({answer.reason})")
    return more


def _aligned(model: ir.Model, c: Coupling, alive: set[int], align: int) -> dict[int, str]:
    """Dead roots to keep so that every aligned layer's input and output width is a multiple of `align`
    (capped at the full width), with the reason; the first dead channels of a value are the ones kept."""
    more: dict[int, str] = {}
    why = f"widths kept at multiples of {align} (align)"
    seen: set[ir.Value] = set()
    for node in model.graph:
        if node.op_type not in ALIGNED_OPS or node in c.walls:
            continue
        for v in (node.inputs[0] if node.inputs else None, node.outputs[0]):
            if v is None or v in seen or v not in c.ids:
                continue
            seen.add(v)
            roots = c.roots_of(v).tolist()
            kept = [r in alive or r in more for r in roots]
            width = sum(kept)
            goal = min(len(roots), -(-width // align) * align)
            for root, k in zip(roots, kept, strict=True):
                if width >= goal:
                    break
                if not k and root not in more:
                    more[root] = why
                    width += roots.count(root)
    return more


def _zeros_kept(states: dict[ir.Value, Channels], c: Coupling, keep: dict[ir.Value, np.ndarray],
                settled: dict[int, str] | None = None) -> dict[str, int]:
    """ZERO channels of weighted layers' outputs that stay, counted by why (the pin's reason, a rule's
    settle, or a channel some reader needs, or the last channel of a value, which is never emptied)."""
    out: dict[str, int] = {}
    for v, st in states.items():
        node = v.producer()
        if node is None or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or v not in c.ids:
            continue
        zero_kept = (st.state == ZERO) & keep[v]
        for i in np.nonzero(zero_kept)[0]:
            root = c.root(c.ids[v][i])
            why = c.pinned.get(root) or (settled or {}).get(root) or \
                "needed by a reader, or the last channel of a value that would be emptied"
            out[why] = out.get(why, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def prune_dead_channels(model: ir.Model, analysis: Analysis | None = None, align: int | None = None) -> PruneResult:
    """Delete the dead channels of the model, in place (with `align`, see dead_channels)."""
    analysis = analysis_of(model, analysis)
    dead = dead_channels(model, analysis, align)
    changed = 0
    if dead.n_dead:
        # Every node's masks first: a rewrite may insert a node and rename the values after it.
        plans = []
        for node in list(model.graph):
            fits = reads_on_its_axis(rule_for(node), node)
            plans.append((node, [dead.keep.get(v) if v is not None and ok else None
                                 for v, ok in zip(node.inputs, fits, strict=True)],
                          [dead.keep.get(v) if v is not None else None for v in node.outputs]))
        for node, keep_in, keep_out in plans:
            changed += _rewrite(model.graph, node, keep_in, keep_out)
        drop_unused_constants(model.graph)
        analysis.invalidate()
    return PruneResult(dead.n_dead, changed, dead.blocked, dead.zeros_kept)


def _rewrite(graph: ir.Graph, node: ir.Node, keep_in: list[np.ndarray | None],
             keep_out: list[np.ndarray | None]) -> int:
    if all(k is None or k.all() for k in keep_in + keep_out):
        return 0
    rule = rule_for(node)
    if rule is None:  # cannot happen: a node without a rule pins all its channels
        raise AssertionError(f"{node.op_type} {node.name} lost channels but has no rule")
    return int(rule.rewrite(graph, node, keep_in, keep_out))
