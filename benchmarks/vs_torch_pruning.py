"""Head to head with Torch-Pruning (DepGraph): error, MACs, training CPU time and ORT speed at equal budgets.

Per model and per budget (a fraction of the dense MACs), every method starts from one shared dense
checkpoint (`--pretrained FILE`, else one pretrained here with `run_pretrain` into
benchmarks/out/vs_torch_pruning/MODEL/pretrained.pt, reused when it exists):

    ours           run_finetune: structures filter,channel, target_flops=budget, S sparsify epochs (the
                   pipeline thins the model as channels die), then F fine-tune epochs on the thinned model
    tp_l1_global   Torch-Pruning 1.6.1, MagnitudeImportance(p=1), global ranking
    tp_l1_layer    the same importance ranked per layer (global_pruning=False)
    tp_groupnorm   GroupMagnitudeImportance(p=2), global ranking (DepGraph's group norm, one shot)

Torch-Pruning prunes the same pretrained weights in the same built-in model, its classifier ignored, to at
most the MACs ours reached: pruning_ratio is searched (a grid, then a bisection where the MACs first drop
to the target; global ranking is not monotone in the ratio, because a group whose every channel falls below
the threshold is left whole) and the ratio whose MACs come closest to the target from below is kept. Both
sides are counted by one counter, `sslcompress.flops.count` (every Conv/Linear, per image), which works on
Torch-Pruning's physically smaller modules as on our zeroed ones; the compact ONNX models' MACs (compress()'s
report) are recorded beside it. Torch-Pruning's model is then fine-tuned for as many epochs as ours trained
in all (the sparsify epochs it ran + F), with our fine-tune phase's loop, optimizer, lr, schedule, batch
size and per-epoch test evaluation (sslcompress.finetune.loop), on the data as the pipeline loads it.

Training cost: process CPU seconds (`time.process_time()`, all threads) and wall seconds, per method, from
loading the data to the end of fine-tuning. Ours is the whole `run_finetune` call (data, sparsify, thinning,
fine-tuning, its per-epoch evaluations, the one-shot probe, the report and the checkpoint); Torch-Pruning's
is the data, the ratio search, the pruning and the fine-tuning with its per-epoch evaluations.

Every final model is exported to ONNX and cut exactly as `sslcompress export --onnx` does (export_onnx,
then compress(), which must pass its verification; on Torch-Pruning's models nothing is left to cut). Top-1
on the whole test split is measured in ONNX Runtime (the reported error), and every model is timed against
the dense export at batch 1 and 64 in interleaved rounds (`sslcompress.runtime`: pinned sessions, rotating
order), reported as speed-up over dense.

Results: benchmarks/results/vs_torch_pruning.json and .md (with --quick: benchmarks/out/vs_torch_pruning_quick.*,
never benchmarks/results). A rerun replaces the (model, budget, seed) cases it runs and keeps the others; with a
subset of --methods, the other methods' rows of a rerun case are kept and marked as carried over. Runs with
other `--seed`s add cases beside the first: with two seeds or more of a budget, the results also give each
method's mean error over its seeds, and the error target is judged on the means (one seed's error moves by
about as much as the methods differ). Torch-Pruning aims at the MACs ours reached with the same seed, else
with another seed of the budget.

Usage (from the repository root; needs `pip install -r benchmarks/requirements.txt`):

    python benchmarks/vs_torch_pruning.py --quick                 # smoke run: lenet5 on digits, seconds to minutes
    python benchmarks/vs_torch_pruning.py --model lenet5          # LeNet-5 on MNIST, budgets 0.10 and 0.04
    python benchmarks/vs_torch_pruning.py --model resnet20        # ResNet-20 on CIFAR-10, budgets 0.5 and 0.3
    python benchmarks/vs_torch_pruning.py --model resnet20 --seed 1   # a second seed of the same cases
    python benchmarks/vs_torch_pruning.py --model resnet20 --pretrained runs/r20/pretrained.pt --methods ours
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_log import csv, log  # beside this script: the progress lines the benchmarks share
from surgery_resnet import cpu_name  # beside this script: the machine description the other benchmarks give
from torch import nn

from sslcompress.config import FinetuneConfig, PretrainConfig, TrainOptions, build_config
from sslcompress.finetune.checkpoint import load_checkpoint, load_weights, read_weights
from sslcompress.finetune.distributed import DistEnv
from sslcompress.finetune.loop import (
    check_finite_weights,
    evaluate,
    make_optimizer,
    make_schedule,
    train_epoch,
)
from sslcompress.finetune.pipeline import run_finetune, run_pretrain
from sslcompress.flops import count
from sslcompress.io import atomic_write_bytes, atomic_write_json
from sslcompress.models import ModelSpec, build_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT_DIR = REPO / "benchmarks" / "out"
RESULTS_DIR = REPO / "benchmarks" / "results"
STEM = "vs_torch_pruning"
TP_VERSION = "1.6.1"

METHODS = ("ours", "tp_l1_global", "tp_l1_layer", "tp_groupnorm")
LABELS = {"ours": "ours (SSL filter+channel)", "tp_l1_global": "TP L1 global", "tp_l1_layer": "TP L1 per-layer",
          "tp_groupnorm": "TP GroupNorm"}
# Torch-Pruning's criteria as its own CIFAR recipe (reproduce/main.py) builds them: "l1" and "group_norm".
TP_METHODS = {
    "tp_l1_global": {"importance": "MagnitudeImportance(p=1)", "global_pruning": True},
    "tp_l1_layer": {"importance": "MagnitudeImportance(p=1)", "global_pruning": False},
    "tp_groupnorm": {"importance": "GroupMagnitudeImportance(p=2)", "global_pruning": True},
}
MODEL_ORDER = ("lenet5", "resnet20")
BATCHES = (1, 64)
CPU_TARGET = 1.5  # our training CPU may be at most this multiple of Torch-Pruning's

# Per-model settings of the real runs; the command line overrides each. LeNet follows lenet_mnist.py (its
# pretraining, sparsify lr and start lambda, MAC-weighted groups: an fc1 neuron costs 800 MACs, a conv2
# filter 32k, and unweighted the Lasso spends the budget on neurons that save little); ResNet-20 the CIFAR
# recipe of docs/finetune.md, unweighted (its stages cost alike, and MAC weights thin the high-resolution
# stage 1 first: 20.21% error at 50% against 19.88% unweighted, means of three seeds).
MODELS: dict[str, dict[str, Any]] = {
    "lenet5": {"data": f"mnist:{SHARED / 'mnist' / 'mnist.npz'}", "budgets": (0.10, 0.04),
               "pretrain_epochs": 12, "pretrain_lr": 0.03, "sparsify_epochs": 10, "finetune_epochs": 8,
               "sparsify_lr": 0.01, "lr": 0.01, "strength": 0.005, "weighting": "macs", "batch_size": 64},
    "resnet20": {"data": f"cifar10:{SHARED / 'cifar10' / 'cifar10_jpeg_q75.npz'}", "budgets": (0.5, 0.3),
                 "pretrain_epochs": 15, "pretrain_lr": 0.1, "sparsify_epochs": 6, "finetune_epochs": 6,
                 "sparsify_lr": 0.05, "lr": 0.01, "strength": 0.02, "weighting": "none", "batch_size": 64},
}
# --quick: LeNet-5 on the bundled digits (1437 training images), a few epochs, a few timing rounds.
QUICK = {"data": "digits", "pretrain_epochs": 3, "sparsify_epochs": 2, "finetune_epochs": 2, "rounds": 5}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Pure helpers (tested without Torch-Pruning)


@dataclass
class RatioSearch:
    """The pruning ratio kept, its MACs, whether they are at most the target, and every ratio tried."""

    ratio: float
    macs: int
    met: bool
    tried: dict[float, int] = field(default_factory=dict)


def search_ratio(macs_at: Callable[[float], int], target: int, *, step: float = 0.05, iters: int = 12,
                 top: float = 0.99) -> RatioSearch:
    """The ratio whose MACs come closest to `target` from below.

    A grid (step, 2*step, ... then a finer tail up to `top`) finds the first ratio at or below the target,
    then a bisection between it and the grid point before narrows in. The MACs need not fall monotonically
    with the ratio (global ranking leaves whole a layer it would empty), so the answer is the best of every
    ratio tried, not the bisection's last point. Without any ratio at or below the target: the one with
    the fewest MACs, `met` False.
    """
    tried: dict[float, int] = {}

    def f(r: float) -> int:
        r = round(r, 6)
        if r not in tried:
            tried[r] = int(macs_at(r))
        return tried[r]

    n = int(round(1 / step))
    grid = [round(i * step, 6) for i in range(1, n)]
    grid += [r for r in (0.96, 0.97, 0.98, top) if grid[-1] < r <= top]
    lo, hi = 0.0, None
    for r in grid:
        if f(r) <= target:
            hi = r
            break
        lo = r
    if hi is not None:
        for _ in range(iters):
            mid = (lo + hi) / 2
            if f(mid) <= target:
                hi = mid
            else:
                lo = mid
    ok = {r: m for r, m in tried.items() if m <= target}
    if ok:
        best = max(ok, key=lambda r: (ok[r], -r))
        return RatioSearch(best, ok[best], True, dict(sorted(tried.items())))
    best = min(tried, key=lambda r: (tried[r], r))
    return RatioSearch(best, tried[best], False, dict(sorted(tried.items())))


_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.conv(\d+)$")


def compact_widths(widths: dict[str, int]) -> str:
    """Kept output channels per layer in a table cell.

    CIFAR ResNets: per stage, the trunk width (what the blocks' last convs write, one width for the
    stage through the residual adds) and the inner width of each block, e.g. "16 [9 12 8]; 32 [...]";
    the stem is stage 1's trunk. Other models: the widths in order, joined by '-'.
    """
    stages: dict[int, dict[str, Any]] = {}
    for name, w in widths.items():
        m = _BLOCK.match(name)
        if m is None:
            continue
        s, _b, c = (int(x) for x in m.groups())
        st = stages.setdefault(s, {"trunk": None, "inner": []})
        if c == 1:
            st["inner"].append(w)
        else:
            st["trunk"] = w
    if not stages:
        return "-".join(str(w) for w in widths.values())
    # ';' between stages: a '|' would end the markdown table's cell.
    return "; ".join(f"{st['trunk']} [{' '.join(map(str, st['inner']))}]" for _, st in sorted(stages.items()))


def seed_of(case: dict) -> int:
    return int(case.get("settings", {}).get("seed", 0))


def case_key(model: str, budget: float, seed: int = 0) -> str:
    """One case per model, budget and seed: a rerun with another --seed adds a case beside the others."""
    return f"{model}@{budget:g}#seed{seed}"


def merge_cases(old: list[dict], new: list[dict]) -> list[dict]:
    """The cases of a rerun replace those of the same (model, budget, seed); every other case stays.

    A method the rerun did not run keeps its row from the earlier case, marked with where it came from.
    """
    by = {case_key(c["model"], c["budget"], seed_of(c)): c for c in old}
    for c in new:
        k = case_key(c["model"], c["budget"], seed_of(c))
        prev = by.get(k)
        if prev is not None:
            for method, row in prev.get("rows", {}).items():
                if method not in c["rows"]:
                    c["rows"][method] = row if row.get("carried_from") else {
                        **row, "carried_from": {"date_utc": prev.get("date_utc"), "command": prev.get("command")}}
            c["rows"] = {m: c["rows"][m] for m in METHODS if m in c["rows"]}
        by[k] = c

    def order(c: dict) -> tuple:
        m = c["model"]
        return (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m, -c["budget"], seed_of(c))

    return sorted(by.values(), key=order)


def verdicts(case: dict) -> dict[str, Any]:
    """The two targets of one case: our error at most the best TP error at no more MACs, our CPU at most
    1.5x each TP method's."""
    rows = case["rows"]
    ours = rows.get("ours")
    tps = {m: r for m, r in rows.items() if m != "ours"}
    out: dict[str, Any] = {"error": None, "cpu": None}
    if ours is None or not tps:
        return out
    fair = {m: r for m, r in tps.items() if r["macs"] <= ours["macs"]}
    if fair:
        best = min(fair, key=lambda m: fair[m]["error"])
        out["error"] = {"met": ours["error"] <= fair[best]["error"] + 1e-12, "ours": ours["error"],
                        "best_tp": best, "best_tp_error": fair[best]["error"], "best_tp_macs": fair[best]["macs"],
                        "excluded": sorted(set(tps) - set(fair))}
    ratios = {m: ours["cpu_s"] / r["cpu_s"] for m, r in tps.items() if r.get("cpu_s")}
    if ratios:
        out["cpu"] = {"met": all(v <= CPU_TARGET for v in ratios.values()), "ratios": ratios, "limit": CPU_TARGET}
    return out


def across_seeds(cases: list[dict]) -> dict[str, Any] | None:
    """Means over the seeds of one (model, budget), and the error target judged on them: one run per seed
    differs from the next by about as much as the methods differ from each other, so with two seeds or more
    the verdict that counts is our mean error against the best Torch-Pruning mean (methods with no more mean
    MACs than ours, over the seeds both ran)."""
    seeds = sorted({seed_of(c) for c in cases})
    if len(seeds) < 2:
        return None
    by_method: dict[str, dict[int, dict]] = {}
    for c in cases:
        for m, r in c["rows"].items():
            by_method.setdefault(m, {})[seed_of(c)] = r

    def stats(runs: dict[int, dict]) -> dict[str, Any]:
        n = len(runs)
        return {"seeds": sorted(runs), "errors": [runs[k]["error"] for k in sorted(runs)],
                "error": sum(r["error"] for r in runs.values()) / n,
                "macs": sum(r["macs"] for r in runs.values()) / n,
                "macs_fraction": sum(r["macs_fraction"] for r in runs.values()) / n,
                "cpu_s": sum(r["cpu_s"] for r in runs.values()) / n}

    methods = {m: stats(runs) for m, runs in by_method.items()}
    out: dict[str, Any] = {"seeds": seeds, "methods": methods, "error": None}
    ours = by_method.get("ours")
    if ours is None or len(ours) < 2:
        return out
    fair = {}
    for m, runs in by_method.items():
        shared = sorted(set(runs) & set(ours))
        if m == "ours" or len(shared) < 2:
            continue
        tp, us = stats({k: runs[k] for k in shared}), stats({k: ours[k] for k in shared})
        if tp["macs"] <= us["macs"]:
            fair[m] = (tp, us)
    if fair:
        best = min(fair, key=lambda m: fair[m][0]["error"])
        tp, us = fair[best]
        out["error"] = {"met": us["error"] <= tp["error"] + 1e-12, "ours": us["error"], "best_tp": best,
                        "best_tp_error": tp["error"], "seeds": tp["seeds"]}
    return out


def render_across(cases: list[dict]) -> list[str]:
    a = across_seeds(cases)
    if a is None:
        return []
    c0 = cases[0]
    lines = [f"### {c0['model']} at {c0['budget']:.0%}, across seeds {', '.join(map(str, a['seeds']))}", "",
             "| method | seeds | error per seed | mean error | mean MACs % | mean train CPU s |",
             "|---|---|---|---|---|---|"]
    for m, st in a["methods"].items():
        lines.append(f"| {LABELS.get(m, m)} | {', '.join(map(str, st['seeds']))} | "
                     f"{', '.join(_pct(e) for e in st['errors'])} | {_pct(st['error'])} | "
                     f"{_pct(st['macs_fraction'])} | {st['cpu_s']:.1f} |")
    return lines


def render_across_verdict(cases: list[dict]) -> list[str]:
    a = across_seeds(cases)
    if a is None or a["error"] is None:
        return []
    e, c0 = a["error"], cases[0]
    return [f"- {c0['model']} at {c0['budget']:.0%}, mean over seeds {', '.join(map(str, e['seeds']))}: our error "
            f"{_pct(e['ours'])} against Torch-Pruning's best mean at no more MACs, {LABELS[e['best_tp']]} "
            f"{_pct(e['best_tp_error'])}: error target **{'met' if e['met'] else 'missed'}**."]


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _speed(row: dict, batch: int) -> str:
    t = (row.get("ort") or {}).get(str(batch))
    if not t:
        return "-"
    return f"{t['speedup']:.2f}x ({t['speedup_ci'][0]:.2f}..{t['speedup_ci'][1]:.2f})"


def render_case(case: dict, seeded: bool = False) -> list[str]:
    dense = case["dense"]
    seed = f", seed {seed_of(case)}" if seeded else ""
    lines = [f"### {case['model']} on {case['data_name']}, budget {case['budget']:.0%} of the dense MACs{seed}", "",
             f"Dense: error {_pct(dense['error'])} (ONNX Runtime), {dense['macs'] / 1e6:.3f} M MACs, "
             f"{dense['params']} parameters, widths {compact_widths(dense['widths'])}; ORT latency "
             + ", ".join(f"batch {b} {1e3 * dense['ort'][str(b)]['median_s']:.3f} ms"
                         for b in BATCHES if str(b) in (dense.get("ort") or {})) + ".", "",
             "| method | error | MACs % | params | kept widths | train CPU s (wall s) | our CPU / its | "
             "ORT speed-up b1 | ORT speed-up b64 |",
             "|---|---|---|---|---|---|---|---|---|"]
    ours = case["rows"].get("ours")
    for m, r in case["rows"].items():
        ratio = "-" if m == "ours" or ours is None or not r.get("cpu_s") else f"{ours['cpu_s'] / r['cpu_s']:.2f}"
        mark = " (carried over)" if r.get("carried_from") else ""
        met = "" if r.get("target_met", True) else " (above our MACs)"
        if r.get("onnx_macs") is not None and r.get("onnx_macs_fraction") is not None and r["onnx_macs"] != r["macs"]:
            met += f" (ONNX {_pct(r['onnx_macs_fraction'])})"  # the compact export kept other MACs than counted
        lines.append(f"| {LABELS.get(m, m)}{mark} | {_pct(r['error'])} | {_pct(r['macs_fraction'])}{met} | "
                     f"{r['params']} | {compact_widths(r['widths'])} | {r['cpu_s']:.1f} ({r['wall_s']:.1f}) | "
                     f"{ratio} | {_speed(r, 1)} | {_speed(r, 64)} |")
    parts = []
    for m, r in case["rows"].items():
        b = r.get("cpu_breakdown_s")
        if b:
            parts.append(f"{LABELS.get(m, m)} " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in b.items()))
    if parts:
        lines += ["", "Train CPU seconds by part: " + "; ".join(parts) + "."]
    return lines


def render_verdicts(case: dict, seeded: bool = False) -> list[str]:
    v = verdicts(case)
    name = f"{case['model']} at {case['budget']:.0%}" + (f", seed {seed_of(case)}" if seeded else "")
    out = []
    e = v["error"]
    if e is None:
        out.append(f"- {name}: error target not evaluated (ours and at least one Torch-Pruning row at no more "
                   "MACs are needed).")
    else:
        excl = (f" ({', '.join(LABELS[m] for m in e['excluded'])} left out: more MACs than ours)"
                if e["excluded"] else "")
        out.append(f"- {name}: our error {_pct(e['ours'])} against Torch-Pruning's best at equal or fewer MACs, "
                   f"{LABELS[e['best_tp']]} {_pct(e['best_tp_error'])}{excl}: error target "
                   f"**{'met' if e['met'] else 'missed'}**.")
    c = v["cpu"]
    if c is not None:
        parts = ", ".join(f"{x:.2f}x {LABELS[m]}'s" for m, x in c["ratios"].items())
        out.append(f"- {name}: our training CPU time is {parts} (at most {c['limit']:g}x asked): CPU target "
                   f"**{'met' if c['met'] else 'missed'}**.")
    return out


def render_md(doc: dict) -> str:
    quick = " (QUICK smoke run, not a result)" if doc.get("quick") else ""
    lines = [f"# Torch-Pruning {TP_VERSION} against SSL fine-tuning{quick}", "",
             f"Generated by `benchmarks/vs_torch_pruning.py`; last run `{doc['command']}` on {doc['date_utc']}. "
             "Each case records the run it comes from.", "",
             "Error: top-1 error of the final compact ONNX model in ONNX Runtime on the whole test split. MACs %: "
             "of the dense model, counted by `sslcompress.flops.count` on the torch models (ours: the zeroed "
             "model in its own architecture; Torch-Pruning: its physically pruned module); the ONNX count of "
             "compress()'s report is in the JSON, and shown beside where it differs. Params: parameters of the compact ONNX model (BatchNorm "
             "folded). Kept widths: output channels kept per layer, the classifier left out (CIFAR ResNets: "
             "per stage, trunk width [inner width of each block]). Train CPU: process CPU seconds from loading "
             "the data to the end of fine-tuning, per-epoch evaluations included. ORT speed-up: dense median "
             "latency / the model's, with a bootstrap 95% interval, all models of a case timed in interleaved "
             "rounds in one process.", ""]
    cases = doc["cases"]
    for model in dict.fromkeys(c["model"] for c in cases):
        mc = [c for c in cases if c["model"] == model]
        budgets = {b: [c for c in mc if c["budget"] == b] for b in dict.fromkeys(c["budget"] for c in mc)}
        seeded = any(len(bc) > 1 or seed_of(bc[0]) != 0 for bc in budgets.values())
        lines += [f"## {model}", ""]
        for bc in budgets.values():
            for c in bc:
                lines += render_case(c, seeded) + [""]
            if len(bc) > 1:
                lines += render_across(bc) + [""]
        lines += ["#### Targets", ""]
        for bc in budgets.values():
            for c in bc:
                lines += render_verdicts(c, seeded)
            lines += render_across_verdict(bc)
        lines += ["", "#### Settings", ""]
        for c in mc:
            s = c["settings"]
            lines.append(
                f"- budget {c['budget']:g}, seed {s['seed']} ({c['date_utc']}, `{c['command']}`): data {s['data']} "
                f"(one run per method and seed), batch {s['batch_size']}, {s['threads']} torch/ORT thread(s); ours: "
                f"sparsify {s['sparsify_epochs']} epochs at lr {s['sparsify_lr']:g} constant (ran "
                f"{c['rows']['ours']['epochs']['sparsify'] if 'ours' in c['rows'] else '-'}), start lambda "
                f"{s['strength']:g}, weighting {s['weighting']}, then fine-tune {s['finetune_epochs']} epochs at lr "
                f"{s['lr']:g} cosine; Torch-Pruning: {s.get('tp_epochs', '-')} epochs at lr {s['lr']:g} cosine "
                f"({s.get('tp_epochs_from', '-')}), SGD Nesterov momentum 0.9, no weight decay, both sides; align "
                f"{s.get('align') or 'none'}; ORT {s['rounds']} rounds. Pretrained: {s['pretrained']}"
                f"{' (sha256 ' + s['pretrained_sha256'] + ')' if s.get('pretrained_sha256') else ''}.")
        lines += ["", "#### Machine", ""]
        for c in mc:
            m = c["machine"]
            lines.append(f"- budget {c['budget']:g}, seed {seed_of(c)}: {m['cpu']}, nproc {m['nproc']}, load average at start "
                         f"{', '.join(f'{x:.2f}' for x in m['load_start'])}, at end "
                         f"{', '.join(f'{x:.2f}' for x in m['load_end'])}; torch {m['torch']}, ORT "
                         f"{m['onnxruntime']}, torch-pruning {m['torch_pruning']}, Python {m['python']}.")
        lines.append("")
    lines += ["## Notes", "",
              "- Torch-Pruning's criteria as its own CIFAR recipe builds them: L1 = `MagnitudeImportance(p=1)`, "
              "GroupNorm = `GroupMagnitudeImportance(p=2)`; in 1.6.1 both sum the norm over every layer of a "
              "dependency group (mean reduction) and divide by the group's mean. One-shot pruning with "
              "`BasePruner`, the classifier in `ignored_layers`, no sparse training before pruning (DepGraph's "
              "GroupNorm regularisation is a separate recipe and is not run).",
              "- pruning_ratio is searched per case (grid, then bisection) for the most MACs at or below ours; "
              "the search's CPU time counts in Torch-Pruning's training CPU (it is in the JSON apart, "
              "`prune_cpu_s`).",
              "- Our CPU time includes what run_finetune does beyond training (the one-shot probe's evaluation, "
              "the budget checks, the report, the checkpoint), so the ratio is an upper bound of our cost.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Models, data, counting


def dense_model(pretrained: Path, spec: ModelSpec) -> nn.Module:
    """The built-in model with the shared pretrained weights (a checkpoint or a state_dict), eval mode."""
    state, _ = read_weights(pretrained)
    model = build_model(spec)
    load_weights(model, state, source=str(pretrained))
    return model.eval()


def classifier_name(model: nn.Module, num_classes: int) -> str:
    """The last Linear with one output per class: left whole by Torch-Pruning, as our pipeline pins it."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not names:
        raise SystemExit(f"error: no Linear classifier with {num_classes} outputs in the model")
    return names[-1]


def widths_of(model: nn.Module, shape: tuple[int, ...], skip: str) -> dict[str, int]:
    """Output channels kept per Conv/Linear (zero channels an export deletes are not kept), classifier left out."""
    counted = count(model.eval(), shape)
    return {lay.name: lay.filters[0] for lay in counted.layers if lay.name != skip}


def make_importance(method: str):
    import torch_pruning as tp

    spec = TP_METHODS[method]["importance"]
    if spec == "MagnitudeImportance(p=1)":
        return tp.importance.MagnitudeImportance(p=1)
    return tp.importance.GroupMagnitudeImportance(p=2)


def tp_prune(model: nn.Module, method: str, ratio: float, spec: ModelSpec, align: int | None) -> nn.Module:
    """Prune `model` in place with Torch-Pruning at `ratio` (eval mode: tracing must not move BN statistics)."""
    import torch_pruning as tp

    model.eval()
    fc = dict(model.named_modules())[classifier_name(model, spec.num_classes)]
    example = torch.zeros(spec.input_shape)
    pruner = tp.pruner.BasePruner(model, example, importance=make_importance(method),
                                  global_pruning=TP_METHODS[method]["global_pruning"], pruning_ratio=ratio,
                                  ignored_layers=[fc], round_to=align if (align or 1) > 1 else None)
    pruner.step()
    return model


# ---------------------------------------------------------------------------------------------
# The methods


def ours_overrides(args, budget: float, out: Path) -> dict[str, Any]:
    return {"model": args.model, "data": args.data, "weights": str(args.pretrained), "out": str(out),
            "seed": args.seed, "threads": args.threads, "structures": ("filter", "channel"),
            "strength": args.strength, "weighting": args.weighting, "target_flops": budget, "align": args.align,
            "sparsify": {"epochs": args.sparsify_epochs, "lr": args.sparsify_lr, "batch_size": args.batch_size,
                         "schedule": "constant", "momentum": 0.9, "weight_decay": 0.0},
            "finetune": {"epochs": args.finetune_epochs, "lr": args.lr, "batch_size": args.batch_size,
                         "schedule": "cosine", "momentum": 0.9, "weight_decay": 0.0}}


def run_ours(args, budget: float, out: Path) -> tuple[dict, nn.Module]:
    cfg = build_config(FinetuneConfig, None, ours_overrides(args, budget, out))
    epochs = {"sparsify": 0, "finetune": 0}
    history: list[dict] = []
    marks: dict[str, float] = {}  # process CPU time at each phase's first optimizer step

    def on_event(e) -> None:
        if e.phase in ("sparsify", "finetune") and e.phase not in marks:
            marks[e.phase] = time.process_time()
        if e.phase == "info":
            log(f"ours {budget:g}: {e.message}")
        elif e.end_of_epoch:
            epochs[e.phase] = epochs.get(e.phase, 0) + 1
            history.append({"phase": e.phase, "epoch": e.epoch + 1, "loss": e.loss, "test_accuracy": e.accuracy,
                            "macs_fraction": e.macs_fraction})
            extra = f", MACs {e.macs_fraction:.4f}" if e.macs_fraction is not None else ""
            log(f"ours {budget:g}: {e.phase} epoch {e.epoch + 1}/{e.epochs}, loss {e.loss:.4f}, "
                f"test acc {e.accuracy:.4f}{extra}")

    log(f"ours {budget:g}: run_finetune into {out}")
    c0, w0 = time.process_time(), time.perf_counter()
    res = run_finetune(cfg, on_event)
    c1 = time.process_time()
    cpu, wall = c1 - c0, time.perf_counter() - w0
    s0, f0 = marks.get("sparsify", c1), marks.get("finetune", c1)
    # Up to the first sparsify step: data, model, groups, the evaluation before and the one-shot probe; up to
    # the first fine-tune step: sparsify, its budget checks, landing and thinning; then fine-tuning, the
    # report and the checkpoint.
    breakdown = {"setup": s0 - c0, "sparsify": f0 - s0, "finetune_and_report": c1 - f0}
    rep = res.report
    model = load_checkpoint(res.checkpoint).build()  # its own architecture, zeros where channels went
    acc = rep["accuracy"]
    row = {"method": "ours", "cpu_s": cpu, "wall_s": wall, "cpu_breakdown_s": breakdown,
           "epochs": {**epochs, "total": sum(epochs.values())}, "history": history,
           "accuracy_torch": acc.get("after_finetune"), "accuracy_before": acc.get("before"),
           "accuracy_after_sparsify": acc.get("after_sparsify"), "one_shot_same_budget": acc.get("one_shot_same_budget"),
           "report_macs_fraction": rep["totals"]["macs_fraction"], "report_macs_after": rep["totals"]["macs_after"],
           "report_params_after": rep["totals"]["params_after"], "budget_report": rep.get("budget"),
           "forced_groups": rep.get("forced_groups"), "thinned": rep.get("thinned"),
           "phase_wall_s": rep.get("wall_time_s"), "checkpoint": str(res.checkpoint)}
    return row, model


def run_tp(method: str, args, spec: ModelSpec, target: int, epochs: int) -> tuple[dict, nn.Module]:
    """Load the data, search the ratio, prune and fine-tune; timed as one, as ours is."""
    from sslcompress.data import load_data

    seed_everything(args.seed)
    c0, w0 = time.process_time(), time.perf_counter()
    data = load_data(args.data, limit_train=args.limit_train, limit_test=args.limit_test, seed=args.seed)
    base = dense_model(args.pretrained, spec)

    def macs_at(ratio: float) -> int:
        trial = tp_prune(copy.deepcopy(base), method, ratio, spec, args.align)
        return count(trial, spec.input_shape).macs

    search = search_ratio(macs_at, target)
    model = tp_prune(base, method, search.ratio, spec, args.align)
    prune_cpu = time.process_time() - c0
    log(f"{method}: pruning_ratio {search.ratio:.4f} gives {search.macs} MACs (target {target}, "
        f"{'met' if search.met else 'NOT met'}; {len(search.tried)} ratios tried, {prune_cpu:.1f} s CPU)")
    accuracy_pruned = evaluate(model, data, args.eval_batch_size, "cpu")
    opts = TrainOptions(epochs=epochs, batch_size=args.batch_size, lr=args.lr, momentum=0.9, weight_decay=0.0,
                        schedule="cosine")
    opt = make_optimizer(model, opts)
    sched = make_schedule(opt, opts, data.num_batches("train", opts.batch_size, drop_last=True))
    env = DistEnv()
    history = []
    for epoch in range(epochs):
        loss, _ = train_epoch(model, model, data, opt, sched, batch_size=opts.batch_size, epoch=epoch,
                              epochs=epochs, phase="finetune", seed=args.seed, env=env, device="cpu")
        check_finite_weights(model, "finetune")
        acc = evaluate(model, data, args.eval_batch_size, "cpu", phase="finetune")
        history.append({"phase": "finetune", "epoch": epoch + 1, "loss": loss, "test_accuracy": acc})
        log(f"{method}: finetune epoch {epoch + 1}/{epochs}, loss {loss:.4f}, test acc {acc:.4f}")
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    row = {"method": method, "cpu_s": cpu, "wall_s": wall, "prune_cpu_s": prune_cpu,
           "cpu_breakdown_s": {"data_search_prune": prune_cpu, "finetune": cpu - prune_cpu},
           "epochs": {"finetune": epochs, "total": epochs}, "history": history,
           "accuracy_torch": history[-1]["test_accuracy"] if history else accuracy_pruned,
           "accuracy_pruned": accuracy_pruned, "pruning_ratio": search.ratio, "target_met": search.met,
           "ratios_tried": {f"{r:.6f}": m for r, m in search.tried.items()},
           "criterion": TP_METHODS[method]}
    return row, model.eval()


# ---------------------------------------------------------------------------------------------
# ONNX: export, cut, accuracy, timing


def to_onnx(model: nn.Module, shape: tuple[int, ...]) -> tuple[bytes, dict]:
    """What `sslcompress export --onnx` writes: export_onnx (dynamic batch), compress(), verified."""
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    exported = export_onnx(model.eval(), shape, dynamic_batch=True)
    result = compress(exported.model)
    if not result.verification.passed:
        raise SystemExit(f"error: the compact model failed verification (rel {result.verification.rel:.3g})")
    return result.model.SerializeToString(), result.report


def ort_accuracy(onnx_bytes: bytes, images, threads: int) -> float:
    from sslcompress.bench.accuracy import top1
    from sslcompress.runtime import create_session

    correct, n = top1(create_session(onnx_bytes, threads=threads), images)
    return correct / n


def images_of(data):
    from sslcompress.bench.accuracy import TestImages

    xs, ys = zip(*data.batches("test", 256), strict=True)
    return TestImages(data.name, np.concatenate([b.numpy() for b in xs]).astype(np.float32, copy=False),
                      np.concatenate([b.numpy() for b in ys]).astype(np.int64, copy=False))


def time_ort(models: dict[str, bytes], shape: tuple[int, ...], args) -> dict[str, dict[str, dict]]:
    """{batch: {name: timing}}: every model against 'dense', interleaved rounds, pinned as the bench pins."""
    from sslcompress.runtime import calling_thread_on, create_session, interleaved, placement, runner, timings

    out: dict[str, dict[str, dict]] = {}
    sessions = {n: create_session(b, threads=args.threads, pin=True) for n, b in models.items()}
    where = placement(args.threads)
    for batch in BATCHES:
        x = np.random.default_rng(args.seed).standard_normal((batch, *shape[1:]), dtype=np.float32)
        runs = {n: runner(s, x, "cpu") for n, s in sessions.items()}
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        with calling_thread_on(where[0] if where else None):
            raw = interleaved(runs, repeat=args.rounds, warmup=args.warmup, sample_time=args.sample_s)
        recs = timings(raw, baseline="dense", provider="cpu", threads=args.threads, batch=batch, seed=args.seed)
        out[str(batch)] = {t.variant: {**{k: v for k, v in t.to_dict().items() if k != "samples_s"},
                                       "samples_s": list(t.samples_s), "load_before": load} for t in recs}
        log(f"ORT batch {batch} ({time.perf_counter() - t0:.0f} s): dense "
            f"{1e3 * out[str(batch)]['dense']['median_s']:.3f} ms; " + ", ".join(
                f"{n} {out[str(batch)][n]['speedup']:.2f}x" for n in models if n != "dense"))
    return out


# ---------------------------------------------------------------------------------------------
# Driver


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = cpu_name()
    try:
        from importlib.metadata import version

        tp_version = version("torch-pruning")
    except Exception:  # noqa: BLE001 - not installed: only ours ran
        tp_version = None
    return {"cpu": cpu, "nproc": os.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "torch_pruning": tp_version, "python": platform.python_version(), "platform": platform.platform(),
            "load_start": list(os.getloadavg())}


def ensure_pretrained(args) -> Path:
    if args.pretrained:
        path = Path(args.pretrained).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(f"error: --pretrained {path} not found")
        log(f"pretrained: {path} (given)")
        return path
    path = args.out / "pretrained.pt"
    if path.is_file():
        log(f"pretrained: reusing {path}")
        return path
    train = {"epochs": args.pretrain_epochs, "lr": args.pretrain_lr, "batch_size": args.batch_size,
             "schedule": "cosine", "momentum": 0.9, "weight_decay": 5e-4}
    cfg = build_config(PretrainConfig, None, {"model": args.model, "data": args.data, "out": str(args.out),
                                              "seed": args.seed, "threads": args.threads,
                                              "limit_train": args.limit_train, "limit_test": args.limit_test,
                                              "train": train})
    log(f"pretraining {args.model} on {args.data}: {train}")

    def on_event(e) -> None:
        if e.end_of_epoch:
            log(f"pretrain epoch {e.epoch + 1}/{e.epochs}, loss {e.loss:.4f}, test acc {e.accuracy:.4f}")

    res = run_pretrain(cfg, on_event)
    return res.checkpoint


def onnx_row(row: dict, model: nn.Module, spec: ModelSpec, dense_macs: int, counter_dense: int, images, args,
             skip: str, path: Path) -> bytes:
    """The row's compact ONNX model: its MACs, parameters, widths and ORT accuracy filled in."""
    onnx_bytes, rep = to_onnx(model, spec.input_shape)
    atomic_write_bytes(onnx_bytes, path)
    counted = count(model.eval(), spec.input_shape)
    acc = ort_accuracy(onnx_bytes, images, args.threads)
    row.update({"macs": counted.macs_after, "macs_fraction": counted.macs_after / counter_dense,
                "onnx_macs": rep["totals"]["macs_after"], "onnx_macs_fraction": rep["totals"]["macs_after"] / dense_macs,
                "params": rep["totals"]["params_after"], "params_torch": counted.params_after,
                "widths": widths_of(model, spec.input_shape, skip), "accuracy": acc, "error": 1.0 - acc,
                "onnx": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)})
    if row["onnx_macs"] != row["macs"]:
        log(f"{row['method']}: the ONNX count gives {row['onnx_macs']} MACs, the torch count {row['macs']}")
    return onnx_bytes


def run_case(args, budget: float, spec: ModelSpec, dense: dict, dense_bytes: bytes, images, old: dict | None) -> dict:
    case_dir = args.out / (f"b{budget:g}" + (f"-seed{args.seed}" if args.seed else ""))
    case_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    skip = dense["classifier"]
    rows: dict[str, dict] = {}
    models: dict[str, bytes] = {"dense": dense_bytes}
    target = None
    ours_epochs = None
    if "ours" in args.methods:
        row, model = run_ours(args, budget, case_dir / "ours")
        models["ours"] = onnx_row(row, model, spec, dense["onnx_macs"], dense["macs"], images, args, skip,
                                  case_dir / "ours.onnx")
        rows["ours"] = row
        target, ours_epochs = row["macs"], row["epochs"]["total"]
        log(f"ours {budget:g}: error {row['error']:.2%} (ORT), MACs {row['macs_fraction']:.4f}, "
            f"{row['cpu_s']:.1f} s CPU, widths {compact_widths(row['widths'])}")
    elif old is not None and "ours" in old.get("rows", {}):
        target, ours_epochs = old["rows"]["ours"]["macs"], old["rows"]["ours"]["epochs"]["total"]
        log(f"target from the earlier ours row of this case (seed {seed_of(old)}): {target} MACs, "
            f"{ours_epochs} epochs")
    if target is None:
        target = math.floor(budget * dense["macs"])
        log(f"no ours row for this case: Torch-Pruning aims at budget x dense = {target} MACs")
    if args.tp_epochs:
        tp_epochs, tp_from = args.tp_epochs, "--tp-epochs"
    elif ours_epochs is not None:
        tp_epochs, tp_from = ours_epochs, "as many as ours trained in all"
    else:
        tp_epochs, tp_from = args.sparsify_epochs + args.finetune_epochs, "S+F, no ours row"
    for method in (m for m in args.methods if m != "ours"):
        row, model = run_tp(method, args, spec, target, tp_epochs)
        models[method] = onnx_row(row, model, spec, dense["onnx_macs"], dense["macs"], images, args, skip,
                                  case_dir / f"{method}.onnx")
        rows[method] = row
        log(f"{method} {budget:g}: error {row['error']:.2%} (ORT), MACs {row['macs_fraction']:.4f}, "
            f"{row['cpu_s']:.1f} s CPU, widths {compact_widths(row['widths'])}")
    ort = time_ort(models, spec.input_shape, args)
    dense_case = {**dense, "ort": {b: ort[b]["dense"] for b in ort}}
    for m, row in rows.items():
        row["ort"] = {b: ort[b][m] for b in ort}
    info["load_end"] = list(os.getloadavg())
    settings = {k: getattr(args, k) for k in ("data", "seed", "batch_size", "threads", "sparsify_epochs",
                                              "sparsify_lr", "finetune_epochs", "lr", "strength", "weighting",
                                              "align", "rounds", "warmup", "sample_s", "limit_train", "limit_test",
                                              "eval_batch_size")}
    pre = Path(args.pretrained)
    # The path alone does not name the weights: a checkpoint pretrained again lands at the same place.
    settings.update(pretrained=str(pre.relative_to(REPO)) if pre.is_relative_to(REPO) else str(pre),
                    pretrained_sha256=hashlib.sha256(pre.read_bytes()).hexdigest()[:12], tp_epochs=tp_epochs, tp_epochs_from=tp_from, methods=list(args.methods))
    return {"model": args.model, "budget": budget, "data_name": dense["data_name"], "target_macs": target,
            "mac_counter": "sslcompress.flops.count (torch models); compress() report in onnx_macs",
            "dense": dense_case, "rows": rows, "settings": settings, "machine": info,
            "date_utc": datetime.now(UTC).isoformat(timespec="seconds"), "command": args.command}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5", choices=list(MODELS))
    ap.add_argument("--budgets", default=None, help="comma list of MAC fractions (lenet5 0.10,0.04; resnet20 0.5,0.3)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--data", default=None, help="data spec (lenet5: mnist:../shared/data/mnist/mnist.npz; "
                                                 "resnet20: cifar10:../shared/data/cifar10/cifar10_jpeg_q75.npz)")
    ap.add_argument("--pretrained", default=None, help="the shared dense checkpoint (else pretrained here)")
    ap.add_argument("--pretrain-epochs", type=int, default=None)
    ap.add_argument("--pretrain-lr", type=float, default=None)
    ap.add_argument("--sparsify-epochs", type=int, default=None, help="S: ours' sparsify epochs")
    ap.add_argument("--finetune-epochs", type=int, default=None,
                    help="F: ours' fine-tune epochs (Torch-Pruning fine-tunes as many epochs as ours trained)")
    ap.add_argument("--tp-epochs", type=int, default=None,
                    help="Torch-Pruning's fine-tune epochs (default: the epochs ours trained in this case, "
                         "sparsify epochs run + F; S+F without an ours row)")
    ap.add_argument("--sparsify-lr", type=float, default=None, help="ours' sparsify lr (constant)")
    ap.add_argument("--lr", type=float, default=None, help="fine-tune lr (cosine), ours and Torch-Pruning's")
    ap.add_argument("--strength", type=float, default=None, help="ours' start lambda (the budget steers it)")
    ap.add_argument("--weighting", default=None, choices=["none", "sqrt", "macs"], help="ours' group weighting")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--eval-batch-size", type=int, default=256)
    ap.add_argument("--align", type=int, default=None,
                    help="widths a multiple of N on both sides (ours --align, Torch-Pruning round_to); off by default")
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved ORT timing rounds (default 30; quick 5)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sample-s", type=float, default=0.05, help="seconds of back-to-back calls per timing sample")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: lenet5 on digits, 3 pretrain + 2 + 2 epochs, 5 rounds; results to benchmarks/out")
    ap.add_argument("--out", default=None, help="run folder (default benchmarks/out/vs_torch_pruning[_quick]/MODEL)")
    ap.add_argument("--results", default=None,
                    help="folder of the .json/.md (default benchmarks/results; benchmarks/out with --quick)")
    args = ap.parse_args(argv)
    if args.quick and args.model != "lenet5":
        ap.error("--quick runs lenet5 on digits")
    defaults = dict(MODELS[args.model])
    if args.quick:
        defaults.update(QUICK)
    for key in ("data", "pretrain_epochs", "pretrain_lr", "sparsify_epochs", "finetune_epochs", "sparsify_lr", "lr",
                "strength", "weighting", "batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.rounds is None:
        args.rounds = defaults.get("rounds", 30)
    args.budgets = tuple(csv(args.budgets, float)) if args.budgets else tuple(defaults["budgets"])
    args.methods = tuple(csv(args.methods))
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        ap.error(f"--methods takes {', '.join(METHODS)}; got {', '.join(unknown) or 'none'}")
    if not all(0 < b < 1 for b in args.budgets):
        ap.error("--budgets must be fractions in (0, 1)")
    if args.tp_epochs is not None and args.tp_epochs < 1:
        ap.error("--tp-epochs must be at least 1")
    if args.rounds < 1 or args.threads < 1 or args.sample_s <= 0 or args.warmup < 0:
        ap.error("--rounds >= 1, --threads >= 1, --sample-s > 0 and --warmup >= 0 are required")
    stem_out = f"{STEM}_quick" if args.quick else STEM
    args.out = Path(args.out) if args.out else OUT_DIR / stem_out / args.model
    args.results = Path(args.results) if args.results else (OUT_DIR if args.quick else RESULTS_DIR)
    args.stem = stem_out
    args.command = " ".join(["python", *([Path(sys.argv[0]).as_posix()] if argv is None else []),
                             *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if any(m != "ours" for m in args.methods):
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("error: torch-pruning is not installed: pip install -r benchmarks/requirements.txt",
                  file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    log(f"{args.model} on {args.data}, budgets {', '.join(f'{b:g}' for b in args.budgets)}, methods "
        f"{', '.join(args.methods)}; torch {torch.__version__}, {args.threads} thread(s), nproc {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}")
    args.pretrained = ensure_pretrained(args)

    from sslcompress.data import load_data

    data = load_data(args.data, limit_train=args.limit_train, limit_test=args.limit_test, seed=args.seed)
    spec = ModelSpec(args.model, num_classes=data.num_classes, in_channels=data.in_channels,
                     input_size=data.image_size)
    images = images_of(data)
    del data
    base = dense_model(args.pretrained, spec)
    skip = classifier_name(base, spec.num_classes)
    dense_bytes, dense_rep = to_onnx(base, spec.input_shape)
    atomic_write_bytes(dense_bytes, args.out / "dense.onnx")
    counted = count(base, spec.input_shape)
    dense_acc = ort_accuracy(dense_bytes, images, args.threads)
    dense = {"macs": counted.macs, "onnx_macs": dense_rep["totals"]["macs"], "params": dense_rep["totals"]["params"],
             "params_torch": counted.params, "widths": widths_of(base, spec.input_shape, skip), "accuracy": dense_acc,
             "error": 1.0 - dense_acc, "classifier": skip, "data_name": images.name}
    log(f"dense: error {dense['error']:.2%} (ORT), {dense['macs']} MACs (ONNX {dense['onnx_macs']})")

    json_path, md_path = args.results / f"{args.stem}.json", args.results / f"{args.stem}.md"
    old_doc = json.loads(json_path.read_text()) if json_path.is_file() else {"cases": []}
    old_cases = {case_key(c["model"], c["budget"], seed_of(c)): c for c in old_doc.get("cases", [])}
    new_cases = []
    for budget in args.budgets:
        # Torch-Pruning aims at the MACs ours reached with this seed, else with another seed of this budget.
        candidates = [old_cases.get(case_key(args.model, budget, args.seed))]
        candidates += [c for c in old_cases.values() if (c["model"], c["budget"]) == (args.model, budget)]
        prior = next((c for c in candidates if c is not None and "ours" in c.get("rows", {})), candidates[0])
        case = run_case(args, budget, spec, dense, dense_bytes, images, prior)
        new_cases.append(case)
        # Read again: another run (another model or budget) may have written its cases meanwhile.
        old_doc = json.loads(json_path.read_text()) if json_path.is_file() else {"cases": []}
        doc = {"benchmark": STEM, "quick": args.quick, "date_utc": case["date_utc"], "command": args.command,
               "cases": merge_cases(list(old_doc.get("cases", [])), [json.loads(json.dumps(c)) for c in new_cases])}
        atomic_write_json(doc, json_path)  # after every case: a later failure keeps the cases done
        atomic_write_bytes(render_md(doc).encode(), md_path)
        key = case_key(args.model, budget, args.seed)
        shown = next(c for c in doc["cases"] if case_key(c["model"], c["budget"], seed_of(c)) == key)
        same = [c for c in doc["cases"] if (c["model"], c["budget"]) == (args.model, budget)]
        print("\n".join(render_case(shown, len(same) > 1) + [""] + render_verdicts(shown, len(same) > 1) + [""]
                        + render_across(same) + [""] + render_across_verdict(same)), flush=True)
    log(f"done in {time.perf_counter() - t_all:.0f} s; wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
