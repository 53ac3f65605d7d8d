"""One MAC and parameter counter: dense, and after every removal the zeros in the weights allow.

"After" means what an exact export can delete: channels whose filter group or channel group is
zero (and not pinned by the graph), residual branches whose parameters are all zero, outer
kernel rows and columns that are zero across the kept filters, attention heads whose weights are all
zero (with their share of the attention products, which count as the ONNX report counts MatMuls). Two MAC figures are reported per
conv: `macs_after` counts the smaller dense Conv (channels x kernel extent), `macs_gemm_after`
the paper's measure, the lowered GEMM with zero columns removed too (what filter-shape sparsity
buys when the export lowers the conv to an im2col of kept columns).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import grouped
from . import heads as attention_heads
from .groups import ParamGroup, Slice, axis_dim, build_groups
from .structure import ModelStructure, analyze


@dataclass(frozen=True)
class LayerCount:
    name: str
    kind: str  # "conv" | "linear"
    filters: tuple[int, int]  # kept, total (output channels / features)
    channels: tuple[int, int]  # kept, total (input channels / features)
    kernel: tuple[int, int]  # kernel size before
    kernel_after: tuple[int, int]  # extent of nonzero rows / columns after
    columns: tuple[int, int]  # nonzero columns of the lowered weight among kept channels, total
    macs: int
    macs_after: int
    macs_gemm_after: int
    params: int
    params_after: int
    removed: bool  # deleted whole (inside a zero residual branch or no live output)


@dataclass(frozen=True)
class ModelCount:
    layers: tuple[LayerCount, ...]
    macs: int
    macs_after: int
    macs_gemm_after: int
    params: int  # every parameter of the model
    params_after: int
    blocks_removed: tuple[str, ...]
    blocks_total: int
    dead_channels: int  # channel ids an export deletes
    heads: tuple[tuple[str, int, int], ...] = ()  # per attention module: heads kept, heads it had

    @property
    def macs_fraction(self) -> float:
        return self.macs_after / self.macs if self.macs else 1.0

    @property
    def macs_gemm_fraction(self) -> float:
        return self.macs_gemm_after / self.macs if self.macs else 1.0

    @property
    def macs_emptied(self) -> int:
        """The MACs of the layers the count removes whole (every weight zero, or nothing they write read)."""
        return sum(lay.macs for lay in self.layers if lay.macs_after == 0)

    def layer(self, name: str) -> LayerCount:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)


@dataclass(frozen=True)
class Removal:
    """What deleting the zero groups removes: root channel ids, layers, residual branches and their modules."""

    channels: frozenset[int]
    layers: frozenset[str]
    blocks: tuple[str, ...]
    modules: frozenset[str]
    heads: tuple[tuple[str, tuple[int, ...]], ...] = ()  # per attention (its output projection), heads deleted

    def head_cuts(self, structure: ModelStructure) -> tuple[dict[str, set[int]], dict[str, set[int]], int]:
        """Rows cut from each q/k/v Linear, columns cut from each output projection, and the attention
        products' MACs that go with the deleted heads."""
        rows: dict[str, set[int]] = {}
        cols: dict[str, set[int]] = {}
        saved = 0
        by_proj = {att.proj: att for att in structure.heads}
        for proj, gone in self.heads:
            att = by_proj[proj]
            if proj in self.modules:
                continue  # in a deleted branch: its products go with the branch (below)
            for lin in att.row_layers:
                rows.setdefault(lin, set()).update(att.rows(gone, lin))
            cols.setdefault(proj, set()).update(att.cols(gone))
            saved += att.product_macs * len(gone)
        return rows, cols, saved

    def branch_products(self, structure: ModelStructure) -> int:
        """The MACs of the ops that are no layers (an attention's products) inside the deleted branches."""
        return sum(br.product_macs for br in structure.branches if br.modules and set(br.modules) <= self.modules)


class Counter:
    """Counts a model repeatedly (every epoch) without re-tracing it."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], structure: ModelStructure | None = None):
        self.model = model
        self.structure = structure or analyze(model, input_shape)
        self.params = dict(model.named_parameters())
        groups = build_groups(model, input_shape, ("filter", "channel", "depth"), self.structure)
        self._filters = [g for g in groups if g.kind == "filter" and g.removable]
        self._channels = [g for g in groups if g.kind == "channel" and g.removable]
        self._depth = [g for g in groups if g.kind == "depth"]
        # Every reader of an unpinned channel: its channel group's fibres (removable or not: a channel a grouped
        # conv reads too is not removed by its channel group alone) and the grouped convs that read it.
        self._read_by = {g.channel: g for g in groups if g.kind == "channel" and g.channel not in self.structure.pinned}
        self._grouped_reads = {r: v for r, v in grouped.grouped_readers(self.structure).items()
                               if r not in self.structure.pinned}
        # Channels no layer reads and nothing pins (the part of a split that the forward drops): the surgery
        # deletes them, since no output needs them.
        st = self.structure
        read = {st.root(i) for lay in st.layers.values() if not lay.carries_channels for i in lay.in_ids}
        # A mean over the channels reads them as a layer does (a nonzero channel changes it), and no weight of
        # its own can stop it reading one.
        self._mean_read = frozenset(st.mean_reads())
        read |= self._mean_read
        self._unread = frozenset(r for r in st.roots() if r not in read and r not in st.pinned)
        # Channel ids are fixed once traced: each layer's output and input roots, looked up once.
        self._out_roots = {n: tuple(st.root(i) for i in lay.out_ids) for n, lay in st.layers.items()}
        self._in_roots = {n: tuple(st.root(i) for i in lay.in_ids) for n, lay in st.layers.items()}
        self._slices = _SliceTable(self._depth + self._filters + self._channels + list(self._read_by.values()))
        self._depth_alive = self._slices.groups_alive(self._depth)
        self._filters_alive = self._slices.groups_alive(self._filters)
        self._channels_alive = self._slices.groups_alive(self._channels)
        # Per read channel: the module of each fibre that reads it, and the fibre's slice number.
        self._fibres = {r: tuple((s.param.rsplit(".", 1)[0], self._slices.number[s]) for s in g.slices)
                        for r, g in self._read_by.items()}

    @torch.no_grad()
    def count(self) -> ModelCount:
        st = self.structure
        gone = self.removal()
        dead, removed_layers, blocks_removed, removed_modules = gone.channels, gone.layers, gone.blocks, gone.modules
        rows, cols, products_saved = gone.head_cuts(st)
        products_saved += gone.branch_products(st)
        layer_counts = [self._count_layer(lay, dead, removed_layers, rows.get(lay.name, set()),
                                          cols.get(lay.name, set())) for lay in st.layers.values()]
        params_total = sum(p.numel() for p in self.params.values())
        params_after = params_total - sum(lc.params - lc.params_after for lc in layer_counts)
        params_after -= self._norm_params_removed(dead, removed_modules)
        return ModelCount(
            layers=tuple(layer_counts),
            macs=sum(lc.macs for lc in layer_counts) + st.matmul_macs,
            macs_after=sum(lc.macs_after for lc in layer_counts) + st.matmul_macs - products_saved,
            macs_gemm_after=sum(lc.macs_gemm_after for lc in layer_counts) + st.matmul_macs - products_saved,
            params=params_total,
            params_after=params_after,
            blocks_removed=tuple(blocks_removed),
            blocks_total=len(self._depth),
            dead_channels=len(dead),
            heads=self._heads_kept(gone),
        )

    def _heads_kept(self, gone: Removal) -> tuple[tuple[str, int, int], ...]:
        deleted = dict(gone.heads)
        return tuple((att.name, 0 if att.proj in gone.modules else  # in a deleted branch: no head is left
                      att.num_heads - att.per_group * len(deleted.get(att.proj, ())), att.num_heads)
                     for att in self.structure.heads)

    def removal(self, *, equal_groups: bool = True) -> Removal:
        """What the export deletes, by the weights as they are now: channel ids (zero filters, unread channels,
        and the cascade), layers, and residual branches. With `equal_groups` off, dead channels a grouped conv
        would keep to keep its groups equal are in too (thinning picks its own, see thin._align_grouped)."""
        st, params = self.structure, self.params
        alive = self._slices.alive(params)
        removed_modules: set[str] = set()
        blocks_removed = []
        for g, live in zip(self._depth, self._depth_alive(alive)):
            if not live:
                blocks_removed.append(g.name.removeprefix("depth "))
                removed_modules.update(s.param.rsplit(".", 1)[0] for s in g.slices)
        dead: set[int] = {g.channel for g, live in zip(self._filters, self._filters_alive(alive)) if not live}
        dead |= {g.channel for g, live in zip(self._channels, self._channels_alive(alive)) if not live}
        nz = alive.tolist()
        dead |= self._unread
        removed_layers = self._removed_layers(dead, removed_modules)
        # Cascade: a layer with no live output is deleted, so what only it read is unused too.
        while True:
            newly = {r for r in self._read_by.keys() | self._grouped_reads.keys()
                     if r not in dead and not self._read(r, dead, removed_layers, nz)}
            if not newly:
                # A branch whose last layer reads only dead channels adds a constant per channel (that layer's
                # bias, through its norm): the surgery adds the constant instead and deletes the branch
                # (surgery/depth.py), and what only the branch read is unused too.
                constant = self._constant_branches(dead, removed_layers, removed_modules)
                if not constant:
                    break
                for branch in constant:
                    removed_modules.update(branch.modules)
            dead |= newly
            removed_layers = self._removed_layers(dead, removed_modules)
        # A grouped conv keeps its groups equal: some dead channels stay (and may keep a layer).
        if equal_groups:
            dead -= grouped.settle(st, params, dead, removed_layers)
        removed_layers = self._removed_layers(dead, removed_modules)
        # A kept channel keeps its writers, which may read only dead channels in turn.
        while kept := self._last_inputs(dead, removed_layers):
            dead -= kept
            removed_layers = self._removed_layers(dead, removed_modules)
        return Removal(frozenset(dead), frozenset(removed_layers), tuple(blocks_removed), frozenset(removed_modules),
                       self._dead_heads())

    def _head_is_zero(self, att, h: int) -> bool:
        return attention_heads.is_zero(att, self.params, h)

    def _dead_heads(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Per attention, the heads whose weights are all zero, less the last of them where every head is."""
        out = []
        for att in self.structure.heads:
            gone = [h for h in range(att.groups) if self._head_is_zero(att, h)]
            if len(gone) == att.groups:
                # A layer keeps a channel (see _last_inputs), an attention a head: thinning never empties it.
                # The budget's ranking never zeroes an attention's last head either (Sparsifier._ranked).
                gone = gone[:-1]
            if gone:
                out.append((att.proj, tuple(gone)))
        return tuple(out)

    def _last_inputs(self, dead: set[int], removed_layers: set[str]) -> set[int]:
        """Channels a layer that stays needs although they are dead: one whose every input is dead (a conv
        after a layer whose filters are all zero, its output then its bias) still reads a tensor, and the
        surgery never empties a value, so it keeps the last channel, and that channel's writers with it."""
        st = self.structure
        keep = set()
        for lay in st.layers.values():
            if lay.name in removed_layers or lay.carries_channels or not lay.in_ids:
                continue
            roots = self._in_roots[lay.name]
            if all(r in dead for r in roots):
                keep.add(roots[-1])
        return keep

    def _constant_branches(self, dead: set[int], removed_layers: set[str], removed_modules: set[str]) -> list:
        """The residual branches still there whose last layer is there and reads only dead channels."""
        st, out = self.structure, []
        for branch in st.branches:
            layers = [m for m in branch.modules if m in st.layers]
            if not layers or set(branch.modules) <= removed_modules or layers[-1] in removed_layers:
                continue
            if all(r in dead for r in self._in_roots[layers[-1]]):
                out.append(branch)
        return out

    def _removed_layers(self, dead: set[int], removed_modules: set[str]) -> set[str]:
        """Layers inside a zero residual branch, and layers with no live output."""
        st = self.structure
        return {n for n, lay in st.layers.items()
                if n in removed_modules or all(r in dead for r in self._out_roots[n])}

    def _read(self, r: int, dead: set[int], removed_layers: set[str], nz: list[bool]) -> bool:
        """Whether a layer still there reads channel `r` through a nonzero weight fibre (`nz`: per slice
        number, whether it holds a nonzero)."""
        params, st = self.params, self.structure
        if r in self._mean_read:
            return True
        if any(module not in removed_layers and nz[k] for module, k in self._fibres.get(r, ())):
            return True
        return any(lay.name not in removed_layers
                   and grouped.reads(lay, params[f"{lay.name}.weight"].detach(), pos, dead, st.root)
                   for lay, pos in self._grouped_reads.get(r, ()))

    @torch.no_grad()
    def nonzeros_after(self) -> dict[str, int]:
        """Nonzero weights each layer keeps once its dead channels are deleted, by weight name: what the
        compact model holds (an unstructured model at the same sparsity keeps as many)."""
        gone = self.removal()
        dead, removed_layers = gone.channels, gone.layers
        st, out = self.structure, {}
        for lay in st.layers.values():
            name = f"{lay.name}.weight"
            w = self.params[name].detach()
            if lay.name in removed_layers:
                out[name] = 0
                continue
            keep_out = [n for n, i in enumerate(lay.out_ids) if st.root(i) not in dead]
            if lay.carries_channels:  # depthwise: rows only
                out[name] = int(w[keep_out].count_nonzero())
                continue
            if lay.grouped:
                out[name] = int(grouped.kept_weight(lay, w, dead, st.root).count_nonzero())
                continue
            keep_in = [c for c, i in enumerate(lay.in_ids) if st.root(i) not in dead]
            out[name] = int(w[keep_out][:, keep_in].count_nonzero())
        return out

    def _norm_params_removed(self, dead: set[int], removed_modules: set[str]) -> int:
        n = 0
        for norm in self.structure.norms.values():
            if not norm.affine:
                continue
            if norm.name in removed_modules:
                n += 2 * len(norm.ids)
            else:
                n += 2 * sum(1 for i in norm.ids if self.structure.root(i) in dead)
        for cp in self.structure.channel_params:
            if cp.param not in self.params:
                continue
            per_entry = self.params[cp.param].numel() // len(cp.ids)
            if cp.param.rsplit(".", 1)[0] in removed_modules:
                n += per_entry * len(cp.ids)
            else:
                n += per_entry * sum(1 for i in cp.ids if self.structure.root(i) in dead)
        return n

    def _count_layer(self, lay, dead: set[int], removed_layers: set[str], rows_cut: set[int] = frozenset(),
                     cols_cut: set[int] = frozenset()) -> LayerCount:
        st = self.structure
        w = self.params[f"{lay.name}.weight"].detach()
        if lay.one_dimensional:
            w = w.unsqueeze(2)  # a Conv1d counts as a conv of one row: (out, in, 1, K)
        n_out, n_in = w.shape[0], w.shape[1]
        kernel = lay.kernel
        params = w.numel() + (n_out if lay.has_bias else 0)
        hw = lay.macs_per_weight  # output positions over every call of the layer
        cols_total = w[0].numel()
        if lay.name in removed_layers:
            return LayerCount(lay.name, lay.kind, (0, n_out), (0, len(lay.in_ids)), kernel, (0, 0),
                              (0, cols_total), lay.macs, 0, 0, params, 0, True)
        keep_out = [n for n, r in enumerate(self._out_roots[lay.name]) if r not in dead and n not in rows_cut]
        keep_in = [c for c, r in enumerate(self._in_roots[lay.name]) if r not in dead and c not in cols_cut]
        if lay.kind == "linear":
            weights_after = len(keep_out) * len(keep_in)
            macs_after = weights_after * hw  # hw: the number of calls for a Linear
            params_after = weights_after + (len(keep_out) if lay.has_bias else 0)
            return LayerCount(lay.name, lay.kind, (len(keep_out), n_out), (len(keep_in), n_in), kernel, kernel,
                              (len(keep_in), n_in), lay.macs, macs_after, macs_after, params, params_after, False)
        if lay.carries_channels:
            # Depthwise: one k x k filter per output, each output its input channel carried on.
            keep = keep_out
            kept_in = len(dict.fromkeys(self._out_roots[lay.name][n] for n in keep))
            per_filter = kernel[0] * kernel[1]
            macs_after = len(keep) * per_filter * hw
            params_after = len(keep) * per_filter + (len(keep) if lay.has_bias else 0)
            return LayerCount(lay.name, lay.kind, (len(keep), n_out), (kept_in, len(lay.in_ids)), kernel, kernel,
                              (cols_total, cols_total), lay.macs, macs_after, macs_after, params, params_after,
                              False)
        if lay.grouped:
            # Per kept group its kept filters over its kept inputs (equal in every group); like any conv, the
            # kernel shrinks to its nonzero rows and columns. The surgery lowers only group-1 convs to a GEMM.
            sub = grouped.kept_weight(lay, w, dead, st.root)
            kh, kw = _kept_kernel(sub, kernel)
            weights_after = sub.shape[0] * sub.shape[1] * kh * kw
            macs_after = weights_after * hw
            params_after = weights_after + (len(keep_out) if lay.has_bias else 0)
            return LayerCount(lay.name, lay.kind, (len(keep_out), n_out), (len(keep_in), len(lay.in_ids)), kernel,
                              (kh, kw), (cols_total, cols_total), lay.macs, macs_after, macs_after, params,
                              params_after, False)
        sub = w[keep_out][:, keep_in]
        kh, kw = _kept_kernel(sub, kernel)
        columns = int((sub.reshape(sub.shape[0], -1).abs().sum(0) > 0).sum()) if sub.numel() else 0
        macs_after = len(keep_out) * len(keep_in) * kh * kw * hw
        if lay.one_dimensional:
            columns = len(keep_in) * kh * kw  # the export lowers 2-D convs only: a Conv1d stays a dense conv
        params_after = len(keep_out) * len(keep_in) * kh * kw + (len(keep_out) if lay.has_bias else 0)
        return LayerCount(lay.name, lay.kind, (len(keep_out), n_out), (len(keep_in), n_in), kernel, (kh, kw),
                          (columns, cols_total), lay.macs, macs_after, len(keep_out) * columns * hw,
                          params, params_after, False)


def _kernel_extent(sub: torch.Tensor) -> tuple[int, int]:
    """Rows and columns from the first to the last nonzero one of a conv weight (0, 0 when all zero)."""
    if not sub.numel():
        return 0, 0
    rows = sub.abs().sum((0, 1, 3)).nonzero().flatten().tolist()
    cols = sub.abs().sum((0, 1, 2)).nonzero().flatten().tolist()
    return (rows[-1] - rows[0] + 1 if rows else 0), (cols[-1] - cols[0] + 1 if cols else 0)


def _kept_kernel(sub: torch.Tensor, kernel: tuple[int, int]) -> tuple[int, int]:
    """The kernel the surgery leaves: shrunk to the nonzero extent, but an all-zero kernel of a layer that stays
    (one reading only a dead input's last channel) is left whole, as the kernel pass leaves it."""
    kh, kw = _kernel_extent(sub)
    return kernel if sub.numel() and (kh, kw) == (0, 0) else (kh, kw)


def count(model: nn.Module, input_shape: tuple[int, ...]) -> ModelCount:
    """Dense and after-removal MACs and parameters of `model` for one input of `input_shape`."""
    return Counter(model, input_shape).count()


class _SliceTable:
    """Every slice of the counted groups, numbered once, and the positions each one reads per parameter and
    axis. A count asks which slices hold a nonzero thousands of times (every group, then every reader in each
    round of the cascade) and is itself called after every zeroing the budget tries; this answers all of
    them with one gather per parameter and axis, so a count costs tensor work, not a Python loop per slice."""

    def __init__(self, groups: list[ParamGroup]):
        self.number: dict[Slice, int] = {}
        for g in groups:
            for s in g.slices:
                self.number.setdefault(s, len(self.number))
        by_key: dict[tuple[str, str], list[Slice]] = defaultdict(list)
        for s in self.number:
            by_key[(s.param, s.axis)].append(s)
        # Per (param, axis): the slices' numbers, their positions laid end to end and where each one starts.
        # A slice with no positions reads nothing and is never alive; it is left out of the gather.
        self.by_key: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for key, slices in by_key.items():
            slices = [s for s in slices if s.index]
            if not slices:
                continue
            lengths = np.array([len(s.index) for s in slices])
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            positions = np.fromiter((i for s in slices for i in s.index), dtype=np.int64, count=int(lengths.sum()))
            self.by_key[key] = (np.array([self.number[s] for s in slices]), positions, starts)

    def alive(self, params: dict) -> np.ndarray:
        """Whether each slice (by its number) holds a nonzero weight now."""
        out = np.zeros(len(self.number), dtype=bool)
        nonzero: dict[str, torch.Tensor] = {}  # a parameter's slices along several axes share one comparison
        for (name, axis), (numbers, positions, starts) in self.by_key.items():
            if name not in nonzero:
                nonzero[name] = params[name].detach() != 0
            nz = nonzero[name]
            if axis == "all":
                out[numbers] = bool(nz.any())
                continue
            if axis == "fiber":  # a column of the lowered weight: (in, kh, kw) flattened
                along = nz.reshape(nz.shape[0], -1).any(0)
            else:
                d = axis_dim(axis, nz.dim())
                along = nz.movedim(d, 0).reshape(nz.shape[d], -1).any(1)
            out[numbers] = np.logical_or.reduceat(along.cpu().numpy()[positions], starts)
        return out

    def groups_alive(self, groups: list[ParamGroup]) -> _GroupsAlive:
        return _GroupsAlive(self, groups)


class _GroupsAlive:
    """Whether each of a fixed list of groups holds a nonzero, from the slices' answer."""

    def __init__(self, table: _SliceTable, groups: list[ParamGroup]):
        self.groups = groups
        flat = [table.number[s] for g in groups for s in g.slices]
        lengths = [len(g.slices) for g in groups]
        self._flat = np.array(flat, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if groups else None
        self._empty = np.array([n == 0 for n in lengths], dtype=bool)

    def __call__(self, alive: np.ndarray) -> list[bool]:
        if not self.groups:
            return []
        if not len(self._flat):
            return [False] * len(self.groups)
        # reduceat gives an empty group its next group's first slice; a group with no slices holds nothing.
        starts = np.minimum(self._starts, len(self._flat) - 1)
        out = np.logical_or.reduceat(alive[self._flat], starts) & ~self._empty
        return out.tolist()

