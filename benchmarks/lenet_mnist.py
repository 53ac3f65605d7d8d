"""LeNet-5 (Caffe's) on real MNIST: dense baseline, SSL filter+channel, SSL shape, beside the paper.

Reproduces the LeNet rows of Wen et al., "Learning Structured Sparsity in Deep Neural Networks"
(NeurIPS 2016), Table 1, through the library's Python API:

    pretrain (dense)  ->  benchmarks/out/lenet_mnist/pretrained.pt
    SSL filter+channel from that checkpoint  ->  benchmarks/out/lenet_mnist/ssl_filter_channel/
    SSL shape from that checkpoint           ->  benchmarks/out/lenet_mnist/ssl_shape/

and writes benchmarks/results/lenet_mnist.json and .md (our rows next to the paper's rows).

Per-layer FLOP fraction = macs_gemm_after / macs of that layer in the run report: the lowered
(im2col) GEMM with deleted filters, deleted channels and all-zero columns removed, which is the
paper's measure. "filter size" = nonzero columns of the lowered weight among kept channels.

Usage (from the repository root):

    python benchmarks/lenet_mnist.py              # full run: 12 + 22 + 22 epochs, ~22 min at ~23 s/epoch
    python benchmarks/lenet_mnist.py --quick      # smoke run (~1-2 min, 6000 training images; writes to benchmarks/out)
    python benchmarks/lenet_mnist.py --skip-pretrain   # reuse benchmarks/out/lenet_mnist/pretrained.pt
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

import torch
from bench_log import log, on_event  # beside this script: the progress lines the benchmarks share

from sslcompress.config import FinetuneConfig, PretrainConfig, build_config
from sslcompress.finetune.pipeline import run_finetune, run_pretrain

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist" / "mnist.npz"  # = ../shared/data/mnist/mnist.npz

# The paper's LeNet rows (Table 1 of Wen et al. 2016), conv1 / conv2, as given in
# ../shared/reference/ssl-paper.md. filter_size is the number of kept columns of the lowered
# weight matrix (of 25 / 500); None where the paper gives none (the full kernel).
PAPER_ROWS = [
    {"row": "paper baseline", "error": 0.009, "filters": [20, 50], "channels": [1, 20], "filter_size": [25, 500],
     "flops": [1.0, 1.0], "speedup": [1.00, 1.00]},
    {"row": "paper SSL filter+channel (1)", "error": 0.008, "filters": [5, 19], "channels": [1, 4],
     "filter_size": None, "flops": [0.25, 0.076], "speedup": [1.64, 5.23]},
    {"row": "paper SSL filter+channel (2)", "error": 0.010, "filters": [3, 12], "channels": [1, 3],
     "filter_size": None, "flops": [0.15, 0.036], "speedup": [1.99, 7.44]},
    {"row": "paper SSL shape (1)", "error": 0.008, "filters": None, "channels": [1, 2], "filter_size": [21, 41],
     "flops": [0.084, 0.082], "speedup": [2.33, 6.93]},
    {"row": "paper SSL shape (2)", "error": 0.010, "filters": None, "channels": [1, 1], "filter_size": [7, 14],
     "flops": [0.014, 0.028], "speedup": [5.19, 10.82]},
]
# What our runs aim at: the paper's harder rows.
GOALS = {
    "ssl_filter_channel": {"paper_row": "paper SSL filter+channel (2)", "max_error": 0.010, "max_flops": [0.15, 0.036]},
    "ssl_shape": {"paper_row": "paper SSL shape (2)", "max_error": 0.010, "max_flops": [0.014, 0.028]},
}
CONVS = ("conv1", "conv2")


def layer_rows(report: dict) -> dict[str, dict]:
    return {lay["name"]: lay for lay in report["layers"]}


def summarize(name: str, report: dict, settings: dict, wall_s: float) -> dict:
    """One table row from a run report."""
    layers = layer_rows(report)
    acc = report["accuracy"]
    final = acc.get("after_finetune", acc.get("pretrained"))
    row = {
        "row": name,
        "error": 1.0 - final,
        "accuracy": acc,
        "filters": [layers[c]["filters"][0] for c in CONVS],
        "filters_total": [layers[c]["filters"][1] for c in CONVS],
        "channels": [layers[c]["channels"][0] for c in CONVS],
        "channels_total": [layers[c]["channels"][1] for c in CONVS],
        "filter_size": [layers[c]["columns"][0] for c in CONVS],
        "filter_size_total": [layers[c]["columns"][1] for c in CONVS],
        "kernel_after": [layers[c]["kernel_after"] for c in CONVS],
        "flops": [layers[c]["macs_gemm_after"] / layers[c]["macs"] for c in CONVS],
        "flops_dense_conv": [layers[c]["macs_after"] / layers[c]["macs"] for c in CONVS],
        "macs": {c: {k: layers[c][k] for k in ("macs", "macs_after", "macs_gemm_after")} for c in CONVS},
        "fc": {n: {"filters": lay["filters"], "channels": lay["channels"], "macs": lay["macs"],
                   "macs_after": lay["macs_after"]} for n, lay in layers.items() if lay["kind"] == "linear"},
        "totals": report["totals"],
        "groups": report.get("groups"),
        "lambdas_final": report.get("lambdas"),
        "forced_groups": report.get("forced_groups"),
        "wall_time_s": {"total_stage": wall_s, **(report.get("wall_time_s") or {})},
        "settings": settings,
    }
    goal = GOALS.get(name)
    if goal is not None:
        row["goal"] = goal
        row["goal_met"] = {
            "error": row["error"] <= goal["max_error"] + 1e-12,
            "flops": [f <= g + 1e-12 for f, g in zip(row["flops"], goal["max_flops"])],
        }
    return row


def _pair(v, fmt="{}") -> str:
    if v is None:
        return "-"
    return " / ".join(fmt.format(x) for x in v)


def render_table(rows: list[dict]) -> str:
    head = ("| model | error | filters conv1/conv2 | channels conv1/conv2 | filter size conv1/conv2 "
            "| FLOP conv1/conv2 | speedup (paper, measured) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| {} | {:.2%} | {} | {} | {} | {} | {} |".format(
            r["row"], r["error"], _pair(r.get("filters")), _pair(r.get("channels")),
            _pair(r.get("filter_size")), _pair(r.get("flops"), "{:.1%}"),
            _pair(r.get("speedup"), "{:.2f}x")))
    return "\n".join(lines)


def machine() -> dict:
    return {"nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_at_end": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="MNIST .npz (default ../shared/data/mnist/mnist.npz)")
    ap.add_argument("--out", default=None,
                    help="run folder (default benchmarks/out/lenet_mnist, or benchmarks/out/lenet_mnist_quick with --quick)")
    ap.add_argument("--results", default=None,
                    help="where the .json/.md go (default benchmarks/results; benchmarks/out with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 6000 training images, 2000 test, few epochs")
    ap.add_argument("--skip-pretrain", action="store_true", help="reuse OUT/pretrained.pt")
    ap.add_argument("--only", default="ssl_filter_channel,ssl_shape",
                    help="comma list of SSL runs: ssl_filter_channel, ssl_shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--pretrain-lr", type=float, default=0.03)
    ap.add_argument("--sparsify-epochs", type=int, default=12)
    ap.add_argument("--sparsify-lr", type=float, default=0.01)
    ap.add_argument("--sparsify-schedule", default="constant", choices=["cosine", "step", "constant"],
                    help="lr schedule of the sparsify phase (constant keeps the proximal step biting late)")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--fc-lambda", type=float, default=0.005,
                    help="starting group-Lasso strength of filter and channel groups (filter+channel run)")
    ap.add_argument("--fc-target", type=float, default=0.085,
                    help="target_flops of the filter+channel run (whole-model MAC fraction, fc layers included)")
    ap.add_argument("--shape-structures", default="shape")
    ap.add_argument("--shape-lambda", type=float, default=0.01,
                    help="starting strength of shape groups (shape run)")
    ap.add_argument("--shape-fc-lambda", type=float, default=0.005,
                    help="starting strength of filter/channel groups in the shape run (when --shape-structures has them)")
    ap.add_argument("--shape-target", type=float, default=0.19,
                    help="target_flops of the shape run (whole-model lowered-GEMM MAC fraction; with shape groups "
                         "only, fc1+fc2 stay dense = 0.1766 of the MACs, so 0.19 leaves ~1.3%% for conv1+conv2)")
    ap.add_argument("--fc-weighting", default="macs", choices=["none", "sqrt", "macs"],
                    help="group weighting of the filter+channel run")
    ap.add_argument("--shape-weighting", default="macs", choices=["none", "sqrt", "macs"],
                    help="group weighting of the shape run (macs: groups weighted by the MACs they cost)")
    ap.add_argument("--no-target", action="store_true", help="lambdas only, no target_flops controller")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on 2 shared cores, 2 threads oversubscribe and "
                         "can be several times slower)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.quick:
        limits = {"limit_train": 6000, "limit_test": 2000}
        args.pretrain_epochs = min(args.pretrain_epochs, 3)
        args.sparsify_epochs = min(args.sparsify_epochs, 3)
        args.finetune_epochs = min(args.finetune_epochs, 1)
    else:
        limits = {}
    data_path = Path(args.data).expanduser().resolve()
    if not data_path.is_file():
        print(f"error: MNIST not found at {data_path}", file=sys.stderr)
        return 2
    data = f"mnist:{data_path}"
    out = Path(args.out or REPO / "benchmarks" / "out" / ("lenet_mnist_quick" if args.quick else "lenet_mnist"))
    out.mkdir(parents=True, exist_ok=True)
    results = Path(args.results or REPO / "benchmarks" / ("out" if args.quick else "results"))
    results.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    t_all = time.perf_counter()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, nproc {os.cpu_count()}; data {data}")

    rows: list[dict] = []
    previous: list[dict] = []
    carried: list[dict] = []
    pretrained = out / "pretrained.pt"
    pre_settings = {"model": "lenet5", "data": data, **limits, "seed": args.seed,
                    "train": {"epochs": args.pretrain_epochs, "lr": args.pretrain_lr, "batch_size": args.batch_size,
                              "schedule": "cosine", "momentum": 0.9, "weight_decay": 5e-4}}
    if args.skip_pretrain:
        if not pretrained.is_file():
            print(f"error: --skip-pretrain but {pretrained} does not exist", file=sys.stderr)
            return 2
        from sslcompress.finetune.checkpoint import load_checkpoint
        ckpt = load_checkpoint(str(pretrained))
        log(f"reusing {pretrained}")
        prev = {}
        prev_json = results / f"lenet_mnist{suffix}.json"
        if prev_json.is_file():
            old = json.loads(prev_json.read_text())
            prev = next((r for r in old.get("ours", []) if r["row"] == "ours baseline"), {})
            # Keep the record of earlier SSL attempts from the same checkpoint (never silently dropped).
            previous = list(old.get("previous_attempts", []))
            rerun = {r.strip() for r in args.only.split(",") if r.strip()}
            for r in old.get("ours", []):
                if r["row"] == "ours baseline":
                    continue
                if r["row"] in rerun:
                    previous.append(dict(r, attempt_date=old.get("date_utc"), attempt_command=old.get("command")))
                else:  # not rerun this time: its latest result stays in the table, marked as carried over
                    carried.append(r if r.get("carried_from") else
                                   dict(r, carried_from={"date": old.get("date_utc"), "command": old.get("command")}))
        rows.append(summarize("ours baseline", ckpt.report, prev.get("settings", {"reused": str(pretrained)}),
                              (prev.get("wall_time_s") or {}).get("total_stage", float("nan"))))
    else:
        cfg = build_config(PretrainConfig, None, {"model": "lenet5", "data": data, "out": str(out), "seed": args.seed,
                                                  **limits, "train": dict(pre_settings["train"])})
        log(f"pretraining: {pre_settings['train']}")
        t0 = time.perf_counter()
        res = run_pretrain(cfg, on_event)
        rows.append(summarize("ours baseline", res.report, pre_settings, time.perf_counter() - t0))
    base_err = rows[0]["error"]
    log(f"baseline test error {base_err:.2%} (target <= 1.0%)")

    runs = [r.strip() for r in args.only.split(",") if r.strip()]
    for name in runs:
        if name == "ssl_filter_channel":
            structures = ("filter", "channel")
            lambdas = {"filter": args.fc_lambda, "channel": args.fc_lambda}
            target = None if args.no_target else args.fc_target
            weighting = args.fc_weighting
        elif name == "ssl_shape":
            structures = tuple(s.strip() for s in args.shape_structures.split(","))
            lambdas = {k: (args.shape_lambda if k == "shape" else args.shape_fc_lambda) for k in structures}
            target = None if args.no_target else args.shape_target
            weighting = args.shape_weighting
        else:
            print(f"error: unknown run {name!r}", file=sys.stderr)
            return 2
        settings = {
            "model": "lenet5", "data": data, **limits, "seed": args.seed, "weights": str(pretrained),
            "structures": list(structures), "lambdas": lambdas, "solver": "proximal", "weighting": weighting,
            "target_flops": target,
            "sparsify": {"epochs": args.sparsify_epochs, "lr": args.sparsify_lr, "batch_size": args.batch_size,
                         "schedule": args.sparsify_schedule, "momentum": 0.9, "weight_decay": 0.0},
            "finetune": {"epochs": args.finetune_epochs, "lr": args.finetune_lr, "batch_size": args.batch_size,
                         "schedule": "cosine", "momentum": 0.9, "weight_decay": 0.0},
        }
        overrides = {"model": "lenet5", "data": data, "weights": str(pretrained), "out": str(out / name),
                     "seed": args.seed, **limits, "structures": structures, "lambdas": lambdas,
                     "solver": "proximal", "weighting": weighting, "target_flops": target,
                     "sparsify": dict(settings["sparsify"]), "finetune": dict(settings["finetune"])}
        cfg = build_config(FinetuneConfig, None, overrides)
        log(f"{name}: structures {structures}, lambdas {lambdas}, weighting {weighting}, target_flops {target}")
        t0 = time.perf_counter()
        res = run_finetune(cfg, on_event)
        row = summarize(name, res.report, settings, time.perf_counter() - t0)
        rows.append(row)
        log(f"{name}: error {row['error']:.2%}, FLOP conv1/conv2 {_pair(row['flops'], '{:.2%}')}, "
            f"filters {_pair(row['filters'])}, channels {_pair(row['channels'])}, "
            f"filter size {_pair(row['filter_size'])}, forced groups {row['forced_groups']}")

    rows += carried
    rows.sort(key=lambda r: ["ours baseline", "ssl_filter_channel", "ssl_shape"].index(r["row"]))
    wall = time.perf_counter() - t_all
    result = {
        "benchmark": "lenet_mnist",
        "quick": args.quick,
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "wall_time_s": wall,
        "paper": PAPER_ROWS,
        "ours": rows,
        "previous_attempts": previous,
        "notes": [
            "FLOP = per-layer macs_gemm_after / macs from the run report (lowered GEMM, zero rows and columns "
            "removed); filter size = nonzero lowered columns among kept channels.",
            "target_flops is a whole-model fraction (fc1/fc2 included); for runs with 'shape' the controller "
            "uses the lowered-GEMM MACs.",
            "The paper's speedups are measured GEMM times; we report FLOP fractions only.",
        ],
    }
    (results / f"lenet_mnist{suffix}.json").write_text(json.dumps(result, indent=2))
    table = render_table(PAPER_ROWS + rows)
    md = [f"# LeNet-5 on MNIST: SSL vs the paper{' (QUICK smoke run, not a result)' if args.quick else ''}", "",
          f"Generated by `{result['command']}` on {result['date_utc']}.", "", table, "",
          "FLOP = per-layer `macs_gemm_after / macs` of the run report (the lowered GEMM with deleted filters, "
          "channels and zero columns removed). Filter size = kept columns of the lowered weight (of 25 / 500). "
          "Paper rows from ../shared/reference/ssl-paper.md; their speedups are measured, ours are not.", "",
          "## Goals", ""]
    for r in rows:
        if "goal" in r:
            g = r["goal"]
            md.append(f"- {r['row']} aims at {g['paper_row']}: error <= {g['max_error']:.1%} -> "
                      f"{'met' if r['goal_met']['error'] else 'MISSED'} ({r['error']:.2%}); FLOP conv1/conv2 <= "
                      f"{_pair(g['max_flops'], '{:.1%}')} -> "
                      f"{' / '.join('met' if m else 'MISSED' for m in r['goal_met']['flops'])} "
                      f"({_pair(r['flops'], '{:.2%}')})")
    for r in rows:
        if r.get("carried_from"):
            md.append(f"- {r['row']} was not rerun by this command: its row comes from "
                      f"`{r['carried_from']['command']}` ({r['carried_from']['date']}).")
    md += ["", "## Details", "",
           "| run | acc before / after sparsify / final | whole-model MAC frac (dense conv / GEMM) | "
           "fc1 in/out kept | final lambdas | forced groups | wall time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["accuracy"]
        accs = " / ".join(f"{a[k]:.4f}" for k in ("before", "after_sparsify", "after_finetune") if a.get(k) is not None) \
            or f"{a.get('pretrained', float('nan')):.4f}"
        fc1 = r["fc"].get("fc1", {})
        lam = ", ".join(f"{k}={v:.3g}" for k, v in (r.get("lambdas_final") or {}).items()) or "-"
        md.append(f"| {r['row']} | {accs} | {r['totals']['macs_fraction']:.3f} / {r['totals']['macs_gemm_fraction']:.3f} "
                  f"| {fc1.get('channels', ['-'])[0]} / {fc1.get('filters', ['-'])[0]} | {lam} | "
                  f"{r.get('forced_groups') if r.get('forced_groups') is not None else '-'} | "
                  f"{r['wall_time_s']['total_stage']:.0f} s |")
    if previous:
        md += ["", "## Earlier attempts from the same pretrained checkpoint", "",
               render_table([dict(r, row=f"{r['row']} ({r.get('attempt_date')})") for r in previous]), ""]
        for r in previous:
            md.append(f"- {r['row']} ({r.get('attempt_date')}): `{r.get('attempt_command')}`; "
                      f"weighting {r['settings'].get('weighting')}, lambdas {r['settings'].get('lambdas')}, "
                      f"target_flops {r['settings'].get('target_flops')}, forced groups {r.get('forced_groups')}")
    md += ["", "## Settings", ""]
    for r in rows:
        md.append(f"- **{r['row']}**: `{json.dumps(r['settings'])}`")
    m = result["machine"]
    md += ["", "## Machine", "",
           f"nproc {m['nproc']}, torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}, "
           f"{m['platform']}; load average at end {', '.join(f'{x:.2f}' for x in m['load_average_at_end'])} "
           "(the cores are shared with other work, so wall times are noisy).", "",
           f"Total wall time: {wall:.0f} s ({wall / 60:.1f} min).", ""]
    (results / f"lenet_mnist{suffix}.md").write_text("\n".join(md))
    print()
    print(table)
    print()
    print("\n".join(x for x in md if x.startswith("- ") and "aims at" in x))
    log(f"done in {wall:.0f} s; wrote {results / f'lenet_mnist{suffix}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
