"""What INT8 adds to a 3x3 conv at each width in ONNX Runtime (CPU EP): why INT8 gains less on a compact
model than on its dense one.

For each feature-map size of an ImageNet ResNet-18 stage (56, 28, 14 and 7 pixels square) and widths from
a quarter of the stage's width to all of it, a chain of six 3x3 convs W -> W (padding 1, ReLU after each;
conv_width_throughput.py's chain) is timed in float32 and after `sslcompress.quantize.quantize_qdq` (ORT's
static QDQ quantization as `sslcompress quantize` runs it: int8 weights per channel, uint8 activations),
all widths and both types of one feature-map size in the same interleaved rounds. Reported: GMAC/s of each,
and the INT8 factor (float32 ms over INT8 ms).

A second table puts the factors to work: each of ResNet-18's block convs (the stem and the classifier left
out), at the widths of the dense model and of `int8_resnet.py --scope all --align 16 --keep 0.7,0.5`'s
compact models, runs at the measured GMAC/s of its feature-map size at the geometric mean of its two widths
(linear between the widths measured), in float32 and in INT8; the INT8 factor of those convs follows for
each model, and the compact model's over the dense one's: the share of the dense model's INT8 factor the
compact model's convs can reach, whatever the graph around them.

Usage (from the repository root):

    python benchmarks/int8_width.py                # batch 1 and 8, 1 thread, about 5 minutes
    python benchmarks/int8_width.py --quick        # smoke run: batch 1, two sizes, two widths, 3 rounds

Results: benchmarks/results/int8_width.md and .json (benchmarks/out with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_log import csv, log  # noqa: E402
from conv_width_throughput import (  # noqa: E402
    LAYERS,
    add_timing_options,
    chain_macs,
    check_timing_options,
    conv_chain,
)
from paper_cifar10 import machine, now  # noqa: E402
from surgery_resnet import kept_count  # noqa: E402

from sslcompress.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from sslcompress.quantize import quantize_qdq  # noqa: E402
from sslcompress.runtime import create_session  # noqa: E402
from sslcompress.runtime.timing import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# ResNet-18's stages: (feature-map size, width)
STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))
SHARES = (0.25, 0.5, 0.75, 1.0)
# int8_resnet.py --scope all --align 16 --keep 0.7,0.5: every width of the network kept in this share
PLAN_KEEPS = (0.7, 0.5)
PLAN_ALIGN = 16


def grid(shares=SHARES, stages=STAGES) -> dict[int, list[int]]:
    """Widths timed per feature-map size: each share of the stage's width, in whole blocks of 16."""
    return {size: sorted({kept_count(width, s, PLAN_ALIGN) for s in shares}) for size, width in stages}


def calibration(width: int, size: int, count: int = 8, seed: int = 0) -> np.ndarray:
    """Images for the chain's quantization: non-negative, like the ReLU outputs a ResNet conv reads."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((count, width, size, size)), 0).astype(np.float32)


def int8_chain(width: int, size: int, calibrated: np.ndarray) -> bytes:
    """The chain after ORT's static QDQ quantization with the library's settings (its batch stays free)."""
    quantized, _ = quantize_qdq(onnx.load_from_string(conv_chain(width, size)), calibrated, space_to_depth=False)
    return quantized.SerializeToString()


def time_row(size: int, widths: list[int], batch: int, threads: int, args) -> dict:
    """Every width of one feature-map size, float32 and INT8, timed side by side."""
    runs = {}
    for w in widths:
        x = np.random.default_rng(1).random((batch, w, size, size), dtype=np.float32)
        for kind, model in (("fp32", conv_chain(w, size)), ("int8", int8_chain(w, size, calibration(w, size)))):
            sess = create_session(model, threads=threads)
            runs[f"{kind}:{w}"] = lambda s=sess, x=x: s.run(None, {"x": x})
    raw = interleaved(runs, repeat=args.rounds, warmup=args.warmup, sample_time=args.sample_s)
    cells = {}
    for w in widths:
        cell = {}
        for kind in ("fp32", "int8"):
            ms = statistics.median(raw[f"{kind}:{w}"][1]) * 1e3
            cell[kind] = {"ms": ms, "gmacs": chain_macs(w, size, batch) / (ms * 1e-3) / 1e9}
        cell["int8_factor"] = cell["fp32"]["ms"] / cell["int8"]["ms"]
        cells[str(w)] = cell
    return {"size": size, "batch": batch, "threads": threads, "cells": cells}


def resnet18_convs(widths: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    """(input width, output width, output feature-map size, kernel size) of ResNet-18's block convs with every
    width of stage i at widths[i] (the stem's output and every trunk and inner width alike, as --scope all
    keeps them)."""
    convs = []
    for stage, (size, _) in enumerate(STAGES):
        w = widths[stage]
        before = widths[stage - 1] if stage else w
        convs += [(before, w, size, 3), (w, w, size, 3), (w, w, size, 3), (w, w, size, 3)]
        if stage:
            convs.append((before, w, size, 1))  # the downsample
    return convs


def gmacs_at(row: dict, kind: str, width: float) -> float:
    ws = sorted(int(k) for k in row["cells"])
    return float(np.interp(width, ws, [row["cells"][str(w)][kind]["gmacs"] for w in ws]))


def conv_seconds(rows: list[dict], widths, batch: int, threads: int) -> dict[str, float]:
    """Seconds of the block convs at `widths`, float32 and INT8, at the measured throughputs."""
    by_size = {r["size"]: r for r in rows if r["batch"] == batch and r["threads"] == threads}
    total = {"fp32": 0.0, "int8": 0.0, "macs": 0.0}
    for cin, cout, size, k in resnet18_convs(widths):
        macs = cin * cout * k * k * size * size * batch
        total["macs"] += macs
        for kind in ("fp32", "int8"):
            total[kind] += macs / (gmacs_at(by_size[size], kind, (cin * cout) ** 0.5) * 1e9)
    return total


def plans() -> dict[str, tuple[int, ...]]:
    dense = tuple(w for _, w in STAGES)
    out = {"dense": dense}
    for keep in PLAN_KEEPS:
        out[f"keep {keep:g}"] = tuple(kept_count(w, keep, PLAN_ALIGN) for w in dense)
    return out


def compounding(rows: list[dict], batches, threads_list) -> list[dict]:
    """Per plan and setting: the MACs kept, the INT8 factor of the block convs, and its share of the dense
    model's (what the target asks to be at least 1)."""
    out = []
    for threads in threads_list:
        for batch in batches:
            dense = None
            for plan, widths in plans().items():
                s = conv_seconds(rows, widths, batch, threads)
                factor = s["fp32"] / s["int8"]
                dense = dense or {"factor": factor, "macs": s["macs"]}
                out.append({"plan": plan, "widths": list(widths), "batch": batch, "threads": threads,
                            "mac_fraction": s["macs"] / dense["macs"], "int8_factor": factor,
                            "of_dense_factor": factor / dense["factor"]})
    return out


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# What INT8 adds to a 3x3 conv, by width, in ONNX Runtime (CPU EP)", "",
        f"Generated by `{doc['command']}` on {doc['date']}. Machine: {m['cpu']} "
        f"({', '.join(x for x in m['cpu_isa'] if x.startswith('avx'))}), nproc {m['nproc']}, shared with other "
        f"work; ORT {doc['onnxruntime']}. {doc['rounds']} interleaved rounds per row (every width, float32 and "
        "INT8).", "",
        f"A chain of {LAYERS} 3x3 convs W -> W (padding 1, ReLU after each) per cell, float32 and after ORT's "
        "static QDQ quantization (`sslcompress.quantize.quantize_qdq`): GMAC/s of each at the median latency, "
        "and the INT8 factor (float32 ms over INT8 ms).", "",
        "| feature map | batch | threads | width | float32 GMAC/s | INT8 GMAC/s | INT8 factor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        for w in sorted(r["cells"], key=int):
            c = r["cells"][w]
            lines.append(f"| {r['size']}x{r['size']} | {r['batch']} | {r['threads']} | {w} | "
                         f"{c['fp32']['gmacs']:.1f} | {c['int8']['gmacs']:.1f} | {c['int8_factor']:.2f}x |")
    if doc["compounding"]:
        lines += ["", "## What these factors allow a compact ResNet-18", "",
                  "ResNet-18's block convs (stem and classifier left out) at the widths of each plan, each at the "
                  "measured GMAC/s of its feature-map size at the geometric mean of its two widths: the INT8 "
                  "factor of those convs, and its share of the dense model's (the target of "
                  "`int8_resnet.py`: at least 1).", "",
                  "| plan | stage widths | MACs of the block convs | batch | threads | INT8 factor | "
                  "of the dense model's |", "|---|---|---|---|---|---|---|"]
        for c in doc["compounding"]:
            lines.append(f"| {c['plan']} | {' '.join(map(str, c['widths']))} | {c['mac_fraction']:.1%} | "
                         f"{c['batch']} | {c['threads']} | {c['int8_factor']:.2f}x | {c['of_dense_factor']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_options(ap, rounds=15, warmup=3)
    ap.add_argument("--name", default="int8_width", help="results file stem")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 1, sizes 14 and 7, two widths, 3 rounds")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; benchmarks/out with --quick)")
    args = ap.parse_args(argv)
    args.grid = grid()
    if args.quick:
        args.batch, args.rounds, args.warmup, args.sample_s = "1", 3, 1, 0.005
        args.grid = {size: widths[:2] for size, widths in args.grid.items() if size <= 14}
    args.batch, args.threads = csv(args.batch, int), csv(args.threads, int)
    if not all(xs and min(xs) >= 1 for xs in (args.batch, args.threads)):
        ap.error("--batch and --threads must be positive")
    check_timing_options(ap, args)
    return args


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    args = parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / ("out" if args.quick else "results")
    rows = []
    for threads in args.threads:
        for batch in args.batch:
            for size, widths in args.grid.items():
                row = time_row(size, widths, batch, threads, args)
                rows.append(row)
                log(f"{size}x{size} batch {batch}, {threads} thread(s): " + ", ".join(
                    f"W={w} {row['cells'][str(w)]['int8_factor']:.2f}x" for w in widths))
    # the plans' widths lie inside the full grid only
    whole = len(args.grid) == len(STAGES) and all(args.grid[s][-1] == w for s, w in STAGES)
    doc = {"command": " ".join(["python benchmarks/int8_width.py", *(sys.argv[1:] if argv is None else argv)]),
           "date": now(), "machine": machine(), "onnxruntime": ort.__version__, "rounds": args.rounds,
           "rows": rows, "compounding": compounding(rows, args.batch, args.threads) if whole else []}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(doc, out / f"{args.name}.json")
    atomic_write_bytes(render(doc).encode(), out / f"{args.name}.md")
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
