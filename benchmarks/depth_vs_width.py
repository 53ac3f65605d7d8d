"""Depth against width at one MAC budget: which SSL structure gives the faster and the more accurate ResNet-20 on
CIFAR-10 in ORT (CPU)?

One pretrained ResNet-20, two SSL runs through the library (run_finetune) with the same phases, seed and
`--target-flops`:

    width   filter and channel groups, every width a multiple of --align (8: ORT's channel block on AVX2)
    depth   depth groups only: whole residual branches go, every width left dense

Both are exported, cut and verified (as `sslcompress export`), and the dense and both compact models are timed in
one interleaved run per batch (1 thread). The question comes from aligned_widths.py: on a CPU whose kernels run
narrow widths at a fraction of their best throughput, removing blocks keeps the dense widths' speed; this asks
what it costs in accuracy after the same training.

    python benchmarks/depth_vs_width.py --pretrained benchmarks/out/cifar_resnet20_b/pretrained.pt
    python benchmarks/depth_vs_width.py --depth-flops 0.62 --reuse --name depth_vs_width_latency
    python benchmarks/depth_vs_width.py --quick        # smoke run: 2000 / 1000 images, 1 epoch a phase

`--depth-flops` gives the depth run a MAC budget of its own (to meet the width run's measured latency instead of
its MACs); `--reuse` reads a finished run of the same settings from benchmarks/out/depth_vs_width/ instead of
training it again (the models are timed afresh, side by side, either way).

Results: benchmarks/results/depth_vs_width.json and .md (benchmarks/out/ with --quick).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
from bench_log import log
from paper_cifar10 import REPO, export_compact, export_dense, finetune, machine, now, phase
from resnet20_runs import add_training_args, ready, reuse_or_train, write_results

from sslcompress.latency import current_key
from sslcompress.latency.profile import time_sessions

MODEL = "resnet20"
VARIANTS = {"width": ("filter", "channel"), "depth": ("depth",)}


def work_folder(base: Path = REPO / "benchmarks" / "out", quick: bool = False) -> Path:
    """Where every run of this benchmark keeps its models, whatever its --name (what --reuse reads back)."""
    return base / ("depth_vs_width_quick" if quick else "depth_vs_width")


def variant_folder(out: Path, variant: str, target_flops: float) -> Path:
    """One SSL run's folder in the work folder: one per structure and MAC budget."""
    return out / f"{variant}_{target_flops:g}"


def settings(args, variant: str) -> dict:
    structures = VARIANTS[variant]
    flops = args.depth_flops if variant == "depth" and args.depth_flops is not None else args.target_flops
    return {"structures": structures, "lambdas": {s: args.strength for s in structures}, "solver": "proximal",
            "weighting": "none", "align": args.align if variant == "width" else None,
            "target_flops": flops,
            "sparsify": phase(args.sparsify_epochs, args.lr, args.batch_size, 0.0, "constant"),
            "finetune": phase(args.finetune_epochs, args.finetune_lr, args.batch_size, 5e-4, "cosine")}


def row(report: dict, surgery: dict, train_s: float) -> dict:
    """What the table shows of one run: accuracy, what the cut left, and which residual blocks went."""
    totals = surgery["totals"]
    return {"accuracy": report["accuracy"], "macs_fraction": totals["macs_after"] / totals["macs"],
            "params_after": totals["params_after"], "train_s": train_s,
            "blocks_removed": len(surgery.get("blocks_removed", [])),
            "blocks_constant": len(surgery.get("blocks_constant", [])),
            "widths": [lay["filters"] for lay in report["layers"]]}


def trained(args, weights: Path, folder: Path, run_settings: dict) -> tuple[dict, float, dict]:
    """One SSL run, exported and cut: (its report, its training seconds, the surgery report). With --reuse, a
    folder that holds a finished run of the same settings (and the same pretrained weights and data) is read."""
    def train() -> tuple[dict, float, dict]:
        report, secs = finetune(args, MODEL, weights, folder, run_settings)
        return report, secs, export_compact(args, folder / "sparse.pt", folder)

    key = {**run_settings, "pretrained": str(weights), "data": args.data_spec, "limit_train": args.limit_train,
           "limit_test": args.limit_test, "seed": args.seed}
    return reuse_or_train(folder, key, args.reuse, train)


def run(args, out: Path) -> dict:
    weights = Path(args.pretrained)
    dense = out / "dense.onnx"
    export_dense(weights, dense)
    rows, models = {}, {"dense": onnx.load(str(dense))}
    for variant in VARIANTS:
        run_settings = settings(args, variant)
        folder = variant_folder(out, variant, run_settings["target_flops"])
        report, secs, surgery = trained(args, weights, folder, run_settings)
        rows[variant] = {**row(report, surgery, secs), "target_flops": run_settings["target_flops"]}
        models[variant] = onnx.load(str(folder / "compact.onnx"))
        log(f"{variant}: top-1 {report['accuracy']['after_finetune']:.2%}, MACs {rows[variant]['macs_fraction']:.1%}")
    timed = {}
    for batch in args.batches:
        timed[str(batch)] = time_sessions(models, (batch, 3, 32, 32), current_key("cpu", 1, batch), rounds=args.rounds)
        log(f"batch {batch}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in timed[str(batch)].items()))
    return {"rows": rows, "timed_ms": timed, "dense_accuracy": rows["width"]["accuracy"]["before"]}


def render_md(doc: dict) -> str:
    res = doc["result"]
    batches = list(res["timed_ms"])
    md = ["# Depth against width at one MAC budget (ResNet-20, CIFAR-10, ORT CPU, 1 thread)", "",
          f"Date {doc['date_utc']}. Command: `{doc['command']}`. Both runs: the same pretrained model, phases and "
          "seed; the three models timed in one interleaved run per batch.", "",
          "| run | top-1 (test) | MACs kept | blocks cut (zero / constant) | "
          + " | ".join(f"ms, batch {b} (speed-up; of the MAC limit)" for b in batches) + " |",
          "|---|---|---|---|" + "---|" * len(batches)]
    dense = " | ".join(f"{res['timed_ms'][b]['dense']:.3f}" for b in batches)
    md.append(f"| dense | {res['dense_accuracy']:.2%} | 100% | - | {dense} |")
    for key, r in res["rows"].items():
        flops = f" --target-flops {r.get('target_flops', doc['target_flops']):g}"
        name = (f"filter,channel --align {doc['align']}" if key == "width" else key) + flops
        cells = []
        for b in batches:
            t = res["timed_ms"][b]
            speedup = t["dense"] / t[key]
            cells.append(f"{t[key]:.3f} ({speedup:.2f}x; {speedup * r['macs_fraction']:.2f})")
        md.append(f"| {name} | {r['accuracy']['after_finetune']:.2%} | {r['macs_fraction']:.1%} | "
                  f"{r['blocks_removed']} / {r['blocks_constant']} | " + " | ".join(cells) + " |")
    md += ["", "Of the MAC limit: speed-up over dense divided by the MAC reduction (1.00: the latency fell as much as "
           "the MACs). Kept widths (filters kept/total per conv): "
           + "; ".join(f"{k} `{r['widths']}`" for k, r in res["rows"].items()) + ".", "",
           f"Machine: {doc['machine']['cpu']}, nproc {doc['machine']['nproc']}; load average at end "
           f"{', '.join(f'{x:.2f}' for x in doc['machine']['load_average_at_end'])}.", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(ap)
    ap.add_argument("--align", type=int, default=8, help="--align of the width run (8: ORT's block with AVX2)")
    ap.add_argument("--depth-flops", type=float, default=None, help="the depth run's MAC budget (default --target-flops)")
    ap.add_argument("--reuse", action="store_true", help="read finished runs of the same settings instead of training")
    ap.add_argument("--name", default="depth_vs_width", help="stem of the results")
    args = ap.parse_args(argv)
    error = ready(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = work_folder(quick=args.quick)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "depth_vs_width", "date_utc": now(), "command": " ".join(["python", *sys.argv]),
           "target_flops": args.target_flops, "align": args.align, "result": run(args, out), "machine": machine()}
    print(write_results(args, doc, render_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
