"""The paper's CIFAR-10 rows beside ours: ResNet-20 with depth-wise SSL, the ConvNet with filter+channel SSL.

Wen et al., "Learning Structured Sparsity in Deep Neural Networks" (NeurIPS 2016), as summarised in
../shared/reference/ssl-paper.md:

    resnet20_depth           ResNet-20 8.82% error -> SSL-ResNet-14 8.54% (6 of 20 layers, 3 residual blocks, gone)
    convnet_filter_channel   ConvNet (Caffe's cifar10_full) 17.9% error -> SSL 17.9% at per-layer speed-ups
                             1.43 / 3.05 / 1.57x, and SSL 16.9% at 1.25 / 2.01 / 1.18x

Each row goes through the library's Python API (build_config, run_pretrain, run_finetune), then the
export path of `sslcompress export --onnx` (export_onnx with a dynamic batch, compress(), verified in
ONNX Runtime against the uncut export, also on real test images, and its MACs checked against the
checkpoint's count), then the library's bench (run_bench: dense, unstructured and structured models timed
interleaved in ONNX Runtime on the CPU, top-1 of each in ORT on the run's test images; for the ConvNet also
the per-layer GEMM study, each conv lowered to one GEMM as in the paper's speed figures).

ResNet-20: `depth` groups (all parameters of one residual branch, its last BatchNorm included; a zero
group makes the block the identity, or the projection shortcut alone in the first block of stages 2
and 3). The reference code's settings: lr 0.1, weight decay 1e-4, block strength 0.007 (here the
starting lambda of the proximal solver), fine-tune at lr 0.01. The reference trains 64k iterations
(about 164 epochs); with a few epochs that strength removes nothing, so the run asks for a MAC budget
that only `--resnet20-blocks` removed blocks reach (1 minus the MACs of the cheapest such blocks):
the controller raises lambda until it is met, and ranks blocks by norm at the end of sparsify if not.
`--resnet20-blocks 0` runs lambda alone, the paper's way.

ConvNet: filter and channel groups, weighted by the MACs they cost, with a whole-model MAC budget
derived from each paper row's speed-ups (sum over layers of MACs / speed-up, the fc as it is): a
measured speed-up is at most the MAC reduction, so the paper's layers kept at most that much.

Usage (from the repository root):

    python benchmarks/paper_cifar10.py                           # both rows, the default epochs
    python benchmarks/paper_cifar10.py --rows convnet_filter_channel --convnet-weights FILE
    python benchmarks/paper_cifar10.py --quick                   # smoke run: 2000 train / 1000 test images,
                                                                 # 1 epoch a phase; writes to benchmarks/out

Results: benchmarks/results/paper_cifar10.json and .md (benchmarks/out/paper_cifar10_quick.* with
--quick); checkpoints and ONNX models under benchmarks/out/paper_cifar10[_quick]/. Re-running one row
keeps the other row's latest results. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import onnx
import torch
from bench_log import csv, log, on_event  # beside this script: the progress lines the benchmarks share

from sslcompress.bench.config import BenchConfig
from sslcompress.bench.run import run_bench
from sslcompress.config import FinetuneConfig, PretrainConfig, build_config
from sslcompress.errors import VerificationError
from sslcompress.finetune.checkpoint import load_checkpoint
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.pipeline import run_finetune, run_pretrain
from sslcompress.flops import count
from sslcompress.io import atomic_write_bytes, atomic_write_json
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import check_export_counts, export_onnx
from sslcompress.surgery.inputs import real_inputs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10" / "cifar10_jpeg_q75.npz"
# A dense ResNet-20 pretrained on the full training set (10 epochs, lr 0.1, batch 128) is expected here.
DEFAULT_RESNET20 = REPO / "benchmarks" / "out" / "cifar_resnet20" / "pretrained.pt"
ROWS = ("resnet20_depth", "convnet_filter_channel")
STEM = "paper_cifar10"
CONVS = ("conv1", "conv2", "conv3")
# Layers of the paper's ResNet-20 count: 19 convs and the fc; each residual block holds two of them.
RESNET20_LAYERS = 20

# The paper's rows, from ../shared/reference/ssl-paper.md.
PAPER_RESNET = [
    {"row": "paper ResNet-20", "error": 0.0882, "layers": 20},
    {"row": "paper SSL-ResNet-14", "error": 0.0854, "layers": 14},
]
PAPER_CONVNET = [
    {"row": "paper baseline", "error": 0.179, "speedup": [1.0, 1.0, 1.0]},
    {"row": "paper SSL (1)", "error": 0.179, "speedup": [1.43, 3.05, 1.57]},
    {"row": "paper SSL (2)", "error": 0.169, "speedup": [1.25, 2.01, 1.18]},
]


# ---------------------------------------------------------------------------------------------
# Training through the library


def phase(epochs: int, lr: float, batch: int, weight_decay: float, schedule: str) -> dict:
    return {"epochs": epochs, "lr": lr, "batch_size": batch, "momentum": 0.9, "weight_decay": weight_decay,
            "schedule": schedule}


def run_options(args, model: str, out: Path) -> dict:
    """What every stage of one model shares; the limits only where asked (quick runs)."""
    opts = {"model": model, "data": args.data_spec, "out": str(out), "seed": args.seed, "threads": args.threads}
    if args.limit_train is not None:
        opts["limit_train"] = args.limit_train
    if args.limit_test is not None:
        opts["limit_test"] = args.limit_test
    return opts


def pretrain(args, model: str, out: Path, train: dict) -> tuple[Path, float]:
    """A dense baseline by run_pretrain into OUT/pretrained.pt; returns its path and the seconds it took."""
    cfg = build_config(PretrainConfig, None, {**run_options(args, model, out), "train": dict(train)})
    log(f"pretraining {model} into {out}: {train}")
    t0 = time.perf_counter()
    res = run_pretrain(cfg, on_event)
    return res.checkpoint, time.perf_counter() - t0


def finetune(args, model: str, weights: Path, out: Path, settings: dict) -> tuple[dict, float]:
    """One SSL run by run_finetune; returns its report and the seconds it took."""
    overrides = {**run_options(args, model, out), "weights": str(weights), **settings}
    cfg = build_config(FinetuneConfig, None, overrides)
    log(f"{model} SSL into {out}: structures {settings['structures']}, lambdas {settings['lambdas']}, "
        f"target_flops {settings['target_flops']}")
    t0 = time.perf_counter()
    res = run_finetune(cfg, on_event)
    return res.report, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Export, surgery and bench


def export_dense(ckpt_path: Path, dst: Path) -> None:
    """The dense baseline as ONNX with a dynamic batch, as `sslcompress export` writes its uncut model."""
    ckpt = load_checkpoint(ckpt_path)
    exported = export_onnx(ckpt.build(), ckpt.model.input_shape, dynamic_batch=True)
    atomic_write_bytes(exported.model.SerializeToString(), dst)


def export_compact(args, sparse: Path, run_dir: Path) -> dict:
    """`sslcompress export SPARSE --onnx compact.onnx --uncut uncut.onnx --dynamic-batch --data DATA`:
    the checkpoint's model exported, cut, verified in ORT (random and real test images), and its MACs held
    to the checkpoint's own count. Writes both models and surgery.json; returns the surgery report."""
    ckpt = load_checkpoint(sparse)
    model = ckpt.build()
    shape = ckpt.model.input_shape
    exported = export_onnx(model, shape, dynamic_batch=True)
    result = compress(exported.model, inputs=real_inputs(exported.model, args.data_spec, limit=64))
    report = result.report
    counted = count(model, shape)
    totals = report["totals"]
    report["predicted"] = {"macs": counted.macs, "macs_after": counted.macs_after}
    if not report["verification"]["passed"]:
        raise SystemExit(f"error: the compact model of {sparse} fails verification: {report['verification']}")
    # The export command's check: the ONNX model is the model the budget counted, and the surgery removed at
    # least what the training counted as removed.
    try:
        check_export_counts(counted.macs, counted.macs_after, totals, removed=counted.macs_emptied)
    except VerificationError as exc:
        raise SystemExit(f"error: {sparse}: {exc}") from None
    atomic_write_bytes(exported.model.SerializeToString(), run_dir / "uncut.onnx")
    atomic_write_bytes(result.model.SerializeToString(), run_dir / "compact.onnx")
    atomic_write_json(report, run_dir / "surgery.json")
    log(f"surgery of {sparse}: ONNX MACs {totals['macs']} -> {totals['macs_after']} "
        f"({totals['macs_fraction']:.3f}), verification passed (rel {report['verification']['rel']:.2g}, "
        f"{report['verification']['real_images']} real images)")
    return report


def bench(args, dense: Path, compact: Path, layers: bool) -> dict:
    """The library's bench of the dense and compact ONNX models (the unstructured one built from them)."""
    cfg = BenchConfig(dense=str(dense), structured=str(compact), threads=tuple(args.bench_threads),
                      batches=tuple(args.bench_batch), repeat=args.bench_rounds, layers=layers, memory=False,
                      data=args.data_spec, data_limit=args.limit_test or 10000, seed=args.seed)
    log(f"bench of {compact} against {dense}: threads {args.bench_threads}, batch {args.bench_batch}, "
        f"{args.bench_rounds} rounds{', per-layer GEMM study' if layers else ''}")
    res = run_bench(cfg, lambda e: log(f"bench {e.stage}: {e.message}") if e.done == 0 else None)
    return summarize_bench(res)


def summarize_bench(res) -> dict:
    """Speed-ups per (threads, batch), top-1 in ORT, and per-layer GEMM speed-ups (compact and CSR)."""
    speed = {}
    for provider, threads, batch in res.settings():
        d = res.timing("dense", provider, threads, batch)
        row = {"dense_ms": 1e3 * d.median_s}
        for v in ("unstructured", "structured"):
            t = res.timing(v, provider, threads, batch)
            row[v] = {"median_ms": 1e3 * t.median_s, "speedup": t.speedup, "ci95": list(t.speedup_ci)}
        speed[f"t{threads}_b{batch}"] = {"threads": threads, "batch": batch, **row}
    per_layer = {}
    for r in res.layers:
        per_layer[r.name] = {"threads": r.threads, "batch": r.batch, "gemm": [r.M, r.K, r.N],
                             "compact_gemm": list(r.compact) if r.compact else None, "ideal": r.ideal,
                             "compact_speedup": r.speedup("compact"), "csr_speedup": r.speedup("csr")}
    return {"speed": speed, "layers": per_layer, "layers_skipped": res.layers_skipped,
            "ort_top1": {v.name: v.accuracy for v in res.variants}, "ort_top1_images": res.variants[0].accuracy_images,
            "macs": {v.name: v.macs for v in res.variants}, "env": res.env, "notes": list(res.notes),
            "raw": res.to_dict()}


# ---------------------------------------------------------------------------------------------
# ResNet-20, depth-wise


def depth_target(blocks: int) -> tuple[float, list[str]]:
    """The largest MAC fraction that only removing at least `blocks` residual blocks reaches: 1 minus the
    MACs of the cheapest `blocks` of them (the first blocks of stages 2 and 3 cost least)."""
    spec = ModelSpec("resnet20", num_classes=10, in_channels=3, input_size=(32, 32))
    model = build_model(spec)
    total = count(model, spec.input_shape).macs
    groups = sorted(build_groups(model, spec.input_shape, ("depth",)), key=lambda g: g.cost)
    cheapest = groups[:blocks]
    return 1.0 - sum(g.cost for g in cheapest) / total, [g.name.removeprefix("depth ") for g in cheapest]


def resnet20_weights(args, out: Path) -> tuple[Path, dict]:
    """The given (or default) pretrained ResNet-20, or one pretrained here when the default is missing."""
    given = Path(args.resnet20_weights) if args.resnet20_weights else DEFAULT_RESNET20
    if given.is_file():
        log(f"ResNet-20 baseline: {given}")
        return given, {"weights": str(given)}
    if args.resnet20_weights:
        raise SystemExit(f"error: --resnet20-weights {given} does not exist")
    train = phase(args.resnet20_pretrain_epochs, 0.1, 128, 5e-4, "cosine")
    log(f"{given} not found: pretraining a ResNet-20 here")
    path, secs = pretrain(args, "resnet20", out / "resnet20_pretrain", train)
    return path, {"weights": str(path), "pretrained_here": train, "pretrain_s": secs}


def resnet20_settings(args) -> dict:
    if args.resnet20_target_flops is not None:
        target, cheapest = args.resnet20_target_flops, []
    elif args.resnet20_blocks > 0:
        target, cheapest = depth_target(args.resnet20_blocks)
    else:
        target, cheapest = None, []
    return {"structures": ("depth",), "lambdas": {"depth": args.resnet20_lambda}, "solver": "proximal",
            "weighting": "none", "target_flops": target,
            "sparsify": phase(args.resnet20_sparsify_epochs, args.resnet20_lr, 128, 1e-4, "constant"),
            "finetune": phase(args.resnet20_finetune_epochs, args.resnet20_finetune_lr, 128, 1e-4, "cosine"),
            "_cheapest_blocks": cheapest}


def run_resnet20(args, out: Path) -> dict:
    weights, source = resnet20_weights(args, out)
    settings = resnet20_settings(args)
    cheapest = settings.pop("_cheapest_blocks")
    run_dir = out / "resnet20_depth"
    report, secs = finetune(args, "resnet20", weights, run_dir, settings)
    surgery = export_compact(args, run_dir / "sparse.pt", run_dir)
    export_dense(weights, run_dir / "dense.onnx")
    speed = bench(args, run_dir / "dense.onnx", run_dir / "compact.onnx", layers=False)
    return resnet20_row(args, report, surgery, speed, {**source, **jsonable(settings),
                                                       "target_from_cheapest_blocks": cheapest}, secs)


def resnet20_row(args, report: dict, surgery: dict, speed: dict, settings: dict, secs: float) -> dict:
    acc = report["accuracy"]
    removed = list(report["blocks_removed"])
    layers = RESNET20_LAYERS - 2 * len(removed)
    err_before, err_after = 1 - acc["before"], 1 - acc["after_finetune"]
    return {
        "row": "resnet20_depth",
        "baseline": {"error": err_before, "layers": RESNET20_LAYERS},
        "ssl": {"error": err_after, "error_after_sparsify": error_of(acc, "after_sparsify"),
                "one_shot_same_budget_error": error_of(acc, "one_shot_same_budget"),
                "layers": layers, "blocks_removed": removed, "blocks_total": report["blocks_total"],
                "macs_fraction": report["totals"]["macs_fraction"],
                "params_fraction": report["totals"]["params_fraction"],
                "onnx_macs_fraction": surgery["totals"]["macs_fraction"],
                "budget": report.get("budget"), "forced_groups": report.get("forced_groups"),
                "lambdas_final": report.get("lambdas"), "wall_time_s": {"stage": secs, **report["wall_time_s"]}},
        "bench": speed,
        "surgery_totals": surgery["totals"],
        "goal": {"max_layers": 14, "max_error": err_before,
                 "text": "at least 6 of 20 layers removed (3 blocks) at no more error than our own ResNet-20 "
                         "(the paper's SSL-ResNet-14 went from 8.82% to 8.54%)"},
        "goal_met": {"layers": layers <= 14, "error": err_after <= err_before + 1e-12},
        "settings": settings,
    }


# ---------------------------------------------------------------------------------------------
# ConvNet, filter+channel


def convnet_target(speedups: list[float]) -> float:
    """The whole-model MAC fraction the paper's per-layer speed-ups allow at most: sum of MACs / speed-up
    over conv1-3, the fc counted whole, over the dense MACs."""
    spec = ModelSpec("convnet", num_classes=10, in_channels=3, input_size=(32, 32))
    counted = count(build_model(spec), spec.input_shape)
    macs = {lay.name: lay.macs for lay in counted.layers}
    kept = sum(macs[c] / s for c, s in zip(CONVS, speedups)) + sum(m for n, m in macs.items() if n not in CONVS)
    return kept / counted.macs


def convnet_weights(args, out: Path) -> tuple[Path, dict]:
    if args.convnet_weights:
        given = Path(args.convnet_weights)
        if not given.is_file():
            raise SystemExit(f"error: --convnet-weights {given} does not exist")
        log(f"ConvNet baseline: {given}")
        return given, {"weights": str(given)}
    train = phase(args.convnet_pretrain_epochs, args.convnet_pretrain_lr, 64, 5e-4, "cosine")
    path, secs = pretrain(args, "convnet", out / "convnet_pretrain", train)
    return path, {"weights": str(path), "pretrained_here": train, "pretrain_s": secs}


def convnet_settings(args, aim: int) -> dict:
    lam = args.convnet_lambda
    return {"structures": ("filter", "channel"), "lambdas": {"filter": lam, "channel": lam}, "solver": "proximal",
            "weighting": "macs", "target_flops": convnet_target(PAPER_CONVNET[aim]["speedup"]),
            "sparsify": phase(args.convnet_sparsify_epochs, args.convnet_lr, 64, 0.0, "constant"),
            "finetune": phase(args.convnet_finetune_epochs, args.convnet_finetune_lr, 64, 5e-4, "cosine")}


def run_convnet(args, out: Path) -> dict:
    weights, source = convnet_weights(args, out)
    dense_onnx = out / "convnet_dense.onnx"
    export_dense(weights, dense_onnx)
    baseline_error, variants = None, []
    for aim in args.convnet_aims:
        settings = convnet_settings(args, aim)
        run_dir = out / f"convnet_ssl{aim}"
        report, secs = finetune(args, "convnet", weights, run_dir, settings)
        surgery = export_compact(args, run_dir / "sparse.pt", run_dir)
        speed = bench(args, dense_onnx, run_dir / "compact.onnx", layers=True)
        variants.append(convnet_variant(aim, report, surgery, speed, jsonable(settings), secs))
        baseline_error = 1 - report["accuracy"]["before"]
    for v in variants:
        judge_convnet(v, baseline_error)
    return {"row": "convnet_filter_channel", "baseline": {"error": baseline_error, **source},
            "variants": variants}


def convnet_variant(aim: int, report: dict, surgery: dict, speed: dict, settings: dict, secs: float) -> dict:
    layers = {lay["name"]: lay for lay in report["layers"]}
    acc = report["accuracy"]
    onnx_layers = {r["name"]: r for r in surgery["layers"]}
    return {
        "aim": PAPER_CONVNET[aim]["row"],
        "error": 1 - acc["after_finetune"],
        "error_after_sparsify": error_of(acc, "after_sparsify"),
        "one_shot_same_budget_error": error_of(acc, "one_shot_same_budget"),
        "filters": [layers[c]["filters"] for c in CONVS],
        "channels": [layers[c]["channels"] for c in CONVS],
        "flops": [layers[c]["macs_gemm_after"] / layers[c]["macs"] for c in CONVS],
        "fc_channels": layers["fc"]["channels"],
        "macs_fraction": report["totals"]["macs_fraction"],
        "onnx_macs_fraction": surgery["totals"]["macs_fraction"],
        "onnx_layers": onnx_layers,
        "gemm_speedup": [layer_speedup(speed, c) for c in CONVS],
        "bench": speed,
        "budget": report.get("budget"), "forced_groups": report.get("forced_groups"),
        "lambdas_final": report.get("lambdas"), "wall_time_s": {"stage": secs, **report["wall_time_s"]},
        "settings": settings,
    }


def layer_speedup(speed: dict, conv: str) -> float | None:
    """The per-layer GEMM speed-up of the ONNX conv that was torch's `conv` (node /conv1/Conv and the like)."""
    for name, row in speed["layers"].items():
        if name.strip("/").split("/")[0] == conv:
            return row["compact_speedup"]
    return None


def judge_convnet(v: dict, baseline_error: float) -> None:
    """The paper row's terms on our baseline: the same error change, each layer's FLOPs at most 1 / speed-up."""
    paper = next(r for r in PAPER_CONVNET if r["row"] == v["aim"])
    max_error = baseline_error + (paper["error"] - PAPER_CONVNET[0]["error"])
    max_flops = [1 / s for s in paper["speedup"]]
    v["goal"] = {"max_error": max_error, "max_flops": max_flops, "paper_gemm_speedup": paper["speedup"],
                 "text": f"error at most our baseline {100 * (paper['error'] - PAPER_CONVNET[0]['error']):+.1f} "
                         "points, as the paper's; per-layer FLOPs at most 1 / the paper's speed-up; per-layer GEMM "
                         "speed-up at least the paper's"}
    v["goal_met"] = {"error": v["error"] <= max_error + 1e-12,
                     "flops": [f <= m + 1e-12 for f, m in zip(v["flops"], max_flops)],
                     "gemm_speedup": [s is not None and s >= p for s, p in zip(v["gemm_speedup"], paper["speedup"])]}


# ---------------------------------------------------------------------------------------------
# Results


def jsonable(settings: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}


def error_of(acc: dict, key: str) -> float | None:
    """1 - accuracy, None where the run recorded none (no budget: no one-shot pruning to compare with)."""
    return None if acc.get(key) is None else 1 - acc[key]


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}%}"


def times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def bench_threads(bench_: dict) -> int:
    return min(r["threads"] for r in bench_["speed"].values())


def speed_cell(bench_: dict, variant: str = "structured") -> str:
    """Speed-ups over dense at each batch of the first thread count, e.g. '1.41x / 1.45x'."""
    rows = sorted(bench_["speed"].values(), key=lambda r: (r["threads"], r["batch"]))
    first = [r for r in rows if r["threads"] == rows[0]["threads"]]
    return " / ".join(times(r[variant]["speedup"]) for r in first)


def resnet_table(row: dict | None) -> list[str]:
    lines = ["| model | error | layers (conv + fc) | blocks removed | MACs | ORT speed-up b1 / b8 |",
             "|---|---|---|---|---|---|"]
    for p in PAPER_RESNET:
        lines.append(f"| {p['row']} | {pct(p['error'])} | {p['layers']} | "
                     f"{(RESNET20_LAYERS - p['layers']) // 2} of 9 | - | - |")
    if row is None:
        return lines
    s = row["ssl"]
    lines.append(f"| ours ResNet-20 | {pct(row['baseline']['error'])} | 20 | 0 of 9 | 100% | 1.00x |")
    lines.append(f"| **ours SSL depth** | **{pct(s['error'])}** | **{s['layers']}** | {len(s['blocks_removed'])} of "
                 f"{s['blocks_total']}: {', '.join(s['blocks_removed']) or 'none'} | {pct(s['macs_fraction'], 1)} | "
                 f"{speed_cell(row['bench'])} |")
    return lines


def triple(xs, fmt) -> str:
    return " / ".join(fmt(x) for x in xs)


def convnet_table(row: dict | None) -> list[str]:
    lines = ["| model | error | filters conv1/2/3 | channels conv1/2/3 | FLOP conv1/2/3 | GEMM speed-up conv1/2/3 "
             "| ORT whole model b1 / b8 |", "|---|---|---|---|---|---|---|"]
    for p in PAPER_CONVNET:
        flops = "100% / 100% / 100%" if p["speedup"][0] == 1 else \
            "<= " + triple(p["speedup"], lambda s: f"{1 / s:.1%}")
        lines.append(f"| {p['row']} | {pct(p['error'])} | {'32 / 32 / 64' if p['speedup'][0] == 1 else '-'} | "
                     f"{'3 / 32 / 32' if p['speedup'][0] == 1 else '-'} | {flops} | "
                     f"{triple(p['speedup'], times)} | - |")
    if row is None:
        return lines
    lines.append(f"| ours baseline | {pct(row['baseline']['error'])} | 32 / 32 / 64 | 3 / 32 / 32 | "
                 "100% / 100% / 100% | 1.00x / 1.00x / 1.00x | 1.00x |")
    for v in row["variants"]:
        lines.append(f"| **ours SSL aiming at {v['aim'].removeprefix('paper ')}** | **{pct(v['error'])}** | "
                     f"{triple(v['filters'], lambda f: str(f[0]))} | {triple(v['channels'], lambda c: str(c[0]))} | "
                     f"{triple(v['flops'], lambda f: f'{f:.1%}')} | {triple(v['gemm_speedup'], times)} | "
                     f"{speed_cell(v['bench'])} |")
    return lines


def goal_lines(rows: dict) -> list[str]:
    out = []
    r = rows.get("resnet20_depth")
    if r:
        met = r["goal_met"]
        out.append(f"- ResNet-20 depth: {r['goal']['text']}. Layers: {r['ssl']['layers']} -> "
                   f"{'met' if met['layers'] else 'MISSED'}; error {pct(r['ssl']['error'])} against "
                   f"{pct(r['goal']['max_error'])} -> {'met' if met['error'] else 'MISSED'}.")
    c = rows.get("convnet_filter_channel")
    for v in (c or {}).get("variants", []):
        met, g = v["goal_met"], v["goal"]
        word = lambda ok: "met" if ok else "MISSED"  # noqa: E731
        out.append(f"- ConvNet aiming at {v['aim']} ({g['text']}): error {pct(v['error'])} against "
                   f"{pct(g['max_error'])} -> {word(met['error'])}; FLOP {triple(v['flops'], lambda f: f'{f:.1%}')} "
                   f"against {triple(g['max_flops'], lambda f: f'{f:.1%}')} -> "
                   f"{' / '.join(word(m) for m in met['flops'])}; GEMM speed-up "
                   f"{triple(v['gemm_speedup'], times)} against {triple(g['paper_gemm_speedup'], times)} -> "
                   f"{' / '.join(word(m) for m in met['gemm_speedup'])}.")
    return out


def detail_lines(rows: dict) -> list[str]:
    out = ["| run | error after sparsify / one-shot at the same budget / final | MACs (training count / ONNX) | "
           "ORT unstructured b1 / b8 | ORT top-1 dense / structured | forced groups | final lambdas | wall time |",
           "|---|---|---|---|---|---|---|---|"]

    def line(name, d, bench_):
        lam = ", ".join(f"{k}={v:.3g}" for k, v in (d.get("lambdas_final") or {}).items()) or "-"
        top = bench_["ort_top1"]
        out.append(f"| {name} | {pct(d['error_after_sparsify'])} / {pct(d['one_shot_same_budget_error'])} / "
                   f"{pct(d['error'])} | {pct(d['macs_fraction'], 1)} / {pct(d['onnx_macs_fraction'], 1)} | "
                   f"{speed_cell(bench_, 'unstructured')} | {pct(top.get('dense'))} / {pct(top.get('structured'))} "
                   f"| {d.get('forced_groups')} | {lam} | {d['wall_time_s']['stage']:.0f} s |")

    if rows.get("resnet20_depth"):
        r = rows["resnet20_depth"]
        line("ResNet-20 depth", r["ssl"], r["bench"])
    for v in (rows.get("convnet_filter_channel") or {}).get("variants", []):
        line(f"ConvNet aiming at {v['aim']}", v, v["bench"])
    return out


def threads_note(row: dict | None) -> str:
    if not row:
        return "not run yet"
    t = bench_threads(row["bench"])
    return f"{t} thread{'s' if t > 1 else ''}, median of interleaved rounds"


def first_variant(row: dict | None) -> dict | None:
    return row["variants"][0] if row and row.get("variants") else None


def render_md(doc: dict) -> str:
    rows = doc["rows"]
    quick = " (QUICK smoke run, not a result)" if doc["quick"] else ""
    md = [f"# The paper's CIFAR-10 rows beside ours{quick}", ""]
    for name in ROWS:
        r = rows.get(name)
        if r:
            md.append(f"- {name}: `{r['command']}` on {r['date_utc']}"
                      + (" (QUICK)" if r.get("quick") else "") + f", {r['wall_time_s']:.0f} s")
    md += ["", "## ResNet-20 on CIFAR-10, depth-wise SSL", "", *resnet_table(rows.get("resnet20_depth")), "",
           "Layers are counted as the paper counts ResNet-20's (19 convs and the fc; each residual block holds two), "
           "so removing k blocks leaves 20 - 2k; the 1x1 projection shortcuts of stages 2 and 3, which the paper's "
           "ResNet does not have, are not counted. MACs: the training count of the whole model. ORT speed-up: the "
           f"compact ONNX model over the dense one, CPU EP, {threads_note(rows.get('resnet20_depth'))}.", "",
           "## ConvNet on CIFAR-10 (Caffe's cifar10_full), filter+channel SSL", "",
           *convnet_table(rows.get("convnet_filter_channel")), "",
           "FLOP = per-layer MACs after / before (the conv with deleted filters and input channels). GEMM speed-up = "
           "each conv lowered to one GEMM (torch.mm, MKL, 1 thread, batch 1), dense against the compact weights, "
           "the paper's own measure; the paper's per-layer figures are speed-ups only (ssl-paper.md gives no "
           "filter or channel counts for this row), so its FLOP column is the bound 1 / speed-up. ORT whole "
           "model: the compact ONNX model over the dense one, CPU EP, "
           f"{threads_note(first_variant(rows.get('convnet_filter_channel')))}.", "", "## Goals", "",
           *goal_lines(rows), "",
           "## Details", "", *detail_lines(rows), "", "## Settings", ""]
    for name in ROWS:
        r = rows.get(name)
        if not r:
            continue
        if name == "resnet20_depth":
            md.append(f"- **{name}**: `{json.dumps(r['settings'])}`")
        else:
            md.append(f"- **{name}** baseline: `{json.dumps({k: v for k, v in r['baseline'].items() if k != 'error'})}`")
            for v in r["variants"]:
                md.append(f"- **{name}**, {v['aim']}: `{json.dumps(v['settings'])}`")
    m = doc["machine"]
    md += ["", "## Machine", "", f"nproc {m['nproc']}, torch {m['torch']}, Python {m['python']}, {m['platform']}; "
           f"load average at end {', '.join(f'{x:.2f}' for x in m['load_average_at_end'])} (shared cores: "
           "timings are noisy).", ""]
    return "\n".join(md)


def machine() -> dict:
    from sslcompress.runtime.cpu import cpu_isa, cpu_model

    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "cpu_isa": list(cpu_isa()), "torch": torch.__version__,
            "onnx": onnx.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_end": list(os.getloadavg())}


def merged_rows(path: Path, fresh: dict) -> dict:
    """This run's rows over the previous results file's: a row not rerun keeps its latest result."""
    rows = {}
    if path.is_file():
        rows = json.loads(path.read_text()).get("rows", {})
    rows.update(fresh)
    return {name: rows[name] for name in ROWS if name in rows}


def write_results(args, fresh: dict, results: Path) -> dict:
    path = results / f"{STEM}{'_quick' if args.quick else ''}.json"
    doc = {"benchmark": STEM, "quick": args.quick, "date_utc": now(), "machine": machine(),
           "paper": {"resnet20": PAPER_RESNET, "convnet": PAPER_CONVNET}, "rows": merged_rows(path, fresh)}
    atomic_write_json(doc, path)
    atomic_write_bytes(render_md(doc).encode(), path.with_suffix(".md"))
    log(f"wrote {path} and {path.with_suffix('.md')}")
    return doc


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 .npz (default ../shared/data/cifar10/...)")
    ap.add_argument("--out", default=None, help="checkpoints and ONNX models (default benchmarks/out/paper_cifar10)")
    ap.add_argument("--results", default=None, help="the .json/.md folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2000 training / 1000 test images, 1 epoch a phase, 5 bench rounds; "
                         "writes to benchmarks/out only")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for training (default 1: 2 threads on 2 shared cores oversubscribe)")
    g = ap.add_argument_group("ResNet-20, depth")
    g.add_argument("--resnet20-weights", default=None,
                   help=f"pretrained ResNet-20 checkpoint (default {DEFAULT_RESNET20.relative_to(REPO)}; "
                        "pretrained here when that file does not exist)")
    g.add_argument("--resnet20-pretrain-epochs", type=int, default=10, help="only when no checkpoint exists")
    g.add_argument("--resnet20-sparsify-epochs", type=int, default=8)
    g.add_argument("--resnet20-finetune-epochs", type=int, default=4)
    g.add_argument("--resnet20-lr", type=float, default=0.1)
    g.add_argument("--resnet20-finetune-lr", type=float, default=0.01)
    g.add_argument("--resnet20-lambda", type=float, default=0.007, help="starting block strength")
    g.add_argument("--resnet20-blocks", type=int, default=3,
                   help="MAC budget that only this many removed blocks reach (0: lambda alone, no budget)")
    g.add_argument("--resnet20-target-flops", type=float, default=None, help="a MAC budget of your own instead")
    g = ap.add_argument_group("ConvNet, filter+channel")
    g.add_argument("--convnet-weights", default=None, help="pretrained ConvNet checkpoint (default: pretrain one)")
    g.add_argument("--convnet-aims", default="1,2", help="the paper's SSL rows to aim at (1: 17.9%%, 2: 16.9%%)")
    g.add_argument("--convnet-pretrain-epochs", type=int, default=20)
    g.add_argument("--convnet-pretrain-lr", type=float, default=0.05)
    g.add_argument("--convnet-sparsify-epochs", type=int, default=8)
    g.add_argument("--convnet-finetune-epochs", type=int, default=6)
    g.add_argument("--convnet-lr", type=float, default=0.01)
    g.add_argument("--convnet-finetune-lr", type=float, default=0.01)
    g.add_argument("--convnet-lambda", type=float, default=0.005, help="starting filter and channel strength")
    g = ap.add_argument_group("bench (ONNX Runtime, CPU)")
    g.add_argument("--bench-threads", default="1", help="ORT intra-op threads, comma list")
    g.add_argument("--bench-batch", default="1,8", help="batch sizes, comma list")
    g.add_argument("--bench-rounds", type=int, default=20, help="interleaved rounds per setting")
    args = ap.parse_args(argv)
    args.rows = csv(args.rows)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or not args.rows:
        ap.error(f"--rows takes {', '.join(ROWS)}; got {', '.join(unknown) or 'nothing'}")
    args.convnet_aims = csv(args.convnet_aims, int)
    if not args.convnet_aims or any(a not in (1, 2) for a in args.convnet_aims):
        ap.error("--convnet-aims takes 1, 2 or 1,2")
    args.bench_threads = csv(args.bench_threads, int)
    args.bench_batch = csv(args.bench_batch, int)
    if args.quick:
        quicken(args)
    return args


def quicken(args: argparse.Namespace) -> None:
    """Small limits for a smoke run: it checks the whole path, not the figures."""
    args.limit_train = args.limit_train or 2000
    args.limit_test = args.limit_test or 1000
    for name in ("resnet20_pretrain", "resnet20_sparsify", "resnet20_finetune", "convnet_pretrain",
                 "convnet_sparsify", "convnet_finetune"):
        setattr(args, f"{name}_epochs", min(getattr(args, f"{name}_epochs"), 1))
    args.bench_rounds = min(args.bench_rounds, 5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data).expanduser().resolve()
    if not data.is_file():
        print(f"error: CIFAR-10 not found at {data}", file=sys.stderr)
        return 2
    args.data_spec = f"cifar10:{data}"
    out = Path(args.out or REPO / "benchmarks" / "out" / (f"{STEM}_quick" if args.quick else STEM))
    results = Path(args.results or REPO / "benchmarks" / ("out" if args.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    log(f"torch {torch.__version__}, {args.threads} training thread(s), nproc {os.cpu_count()}; rows {args.rows}")
    runners = {"resnet20_depth": run_resnet20, "convnet_filter_channel": run_convnet}
    doc = None
    for name in args.rows:
        t0 = time.perf_counter()
        row = runners[name](args, out)
        row.update(command=command, date_utc=now(), quick=args.quick, wall_time_s=time.perf_counter() - t0)
        doc = write_results(args, {name: row}, results)  # after each row: a later failure keeps it
    print("\n".join(resnet_table(doc["rows"].get("resnet20_depth")) + [""]
                    + convnet_table(doc["rows"].get("convnet_filter_channel")) + [""] + goal_lines(doc["rows"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
