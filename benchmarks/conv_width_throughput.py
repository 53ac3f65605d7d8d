"""How fast ONNX Runtime (CPU EP) runs a 3x3 conv per MAC at each width: why a compact CIFAR ResNet
falls short of its MAC-reduction limit even with every width a multiple of the channel block.

For each feature-map size of a CIFAR ResNet stage (32, 16 and 8 pixels square) and each width W, a chain
of six 3x3 convs W -> W (padding 1, bias, each followed by a ReLU) is built as ONNX and timed in ORT. All
widths of one feature-map size are timed side by side (`sslcompress.runtime.timing.interleaved`, rotating
order), so the host's drift touches them alike. Reported: GMAC/s (the chain's MACs over its median
latency) and each width's throughput over the best width's of its row.

A compact model's latency over the dense model's is, layer by layer, its MACs over the dense MACs times
the ratio of the two throughputs; so a row where narrow widths run at a fraction of the wide ones' GMAC/s
caps the fraction of the MAC-reduction limit a model cut to those widths can reach, whatever the
alignment. The widths here are multiples of 8, ORT's NCHWc block on AVX2 (16 on AVX-512), so every conv
runs blocked.

A second table puts the throughputs to work: each conv of a CIFAR ResNet-20's stages, at the widths of the
aligned models of benchmarks/results/aligned_widths_avx2_cut.md, is given the measured GMAC/s of its
feature-map size at the geometric mean of its two widths, and the model's fraction of the MAC-reduction
limit follows (what the convs alone allow; the stem, the classifier and the other ops are left out).

Usage (from the repository root):

    python benchmarks/conv_width_throughput.py --threads 1,2   # batch 1 and 8, 1 and 2 threads, about 2 minutes
    python benchmarks/conv_width_throughput.py --quick    # smoke run: batch 1, two widths, a few rounds

Results: benchmarks/results/conv_width_throughput.md and .json (benchmarks/out with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_log import csv, log  # noqa: E402
from paper_cifar10 import machine, now  # noqa: E402

from sslcompress.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from sslcompress.runtime import create_session  # noqa: E402
from sslcompress.runtime.timing import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 6
SIZES = (32, 16, 8)


def conv_chain(width: int, size: int, layers: int = LAYERS, seed: int = 0) -> bytes:
    """`layers` 3x3 convs width -> width with ReLUs, on a (N, width, size, size) input."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width, 3, 3)) * (2.0 / (9 * width)) ** 0.5).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"y{i}"])]
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "conv_chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width, size, size])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", width, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def chain_macs(width: int, size: int, batch: int, layers: int = LAYERS) -> int:
    return layers * width * width * 9 * size * size * batch


def time_row(size: int, widths: list[int], batch: int, threads: int, args) -> dict:
    """Every width of one feature-map size, timed side by side."""
    runs = {}
    for w in widths:
        sess = create_session(conv_chain(w, size), threads=threads)
        x = np.random.default_rng(1).random((batch, w, size, size), dtype=np.float32)
        runs[str(w)] = lambda s=sess, x=x: s.run(None, {"x": x})
    raw = interleaved(runs, repeat=args.rounds, warmup=args.warmup, sample_time=args.sample_s)
    cells = {}
    for w in widths:
        ms = statistics.median(raw[str(w)][1]) * 1e3
        cells[str(w)] = {"ms": ms, "gmacs": chain_macs(w, size, batch) / (ms * 1e-3) / 1e9,
                         "samples_ms": [s * 1e3 for s in raw[str(w)][1]]}
    best = max(c["gmacs"] for c in cells.values())
    for c in cells.values():
        c["of_best"] = c["gmacs"] / best
    return {"size": size, "batch": batch, "threads": threads, "cells": cells}


# CIFAR ResNet-20 widths, one per prunable width in graph order (each stage's trunk, then its three blocks'
# inner widths): the dense model and the aligned models of benchmarks/results/aligned_widths_avx2_cut.md.
RESNET20_DENSE = (16, 16, 16, 16, 32, 32, 32, 32, 64, 64, 64, 64)
RESNET20_PLANS = {
    "align8 at 30%": (8, 8, 8, 8, 16, 16, 24, 16, 40, 32, 40, 32),
    "align8 at 50%": (16, 8, 8, 8, 24, 16, 24, 16, 48, 32, 48, 48),
    "align16 at 50%": (16, 16, 16, 16, 16, 16, 16, 16, 32, 32, 16, 16),
}


def resnet20_convs(widths) -> list[tuple[int, int, int, int]]:
    """(input width, output width, feature-map size, kernel size) of every conv of a CIFAR ResNet-20's stages
    at these widths (the 3-channel stem and the classifier left out: no width of theirs is cut here)."""
    convs = []
    for stage, size in enumerate(SIZES):
        trunk, inner = widths[4 * stage], widths[4 * stage + 1:4 * stage + 4]
        before = widths[4 * (stage - 1)] if stage else trunk
        for block, w in enumerate(inner):
            cin = before if block == 0 else trunk
            convs += [(cin, w, size, 3), (w, trunk, size, 3)]
            if block == 0 and stage:
                convs.append((cin, trunk, size, 1))  # the downsample
    return convs


def throughput_at(row: dict, width: float) -> float:
    """GMAC/s of a row at any width: linear between the widths measured, the end ones beyond them."""
    ws = sorted(int(k) for k in row["cells"])
    return float(np.interp(width, ws, [row["cells"][str(w)]["gmacs"] for w in ws]))


def limit_from_throughput(rows: list[dict], widths, batch: int, threads: int) -> tuple[float, float]:
    """(MAC fraction, fraction of the MAC-reduction limit) of a ResNet-20 at `widths` against the dense one, if
    each conv ran at the measured throughput of its feature-map size at the geometric mean of its two widths."""
    by_size = {r["size"]: r for r in rows if r["batch"] == batch and r["threads"] == threads}

    def cost(ws) -> tuple[float, float]:
        seconds = macs = 0.0
        for cin, cout, size, k in resnet20_convs(ws):
            m = cin * cout * k * k * size * size * batch
            seconds += m / throughput_at(by_size[size], (cin * cout) ** 0.5)
            macs += m
        return seconds, macs

    (t_dense, m_dense), (t, m) = cost(RESNET20_DENSE), cost(widths)
    fraction = m / m_dense
    return fraction, (t_dense / t) * fraction


def render(doc: dict) -> str:
    m = doc["machine"]
    widths = doc["widths"]
    lines = [
        "# Conv throughput by width in ONNX Runtime (CPU EP)", "",
        f"Generated by `{doc['command']}` on {doc['date']}. Machine: {m['cpu']} "
        f"({', '.join(x for x in m['cpu_isa'] if x.startswith('avx'))}), nproc {m['nproc']}, shared with other "
        f"work; ORT {doc['onnxruntime']}. {doc['rounds']} interleaved rounds per row.", "",
        f"A chain of {LAYERS} 3x3 convs W -> W (padding 1, ReLU after each) per cell: GMAC/s at the median "
        "latency, and in brackets the fraction of the row's best GMAC/s.", "",
        "| feature map | batch | threads | " + " | ".join(f"W = {w}" for w in widths) + " |",
        "|---|---|---|" + "---|" * len(widths),
    ]
    for r in doc["rows"]:
        cells = " | ".join(f"{r['cells'][str(w)]['gmacs']:.1f} ({r['cells'][str(w)]['of_best']:.2f})"
                           for w in widths)
        lines.append(f"| {r['size']}x{r['size']} | {r['batch']} | {r['threads']} | {cells} |")
    if doc["limits"]:
        lines += ["", "## What these throughputs allow a compact ResNet-20", "",
                  "Each conv of ResNet-20's stages at the measured GMAC/s of its feature-map size at the geometric "
                  "mean of its two widths (stem, classifier and the other ops left out), for the aligned models of "
                  "[aligned_widths_avx2_cut.md](aligned_widths_avx2_cut.md): the fraction of the MAC-reduction "
                  "limit (speed-up over dense / MAC reduction) the throughputs alone leave them.", "",
                  "| widths | MACs of the stages | batch | threads | fraction of the limit |", "|---|---|---|---|---|"]
        for lim in doc["limits"]:
            lines.append(f"| {lim['plan']} ({' '.join(map(str, lim['widths']))}) | {lim['mac_fraction']:.3f} | "
                         f"{lim['batch']} | {lim['threads']} | {lim['limit']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="8,16,24,32,48,64", help="conv widths (comma list)")
    add_timing_options(ap, rounds=20, warmup=5)
    ap.add_argument("--name", default="conv_width_throughput", help="results file stem")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 1, widths 8 and 16, 3 rounds")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; benchmarks/out with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.batch, args.rounds, args.warmup, args.sample_s = "8,16", "1", 3, 1, 0.005
    args.widths, args.batch, args.threads = csv(args.widths, int), csv(args.batch, int), csv(args.threads, int)
    if not all(xs and min(xs) >= 1 for xs in (args.widths, args.batch, args.threads)):
        ap.error("--widths, --batch and --threads must be positive")
    check_timing_options(ap, args)
    return args


def add_timing_options(ap: argparse.ArgumentParser, rounds: int, warmup: int) -> None:
    """The batch, thread and interleaved-rounds options of the conv-chain benchmarks (this one, int8_width.py)."""
    ap.add_argument("--batch", default="1,8", help="batch sizes (comma list)")
    ap.add_argument("--threads", default="1", help="ORT intra-op thread counts (comma list)")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--sample-s", type=float, default=0.05, help="length of one sample of back-to-back calls")


def check_timing_options(ap: argparse.ArgumentParser, args) -> None:
    if args.rounds < 1 or args.warmup < 0 or args.sample_s <= 0:
        ap.error("--rounds >= 1, --warmup >= 0 and --sample-s > 0 are required")


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    args = parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / ("out" if args.quick else "results")
    rows = []
    for threads in args.threads:
        for batch in args.batch:
            for size in SIZES:
                row = time_row(size, args.widths, batch, threads, args)
                rows.append(row)
                log(f"{size}x{size} batch {batch}, {threads} thread(s): " + ", ".join(
                    f"W={w} {row['cells'][str(w)]['gmacs']:.1f} GMAC/s" for w in args.widths))
    limits = []
    if {8, 64} <= set(args.widths):  # the plans' widths lie between these
        for threads in args.threads:
            for batch in args.batch:
                for plan, widths in RESNET20_PLANS.items():
                    frac, limit = limit_from_throughput(rows, widths, batch, threads)
                    limits.append({"plan": plan, "widths": list(widths), "batch": batch, "threads": threads,
                                   "mac_fraction": frac, "limit": limit})
    doc = {"command": "python benchmarks/conv_width_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": now(), "machine": machine(), "onnxruntime": ort.__version__, "rounds": args.rounds,
           "widths": args.widths, "rows": rows, "limits": limits}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(doc, out / f"{args.name}.json")
    atomic_write_bytes(render(doc).encode(), out / f"{args.name}.md")
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
