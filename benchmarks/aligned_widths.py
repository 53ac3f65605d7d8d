"""Do widths kept at multiples of 8 or 16 make a compact CIFAR ResNet faster in ONNX Runtime (CPU EP)?

For each built-in CIFAR ResNet (resnet20, resnet56; random weights from --seed, eval mode, random
BatchNorm statistics so folding is not a no-op) and each MAC budget, four models are timed side by side:

    dense       the uncut export
    unaligned   the weakest filter groups zeroed, one by one, until the MACs fall to the budget
    align8      every prunable width a multiple of 8, at MACs no higher than the unaligned model's
    align16     the same with 16
    align8-1    control: align8's widths each one channel narrower (same shape, slightly fewer MACs, unaligned)
    align16-1   the same for align16
    cut-align   the unaligned model's zeros, aligned by the cut instead (compress(align=B), `export --align auto`,
                B = ORT's channel block here): every width rounded up to a multiple of B by keeping zero
                channels, so more MACs than unaligned, no retraining, the same outputs
    depth       no width narrowed: whole block-internal widths emptied instead (each such block's branch then
                computes a constant, which the cut writes in its place), at MACs no higher than the unaligned
                model's; every remaining conv runs at its dense width
    align-latency  (with --latency-widths) widths at multiples of ORT's block chosen by this machine's latency
                table (batch 1, 1 thread; `sslcompress profile`'s cache): from the dense widths, each step takes
                one block of channels off the width whose loss saves the most predicted milliseconds per MAC,
                until the MACs are at or below the unaligned model's; the allocation a latency budget steers to

A *width* is one coupled set of channels: the output channels of every layer that writes it (a residual
add makes the stem, the block outputs and the downsample of one stage a single width). The widths come
from the channel analysis (`sslcompress.finetune.structure.analyze`), the groups from
`build_groups(model, shape, ("filter",))`; a filter group zeroes a channel's filters and BN scale and shift
in every layer that writes it.

Unaligned: a group's score is its L2 norm divided by the mean norm of the groups of its width (random
Kaiming weights have a different scale per layer; a raw norm ranking would strip the widest stage first).
Groups are zeroed in order of score until the model's MACs are at or below the budget; no width loses its
last channel.

Aligned to N: start from the unaligned widths rounded to the nearest multiple of N (at least N, at most the
full width); while the MACs exceed the unaligned model's, take N channels off the width that the rounding
left furthest above its unaligned value; then, while N channels fit back under that MAC count, give them
to the width furthest below its unaligned value. Each width keeps its strongest channels (by the same
norm), so the per-layer shape stays close to the unaligned model's. Alignment moves MACs between stages
(with 16-wide first-stage layers, align16 keeps that stage whole and thins the later ones), so the
alignN-1 controls keep alignN's shape and break only the alignment: alignN against alignN-1 isolates it. A budget no aligned model can meet
(every width at N already above it) is reported as such, with the MACs it has.

Depth: the widths a single conv writes (a basic block's inner width) are the ones that can go whole; they go in
order of their mean group norm over the mean of all of them (the weakest block first, whatever its stage) until
the MACs are at or below the unaligned model's. It asks whether any choice of widths reaches the MAC-reduction
limit here: the dense widths are the ones ORT's kernels run fastest, so what it leaves short of the limit is the
cost that does not fall with the MACs (stem, pooling, classifier, shortcuts, per-op overhead). The zeroed model
must still depend on its input (checked), and it is cut and verified like the others.

The MACs are counted twice and must agree: by the script's own width arithmetic and by
`sslcompress.flops.count`; the compact ONNX model's MACs come from compress()'s report. Every compact model
must pass compress()'s verification (shape lowering off: filter zeroing leaves no partial columns to
lower), and its outputs must match the dense session's before it is timed.

Timing: `sslcompress.runtime.create_session` (CPU EP, ORT_ENABLE_ALL, inter-op 1, spinning stopped after
each run, workers pinned), all four sessions of one (model, budget, threads) created together and timed by
`sslcompress.runtime.timing.interleaved` in rotating order, the calling thread pinned as the bench pins it.
Per variant: median latency, speed-up over dense with the bootstrap 95% interval (rounds resampled in
pairs), the MAC fraction, and the fraction of the MAC-reduction limit reached = speed-up / (dense MACs /
compact MACs). The aligned-vs-unaligned latency ratio has its own bootstrap interval. To explain the
figures, each model's ORT-optimised graph is saved once and its Conv nodes counted: how many ORT turned
into blocked-layout (NCHWc) convs and how many layout reorders it inserted; and "padded MACs", the MACs
with every prunable width rounded up to ORT's NCHWc block (16 with AVX-512, else 8), since the blocked
convs pad their output channels to it.

Usage (from the repository root):

    python benchmarks/aligned_widths.py                 # full run: resnet20+56, budgets 0.5 and 0.3, batch 1/8, threads 1/2
    python benchmarks/aligned_widths.py --quick         # smoke run (seconds): resnet20, budget 0.5, batch 1, 1 thread
    python benchmarks/aligned_widths.py --latency-widths   # and the align-latency variant (profiles a table first)

The tables go to benchmarks/results/aligned_widths.md (benchmarks/out with --quick), every sample to
benchmarks/out/aligned_widths.json. A '## Conclusions' section written into the .md by hand is kept by a rerun.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import torch
from surgery_resnet import (  # beside this script: the same helpers and BN statistics
    cpu_name,
    csv,
    log,
    randomize_bn,
)
from torch import nn

from sslcompress.finetune.groups import ParamGroup, build_groups
from sslcompress.finetune.structure import ModelStructure, analyze
from sslcompress.flops import count
from sslcompress.io import atomic_write_bytes, atomic_write_json
from sslcompress.latency import current_key, default_path, load_or_new, predict, profile_model, save_table
from sslcompress.models import ModelSpec, build_model
from sslcompress.runtime import (
    bootstrap_ratio,
    calling_thread_on,
    create_session,
    interleaved,
    placement,
    runner,
    timings,
)
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "benchmarks" / "out"
MODELS = ("resnet20", "resnet56")
VARIANTS = ("dense", "unaligned", "align8", "align8-1", "align16", "align16-1", "cut-align", "depth")
LATENCY_VARIANT = "align-latency"
# (slower, faster): reported as median(slower) / median(faster), above 1 when the second is faster
COMPARISONS = (("unaligned", "align8"), ("unaligned", "align16"), ("align8-1", "align8"), ("align16-1", "align16"),
               ("unaligned", "cut-align"), ("align8", "depth"), ("align8", LATENCY_VARIANT))
RTOL_OF_MAX = 1e-4  # the library's verification criterion, reused for the check before timing


def git(*argv: str) -> str | None:
    try:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------------------------
# The model and its widths


def dense_model(name: str, seed: int) -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec(name, 10, 3, (32, 32))
    torch.manual_seed(seed)
    model = build_model(spec)
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.eval(), spec


@dataclass
class Width:
    """One coupled set of channels: the layers that write it and, per channel, the filter group that zeroes it."""

    layers: tuple[str, ...]
    roots: tuple[int, ...]
    groups: tuple[ParamGroup, ...]
    scores: tuple[float, ...]  # group norm / mean group norm of this width
    order: tuple[int, ...] = field(default=())  # channel positions, weakest first
    mean_norm: float = 0.0  # the mean group norm itself

    @property
    def emptiable(self) -> bool:
        """Written by one layer only (a block's inner width): emptying it leaves the trunk and the network."""
        return len(self.layers) == 1

    @property
    def total(self) -> int:
        return len(self.roots)

    def weakest(self, n: int) -> set[int]:
        """Root ids of the n weakest channels."""
        return {self.roots[i] for i in self.order[:n]}


class Widths:
    """The prunable widths of a model and an exact MAC count for any set of zeroed channels."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        st: ModelStructure = analyze(model, input_shape)
        self.st = st
        groups = [g for g in build_groups(model, input_shape, ("filter",), st) if g.removable]
        by_root = {g.channel: g for g in groups}
        params = dict(model.named_parameters())
        by_roots: dict[tuple[int, ...], list[str]] = {}
        for lay in st.layers.values():
            by_roots.setdefault(tuple(dict.fromkeys(st.root(i) for i in lay.out_ids)), []).append(lay.name)
        self.units: list[Width] = []
        self.fixed: list[tuple[str, int]] = []  # widths no filter group can zero (the classifier's outputs)
        for roots, layers in by_roots.items():
            if not all(r in by_root for r in roots):
                self.fixed.append((", ".join(layers), len(roots)))
                continue
            gs = tuple(by_root[r] for r in roots)
            norms = [group_norm(g, params) for g in gs]
            mean = statistics.fmean(norms)
            scores = tuple(n / mean for n in norms)
            order = tuple(sorted(range(len(gs)), key=lambda i: scores[i]))
            self.units.append(Width(tuple(layers), roots, gs, scores, order, mean))
        for lay in st.layers.values():
            w = lay.weight_shape
            if len(w) == 4 and w[1] != len(lay.in_ids):
                raise SystemExit(f"error: {lay.name} is a grouped convolution; this script counts dense convs only")

    def macs(self, dead: set[int]) -> int:
        total = 0
        for lay in self.st.layers.values():
            out = sum(self.st.root(i) not in dead for i in lay.out_ids)
            inn = sum(self.st.root(i) not in dead for i in lay.in_ids)
            k = math.prod(lay.weight_shape[2:])
            total += out * inn * k * lay.macs_per_weight
        return total

    def dead_of(self, kept: list[int]) -> set[int]:
        """Zeroed root ids when width i keeps its kept[i] strongest channels."""
        dead: set[int] = set()
        for u, k in zip(self.units, kept):
            dead |= u.weakest(u.total - k)
        return dead


def group_norm(g: ParamGroup, params: dict) -> float:
    sq = 0.0
    for s in g.slices:
        p = params[s.param].detach()
        if s.axis == "out":
            sq += float(p[list(s.index)].pow(2).sum())
        else:
            raise SystemExit(f"error: filter group {g.name} has a slice along {s.axis!r}; expected 'out' only")
    return math.sqrt(sq)


def unaligned_widths(w: Widths, target: int) -> tuple[list[int], bool]:
    """Zero the lowest-score groups until MACs <= target; (kept per width, target met)."""
    kept = [u.total for u in w.units]
    ranked = sorted((u.scores[i], ui, i) for ui, u in enumerate(w.units) for i in range(u.total))
    for _, ui, _ in ranked:
        if w.macs(w.dead_of(kept)) <= target:
            return kept, True
        if kept[ui] > 1:
            kept[ui] -= 1
    return kept, w.macs(w.dead_of(kept)) <= target


def aligned_widths(w: Widths, ref: list[int], n: int, target: int) -> tuple[list[int], bool]:
    """Widths that are multiples of n, close to `ref`, with MACs <= target; (kept per width, target met)."""
    total = [u.total for u in w.units]
    lo = [min(n, t) for t in total]
    kept = [max(lo[i], min(total[i], n * round(ref[i] / n))) for i in range(len(ref))]
    macs = w.macs(w.dead_of(kept))
    while macs > target:
        cands = [i for i in range(len(kept)) if kept[i] - n >= lo[i]]
        if not cands:
            return kept, False
        i = max(cands, key=lambda j: (kept[j] - ref[j], total[j]))
        kept[i] -= n
        macs = w.macs(w.dead_of(kept))
    while True:
        fits = []
        for i in range(len(kept)):
            if kept[i] + n <= total[i]:
                trial = kept.copy()
                trial[i] += n
                m = w.macs(w.dead_of(trial))
                if m <= target:
                    fits.append((ref[i] - kept[i], m, i))
        if not fits:
            return kept, True
        _, macs, i = max(fits)
        kept[i] += n


def depth_widths(w: Widths, target: int) -> tuple[list[int], bool]:
    """Every width whole or, for an emptiable one, gone: the weakest (mean group norm over the mean of all the
    emptiable widths') go first until MACs <= target; (kept per width, target met)."""
    kept = [u.total for u in w.units]
    candidates = [i for i, u in enumerate(w.units) if u.emptiable]
    if not candidates:
        return kept, w.macs(set()) <= target
    mean = statistics.fmean(w.units[i].mean_norm for i in candidates)
    for i in sorted(candidates, key=lambda j: (w.units[j].mean_norm / mean, j)):
        if w.macs(w.dead_of(kept)) <= target:
            break
        kept[i] = 0
    return kept, w.macs(w.dead_of(kept)) <= target


class _KeptWidths:
    """What `sslcompress.latency.predict` reads of a count (each layer's kept input and output widths), for
    widths this script chose."""

    def __init__(self, w: Widths, kept: list[int]):
        self.st, self.dead = w.st, w.dead_of(kept)

    def layer(self, name: str) -> SimpleNamespace:
        lay = self.st.layers[name]
        out = sum(self.st.root(i) not in self.dead for i in lay.out_ids)
        inn = sum(self.st.root(i) not in self.dead for i in lay.in_ids)
        return SimpleNamespace(removed=not out or not inn, channels=(inn, len(lay.in_ids)),
                               filters=(out, len(lay.out_ids)))


def latency_widths(w: Widths, table, n: int, target: int) -> tuple[list[int], bool]:
    """Widths at multiples of n chosen by the latency table: from the dense widths, each step takes n channels
    off the width whose loss saves the most predicted ms per MAC, until the MACs are at or below target;
    (kept per width, target met)."""
    kept = [u.total for u in w.units]
    macs, ms = w.macs(set()), predict(table, w.st, _KeptWidths(w, kept))
    while macs > target:
        best = None
        for i, u in enumerate(w.units):
            if kept[i] - n < min(n, u.total):
                continue
            trial = kept.copy()
            trial[i] -= n
            m, t = w.macs(w.dead_of(trial)), predict(table, w.st, _KeptWidths(w, trial))
            score = (ms - t) / max(macs - m, 1)
            if best is None or score > best[0]:
                best = (score, i, m, t)
        if best is None:
            return kept, False
        _, i, macs, ms = best
        kept[i] -= n
    return kept, True


def latency_table(model: nn.Module, shape: tuple[int, ...]):
    """This machine's latency table of `model` at batch 1 and 1 thread, from `sslcompress profile`'s cache
    (measured first where the cache lacks it, and saved there)."""
    key = current_key("cpu", threads=1, batch=1)
    path = default_path(key)
    table = profile_model(model, (1, *shape[1:]), key, load_or_new(path, key))
    save_table(table, path)
    return table


@torch.no_grad()
def depends_on_input(model: nn.Module, shape: tuple[int, ...], seed: int) -> bool:
    """Whether two random inputs give different outputs: no emptied width has cut the network."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *shape[1:]), generator=g)
    y = model(x)
    return not torch.equal(y[0], y[1])


@torch.no_grad()
def zero_groups(model: nn.Module, w: Widths, dead: set[int]) -> None:
    params = dict(model.named_parameters())
    for u in w.units:
        for r, g in zip(u.roots, u.groups):
            if r in dead:
                for s in g.slices:
                    params[s.param][list(s.index)] = 0.0


# ---------------------------------------------------------------------------------------------
# Export, surgery, and what ORT makes of the graph


def nchwc_block() -> int:
    """ORT's NCHWc block on this CPU: 16 channels with AVX-512F, 8 with AVX2 (MLAS)."""
    return 16 if machine_info()["simd"] == "avx512f" else 8


def ort_graph_stats(model_bytes: bytes, tmp: Path) -> dict:
    """Conv nodes of ORT's optimised graph (threads 1): blocked-layout (NCHWc) or plain, and the reorders."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 4
    path = tmp / "optimized.onnx"
    so.optimized_model_filepath = str(path)
    ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    g = onnx.load(str(path)).graph
    ops = [(nd.domain or "ai.onnx", nd.op_type) for nd in g.node]
    return {"conv_nchwc": sum(o == ("com.microsoft.nchwc", "Conv") for o in ops),
            "conv_plain": sum(o[1] in ("Conv", "FusedConv") and o[0] != "com.microsoft.nchwc" for o in ops),
            "reorders": sum(o[1] in ("ReorderInput", "ReorderOutput") for o in ops),
            "nodes": len(ops)}


def build_case(name: str, budget: float, args, tmp: Path) -> dict:
    model, spec = dense_model(name, args.seed)
    shape = spec.input_shape
    w = Widths(model, shape)
    dense_macs = w.macs(set())
    c0 = count(model, shape)
    if c0.macs != dense_macs:
        raise SystemExit(f"error: {name}: width arithmetic gives {dense_macs} dense MACs, count() {c0.macs}")
    kept_u, met_u = unaligned_widths(w, math.floor(budget * dense_macs))
    target = w.macs(w.dead_of(kept_u))
    plans = {"unaligned": (kept_u, met_u)}
    for n in (8, 16):
        plans[f"align{n}"] = aligned_widths(w, kept_u, n, target)
        plans[f"align{n}-1"] = ([k - 1 for k in plans[f"align{n}"][0]], True)
    block = nchwc_block()
    # The cut's alignment keeps the unaligned zeros and rounds every width up to the block.
    plans["cut-align"] = ([min(u.total, block * math.ceil(k / block)) for u, k in zip(w.units, kept_u)], met_u)
    plans["depth"] = depth_widths(w, target)
    names = list(VARIANTS)
    if args.latency_widths:
        table = latency_table(model, shape)
        plans[LATENCY_VARIANT] = latency_widths(w, table, table.key.block, target)
        names.append(LATENCY_VARIANT)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    variants = {}
    for vname in names:
        model.load_state_dict(state)
        kept = [u.total for u in w.units] if vname == "dense" else plans[vname][0]
        zeroed = plans["unaligned"][0] if vname == "cut-align" else kept
        zero_groups(model, w, w.dead_of(zeroed))
        if not depends_on_input(model, shape, args.seed):
            raise SystemExit(f"error: {name} {vname}: the zeroed model no longer depends on its input")
        counted = count(model, shape)
        mine = w.macs(w.dead_of(zeroed))
        if counted.macs_after != mine:
            raise SystemExit(f"error: {name} {vname}: width arithmetic gives {mine} MACs, count() {counted.macs_after}")
        macs = w.macs(w.dead_of(kept))  # what the compact model computes (more than counted for cut-align)
        exported = export_onnx(model, (1, 3, 32, 32), dynamic_batch=True)
        if not exported.bn_folded:
            raise SystemExit(f"error: {exported.bn_remaining} BatchNormalization nodes survived the export of {name}")
        if vname == "dense":
            onnx_bytes, onnx_macs, passed = exported.model.SerializeToString(), counted.macs, True
        else:
            res = compress(exported.model, shape_lowering="off", align=block if vname == "cut-align" else None)
            passed = bool(res.verification.passed)
            if not passed:
                raise SystemExit(f"error: {name} {vname}: the compact model failed verification "
                                 f"(rel {res.verification.rel:.3g})")
            onnx_bytes, onnx_macs = res.model.SerializeToString(), res.report["totals"]["macs_after"]
            if onnx_macs != macs:
                raise SystemExit(f"error: {name} {vname}: the compact model computes {onnx_macs} MACs, the widths "
                                 f"{kept} give {macs}")
        n_align = {n: sum(k % n == 0 for k in kept) for n in (8, 16)}
        padded = w.macs(w.dead_of([min(u.total, block * math.ceil(k / block)) for u, k in zip(w.units, kept)]))
        variants[vname] = {
            "kept": kept, "macs": macs, "mac_fraction": macs / dense_macs,
            "onnx_macs": onnx_macs, "verification_passed": passed, "padded_macs": padded, "block": block,
            "budget_met": True if vname == "dense" else plans[vname][1],
            "multiples_of_8": n_align[8], "multiples_of_16": n_align[16],
            "ort_graph": ort_graph_stats(onnx_bytes, tmp), "bytes": onnx_bytes,
            "uncut_bytes": None if vname == "dense" else exported.model.SerializeToString(),
        }
        log(f"{name} budget {budget:g} {vname}: MACs {macs / dense_macs:.4f} of dense "
            f"(ONNX {onnx_macs / c0.macs:.4f}), widths {kept}, NCHWc convs "
            f"{variants[vname]['ort_graph']['conv_nchwc']}/{variants[vname]['ort_graph']['conv_nchwc'] + variants[vname]['ort_graph']['conv_plain']}")
    return {"model": name, "budget": budget, "dense_macs": dense_macs,
            "widths": [{"layers": list(u.layers), "total": u.total} for u in w.units],
            "fixed_widths": w.fixed, "variants": variants, "timings": []}


# ---------------------------------------------------------------------------------------------
# Timing


def check_outputs(case: dict, sessions: dict[str, ort.InferenceSession], x: np.ndarray) -> dict[str, float]:
    """The session timed runs the model that was verified: its outputs match its uncut (zeroed) export's."""
    rels = {}
    for vname, sess in sessions.items():
        uncut = case["variants"][vname].get("uncut_bytes")
        if uncut is None:
            continue
        ref_sess = create_session(uncut, threads=1)
        ref = ref_sess.run(None, {ref_sess.get_inputs()[0].name: x})[0].astype(np.float64)
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64)
        rel = float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))
        if not rel <= RTOL_OF_MAX:
            raise SystemExit(f"error: {vname}'s outputs differ from its uncut export's (rel {rel:.3g})")
        rels[vname] = rel
    return rels


def time_case(case: dict, args) -> None:
    for threads in args.threads:
        names = list(case["variants"])
        sessions = {v: create_session(case["variants"][v]["bytes"], threads=threads, pin=True) for v in names}
        where = placement(threads)
        for batch in args.batch:
            x = np.random.default_rng(args.seed).standard_normal((batch, 3, 32, 32), dtype=np.float32)
            rels = check_outputs(case, sessions, x)
            runs = {v: runner(s, x, "cpu") for v, s in sessions.items()}
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            with calling_thread_on(where[0] if where else None):
                raw = interleaved(runs, repeat=args.rounds, warmup=args.warmup, sample_time=args.sample_s)
            recs = {t.variant: t for t in timings(raw, baseline="dense", provider="cpu", threads=threads,
                                                  batch=batch, seed=args.seed)}
            row = {"batch": batch, "threads": threads, "load_before": load, "seconds": time.perf_counter() - t0,
                   "output_rel_diff": rels, "variants": {}, "compare": {}}
            dense_macs = case["dense_macs"]
            for v, t in recs.items():
                macs = case["variants"][v]["macs"]
                row["variants"][v] = {**t.to_dict(), "limit_fraction": t.speedup / (dense_macs / macs)}
            for a, b in comparisons([case]):
                sa, sb = recs[a].samples_s, recs[b].samples_s
                row["compare"][f"{b} vs {a}"] = {
                    "ratio": statistics.median(sa) / statistics.median(sb),
                    "ci95": list(bootstrap_ratio(sa, sb, seed=args.seed)),
                    "mac_ratio": case["variants"][a]["macs"] / case["variants"][b]["macs"]}
            case["timings"].append(row)
            d = row["variants"]
            log(f"{case['model']} budget {case['budget']:g} batch {batch} threads {threads}: dense "
                f"{1e3 * d['dense']['median_s']:.3f} ms; " + ", ".join(
                    f"{v} {1e3 * d[v]['median_s']:.3f} ms ({d[v]['speedup']:.2f}x)" for v in names[1:])
                + f" [{row['seconds']:.0f} s]")


# ---------------------------------------------------------------------------------------------
# Output


def machine_info() -> dict:
    from sslcompress.runtime.cpu import cpu_isa

    cpu = cpu_name()
    isa = cpu_isa()
    simd = "avx512f" if "avx512f" in isa else "avx2" if "avx2" in isa else "other"
    return {"nproc": os.cpu_count(), "cpu": cpu, "simd": simd, "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def fmt_ci(ci) -> str:
    return f"{ci[0]:.2f}..{ci[1]:.2f}"


def render_variants(cases: list[dict]) -> list[str]:
    lines = ["| model | budget | variant | MACs (M) | MAC fraction | padded MAC fraction | kept widths "
             "| multiples of 8 / 16 | ORT convs NCHWc / plain, reorders | verified |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        n = len(c["widths"])
        for v in c["variants"]:
            r = c["variants"][v]
            g = r["ort_graph"]
            met = "" if r["budget_met"] else " (budget not reachable)"
            lines.append(f"| {c['model']} | {c['budget']:.0%} | {v} | {r['macs'] / 1e6:.3f} | "
                         f"{r['mac_fraction']:.4f}{met} | {r['padded_macs'] / c['dense_macs']:.4f} | "
                         f"{' '.join(map(str, r['kept']))} | "
                         f"{r['multiples_of_8']}/{n}, {r['multiples_of_16']}/{n} | "
                         f"{g['conv_nchwc']} / {g['conv_plain']}, {g['reorders']} | "
                         f"{'yes' if r['verification_passed'] else 'NO'} |")
    return lines


def variant_names(cases: list[dict]) -> list[str]:
    """The variants of this run (every case has the same)."""
    return list(cases[0]["variants"]) if cases else list(VARIANTS)


def comparisons(cases: list[dict]) -> list[tuple[str, str]]:
    names = variant_names(cases)
    return [(a, b) for a, b in COMPARISONS if a in names and b in names]


def render_timings(cases: list[dict]) -> list[str]:
    names = variant_names(cases)
    lines = ["| model | budget | batch | threads | load | dense ms | " + " | ".join(names[1:]) + " |",
             "|" + "---|" * (5 + len(names))]
    for c in cases:
        for row in c["timings"]:
            d = row["variants"]
            cells = [f"{1e3 * d[v]['median_s']:.3f} ms, {d[v]['speedup']:.2f}x ({fmt_ci(d[v]['speedup_ci'])}), "
                     f"limit {d[v]['limit_fraction']:.2f}" for v in names[1:]]
            lines.append(f"| {c['model']} | {c['budget']:.0%} | {row['batch']} | {row['threads']} | "
                         f"{row['load_before']:.2f} | {1e3 * d['dense']['median_s']:.3f} | " + " | ".join(cells) + " |")
    return lines


def comparison_keys(cases: list[dict]) -> list[str]:
    return [f"{b} vs {a}" for a, b in comparisons(cases)]


def render_comparisons(cases: list[dict]) -> list[str]:
    keys = comparison_keys(cases)
    lines = ["| model | budget | batch | threads | " + " | ".join(keys) + " |", "|" + "---|" * (4 + len(keys))]
    for c in cases:
        for row in c["timings"]:
            cells = [f"{row['compare'][k]['ratio']:.3f}x ({fmt_ci(row['compare'][k]['ci95'])}); MACs "
                     f"{row['compare'][k]['mac_ratio']:.3f}x" for k in keys]
            lines.append(f"| {c['model']} | {c['budget']:.0%} | {row['batch']} | {row['threads']} | "
                         + " | ".join(cells) + " |")
    return lines


def summary(cases: list[dict]) -> list[str]:
    """Plain counts over all timed settings: where the aligned model was faster, beyond the noise."""
    rows = [r for c in cases for r in c["timings"]]
    if not rows:
        return []
    out = []
    for k in comparison_keys(cases):
        ratios = [r["compare"][k]["ratio"] for r in rows]
        faster = sum(r["compare"][k]["ci95"][0] > 1 for r in rows)
        slower = sum(r["compare"][k]["ci95"][1] < 1 for r in rows)
        excess = [r["compare"][k]["ratio"] / r["compare"][k]["mac_ratio"] for r in rows]
        gm = math.exp(statistics.fmean(math.log(x) for x in ratios))
        gx = math.exp(statistics.fmean(math.log(x) for x in excess))
        b, a = k.split(" vs ")
        out.append(f"{k}, {len(rows)} settings: latency {a} / {b} geometric mean {gm:.3f} (range "
                   f"{min(ratios):.3f}..{max(ratios):.3f}); {b} faster beyond the 95% interval in {faster}, slower "
                   f"in {slower}, within the noise in {len(rows) - faster - slower}. Divided by the MAC ratio {a} / "
                   f"{b} (what the MACs alone would give): geometric mean {gx:.3f}.")
    for v in variant_names(cases)[1:]:
        by_threads = {}
        for c in cases:
            r = c["variants"][v]
            for row in c["timings"]:
                pad = row["variants"][v]["speedup"] / (c["dense_macs"] / r["padded_macs"])
                by_threads.setdefault(row["threads"], []).append(pad)
        parts = [f"{t} thread(s) geometric mean {math.exp(statistics.fmean(math.log(x) for x in xs)):.2f} "
                 f"(range {min(xs):.2f}..{max(xs):.2f})" for t, xs in sorted(by_threads.items())]
        out.append(f"{v}: speed-up / (dense MACs / padded MACs), the share of the padded-MAC limit reached: "
                   + "; ".join(parts) + ".")
    return out


def render_md(doc: dict) -> str:
    m, s = doc["machine"], doc["settings"]
    quick = " (QUICK check, not a result)" if doc.get("quick") else ""
    partial = [] if doc["complete"] else ["**Incomplete: the run has not finished (or failed).**", ""]
    commit = f" (this tree at {doc['commit'][:10]})" if doc.get("commit") else ""
    lines = [f"# Aligned widths and ORT CPU latency of compact CIFAR ResNets{quick}", "",
             f"Generated by `{doc['command']}` on {doc['date_utc']}{commit}.", "", *partial,
             f"Machine: {m['cpu']} ({m['simd']}), nproc {m['nproc']}, shared with other work; ORT {m['onnxruntime']}, "
             f"onnx {m['onnx']}, torch {m['torch']}, numpy {m['numpy']}, Python {m['python']}, {m['platform']}. "
             f"Load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in doc['load_average_start'])}, "
             f"at end {', '.join(f'{x:.2f}' for x in doc.get('load_average_end', doc['load_average_start']))}; "
             f"the 1-minute load before each row's timing is in the latency table. Every sample is in "
             f"benchmarks/out/{doc['stem']}.json (not committed). Wall time {doc['wall_time_s']:.0f} s.", "",
             f"Settings: seed {s['seed']}, input 3x32x32, {s['rounds']} interleaved rounds (+{s['warmup']} warm-up "
             f"calls per variant), sample about {s['sample_s']} s of back-to-back calls.", "",
             "## The models", "",
             *render_variants(doc["cases"]), "",
             "Budget = MAC target of the unaligned model, as a fraction of the dense MACs (every Conv/Gemm, per "
             "image). MACs: of the zeroed torch model by `sslcompress.flops.count`, equal to compress()'s count of "
             "the compact ONNX model"
             + (" (checked)" if all(r['macs'] == r['onnx_macs'] for c in doc['cases'] for r in c['variants'].values())
                else " (NOT equal everywhere: see the JSON)") + ". Kept widths: one number per prunable width, in "
             "graph order (a stage's trunk width, then each block's inner width). Padded: the MACs with every prunable width rounded up to a multiple of the NCHWc block (see the JSON's `block`). The classifier's 10 outputs are "
             "not prunable and not listed. ORT convs: Conv nodes of ORT's optimised graph (ORT_ENABLE_ALL, 1 "
             "thread) in the blocked NCHWc layout and in plain NCHW, and the layout reorders it inserted. "
             "Verified: compress()'s own check passed (shape lowering off).", "",
             "## Latency", "",
             *render_timings(doc["cases"]), "",
             "Each cell: median per-call latency over the rounds, speed-up = dense median / variant median with a "
             "bootstrap 95% interval (rounds resampled in pairs), and limit = speed-up / (dense MACs / variant "
             "MACs): 1.00 means the latency fell as much as the MACs. All models of one row were timed side by "
             "side, in rotating order. Load: the 1-minute load average just before the row's timing.", "",
             "## Aligned against unaligned", "",
             *render_comparisons(doc["cases"]), "",
             "'B vs A' = A's median latency / B's median latency, with its bootstrap 95% interval (above 1: B, the "
             "aligned model, is faster), then the MAC ratio A / B: the speed-up B's fewer MACs alone would give. "
             "alignN vs alignN-1 compares one shape with and without alignment.", "",
             "## Summary", "",
             *[f"- {x}" for x in summary(doc["cases"])], ""]
    if doc.get("conclusions"):
        lines += ["## Conclusions", "", *doc["conclusions"], ""]
    return "\n".join(lines)


def strip_bytes(doc: dict) -> dict:
    out = dict(doc)
    out["cases"] = [{**c, "variants": {v: {k: x for k, x in r.items() if k not in ("bytes", "uncut_bytes")}
                                       for v, r in c["variants"].items()}} for c in doc["cases"]]
    return out


def write_results(doc: dict, res_dir: Path, stem: str) -> None:
    """The tables to `res_dir`; the full record (every sample) to benchmarks/out, which git ignores."""
    doc["load_average_end"] = list(os.getloadavg())
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(strip_bytes(doc), OUT_DIR / f"{stem}.json")
    atomic_write_bytes(render_md(doc).encode(), res_dir / f"{stem}.md")


def read_conclusions(path: Path) -> list[str]:
    """The hand-written 'Conclusions' section of an earlier results file, kept across reruns."""
    try:
        text = path.read_text()
    except OSError:
        return []
    if "## Conclusions" not in text:
        return []
    body = text.split("## Conclusions", 1)[1].split("\n## ", 1)[0]
    return body.strip("\n").splitlines()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of resnet20, resnet56")
    ap.add_argument("--budgets", default="0.5,0.3", help="MAC targets of the unaligned model (comma list)")
    ap.add_argument("--batch", default="1,8", help="batch sizes timed (comma list)")
    ap.add_argument("--threads", default="1,2", help="ORT intra-op thread counts (comma list)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds per (batch, threads)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per variant before the rounds")
    ap.add_argument("--sample-s", type=float, default=0.1, help="length of one sample of back-to-back calls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-widths", action="store_true",
                    help=f"add the {LATENCY_VARIANT} variant: aligned widths chosen by this machine's latency table "
                         "(profiled first where `sslcompress profile`'s cache lacks it)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: resnet20, budget 0.5, batch 1, threads 1, 5 rounds; results to benchmarks/out")
    ap.add_argument("--out", default=None,
                    help="where the .md goes (default benchmarks/results; benchmarks/out with --quick); the .json "
                         "with every sample always goes to benchmarks/out")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.budgets, args.batch, args.threads = "resnet20", "0.5", "1", "1"
        args.rounds, args.warmup, args.sample_s = min(args.rounds, 5), 2, 0.02
    args.models = csv(args.models)
    args.budgets, args.batch, args.threads = csv(args.budgets, float), csv(args.batch, int), csv(args.threads, int)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}: this benchmark knows {', '.join(MODELS)}")
    if not all(0 < b < 1 for b in args.budgets):
        ap.error("--budgets must be in (0, 1)")
    if args.rounds < 1 or args.sample_s <= 0 or args.warmup < 0:
        ap.error("--rounds >= 1, --sample-s > 0 and --warmup >= 0 are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # torch only builds and exports here; keep it off the cores ORT is timed on
    res_dir = Path(args.out or REPO / "benchmarks" / ("out" if args.quick else "results"))
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = "aligned_widths_quick" if args.quick else "aligned_widths"
    t_all = time.perf_counter()
    doc = {"benchmark": "aligned_widths", "quick": args.quick, "complete": False, "commit": git("rev-parse", "HEAD"),
           "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
           "load_average_start": list(os.getloadavg()),
           "settings": {k: getattr(args, k) for k in ("models", "budgets", "batch", "threads", "rounds", "warmup",
                                                       "sample_s", "seed", "latency_widths")},
           "stem": stem, "cases": [], "wall_time_s": 0.0, "conclusions": read_conclusions(res_dir / f"{stem}.md")}
    log(f"ORT {ort.__version__}, nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="aligned_widths_") as tmp:
        for name in args.models:
            for budget in args.budgets:
                case = build_case(name, budget, args, Path(tmp))
                doc["cases"].append(case)
                time_case(case, args)
                doc["wall_time_s"] = time.perf_counter() - t_all
                write_results(doc, res_dir, stem)  # partial results survive a later failure
    doc["complete"] = True
    doc["wall_time_s"] = time.perf_counter() - t_all
    write_results(doc, res_dir, stem)
    print("\n".join(render_timings(doc["cases"])))
    print()
    print("\n".join(summary(doc["cases"])))
    log(f"done in {doc['wall_time_s']:.0f} s; wrote {res_dir / stem}.md and {OUT_DIR / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
