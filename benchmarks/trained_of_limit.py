"""How close trained compact models come to their MAC-reduction limit in ORT, at 1 and 2 threads, batch 1 and 8.

Reads what one finished run left: its dense model (`dense.onnx`), its two compact models and their MAC fractions
(from its results JSON). A `latency_vs_macs.py` run leaves `macs/compact.onnx` and one `compact.onnx` per
latency-targeted attempt (`latency/`, `latency_2/`, ...) in `out/<run>/`, and the one it compared (its results
name the folder) is read; a `depth_vs_width.py` run leaves `width_<F>/compact.onnx` and `depth_<F>/compact.onnx` in
`out/depth_vs_width/` (F its MAC budgets). Times the three in the same interleaved rounds (`time_sessions`) at
every setting and reports, per compact model, the speed-up over dense and that speed-up times the MAC fraction:
1.0 is the MAC-reduction limit, the issue's target for aligned widths >= 0.9. Nothing is trained; run it with
nothing else on the host.

    python benchmarks/trained_of_limit.py --run latency_vs_macs_resnet20_avx512
    python benchmarks/trained_of_limit.py --run latency_vs_macs_resnet56 --rounds 30
    python benchmarks/trained_of_limit.py --run depth_vs_width

Results: benchmarks/results/<run>_threads.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx
from bench_log import csv, log
from depth_vs_width import variant_folder, work_folder
from latency_vs_macs import compared_models, run_folder
from paper_cifar10 import machine, now

from sslcompress.io import atomic_write_bytes, atomic_write_json
from sslcompress.latency import current_key
from sslcompress.latency.profile import time_sessions
from sslcompress.surgery.inputs import declared_shape

HERE = Path(__file__).resolve().parent
TARGET = 0.9


def compact_models(results: dict, work: Path, run: str) -> tuple[Path, dict[str, str], dict[str, str]]:
    """Where a finished run's models lie: (its folder, file per model name, label per compact model). The kind of
    run is read from its results: depth_vs_width.py names its own, latency_vs_macs.py's have no such key."""
    if results.get("benchmark") == "depth_vs_width":
        folder, rows = work_folder(work), results["result"]["rows"]
        files = {"dense": "dense.onnx", **{n: str(variant_folder(Path(), n, rows[n]["target_flops"]) / "compact.onnx")
                                           for n in ("width", "depth")}}
        return folder, files, {"width": f"filter,channel --align {results['align']}", "depth": "depth"}
    return run_folder(work, run), compared_models(results), {"macs": "MAC-targeted", "latency": "latency-targeted"}


def mac_fractions(results: dict, names) -> dict[str, float]:
    rows = results["result"]["rows"]
    return {"dense": 1.0, **{name: float(rows[name]["macs_fraction"]) for name in names}}


def input_shape(model: onnx.ModelProto, batch: int) -> tuple[int, ...]:
    return (batch, *declared_shape(model)[1:])


def measure(models: dict, macs: dict[str, float], threads: list[int], batches: list[int], rounds: int) -> dict:
    out = {}
    for t in threads:
        for b in batches:
            ms = time_sessions(models, input_shape(models["dense"], b), current_key("cpu", t, b), rounds=rounds)
            out[f"t{t}_b{b}"] = {n: {"ms": ms[n], "speedup": ms["dense"] / ms[n],
                                     "of_limit": ms["dense"] / ms[n] * macs[n]} for n in ms}
            log(f"threads {t}, batch {b}: " + ", ".join(
                f"{n} {r['ms']:.3f} ms ({r['speedup']:.2f}x, {r['of_limit']:.2f} of the limit)"
                for n, r in out[f"t{t}_b{b}"].items()))
    return out


def render(doc: dict) -> str:
    macs, labels = doc["mac_fractions"], doc["labels"]
    first, second = labels
    lines = [f"# Trained compact models against their MAC-reduction limit ({doc['model']}, ORT CPU)", "",
             f"{doc['date_utc']}, `{doc['command']}`. The dense model and the {labels[first]} and "
             f"{labels[second]} models of `{doc['run']}` timed in the same interleaved rounds ({doc['rounds']}) at "
             "each setting; *of limit* is the speed-up over dense times the model's MAC fraction (1.0: as fast as "
             f"its MACs allow; target >= {TARGET}).", "",
             f"| threads, batch | dense ms | {labels[first]} ({macs[first]:.1%} of the MACs) | of limit "
             f"| {labels[second]} ({macs[second]:.1%}) | of limit |", "|---|---|---|---|---|---|"]
    for setting, row in doc["timings"].items():
        t, b = setting[1:].split("_b")
        lines.append(f"| {t}, {b} | {row['dense']['ms']:.3f} | {row[first]['speedup']:.2f}x "
                     f"| {row[first]['of_limit']:.2f} | {row[second]['speedup']:.2f}x "
                     f"| {row[second]['of_limit']:.2f} |")
    met = sum(row[n]["of_limit"] >= TARGET for row in doc["timings"].values() for n in labels)
    total = len(labels) * len(doc["timings"])
    m = doc["machine"]
    lines += ["", f"At least {TARGET} of the limit: **{met} of {total}**.", "",
              f"Machine: {m.get('cpu', 'CPU')} ({', '.join(m.get('cpu_isa', [])) or 'no AVX2'}), nproc "
              f"{m['nproc']}, load average at end {', '.join(f'{x:.2f}' for x in m['load_average_at_end'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the --name of a finished latency_vs_macs.py or depth_vs_width.py run")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--work", default=str(HERE / "out"), help="where the run's output folder lies")
    args = p.parse_args(argv)
    results = Path(args.out) / f"{args.run}.json"
    missing = [str(results)]
    if results.is_file():
        done = json.loads(results.read_text())
        folder, files, labels = compact_models(done, Path(args.work), args.run)
        missing = [str(folder / f) for f in files.values() if not (folder / f).is_file()]
    if missing:
        print(f"error: {args.run} is not a finished latency_vs_macs.py or depth_vs_width.py run here (missing "
              f"{', '.join(missing)})", file=sys.stderr)
        return 2
    macs = mac_fractions(done, labels)
    models = {n: onnx.load(folder / f) for n, f in files.items()}
    timings = measure(models, macs, csv(args.threads, int), csv(args.batches, int), args.rounds)
    doc = {"benchmark": "trained_of_limit", "date_utc": now(), "command": " ".join(["python", *sys.argv]),
           "run": args.run, "model": done.get("model", "resnet20"), "rounds": args.rounds, "mac_fractions": macs,
           "labels": labels, "timings": timings, "machine": machine()}
    out = Path(args.out)
    atomic_write_json(doc, out / f"{args.run}_threads.json")
    atomic_write_bytes(render(doc).encode(), out / f"{args.run}_threads.md")
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
