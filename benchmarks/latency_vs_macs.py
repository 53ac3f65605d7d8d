"""Latency-targeted against MAC-targeted SSL at equal measured latency: a CIFAR ResNet on CIFAR-10, ORT CPU.

One pretrained CIFAR ResNet (ResNet-20 by default; the model is the checkpoint's own, e.g. resnet56), two SSL runs through the library (run_finetune): the first asks for a share of the
MACs (`--target-flops`), the second for the latency the first one's compact model measured
(`--target-latency`, predicted by the per-layer table of `sslcompress profile`; the measured milliseconds are
first put on the table's scale by the dense model's predicted over measured, timed in the same rounds). Both
are exported, cut and verified (as `sslcompress export`), and the dense, MAC-targeted and latency-targeted
models are timed in one interleaved run. The question: at the same measured latency, which keeps more
accuracy?

    python benchmarks/latency_vs_macs.py --pretrained benchmarks/out/cifar_resnet20_b/pretrained.pt
    python benchmarks/latency_vs_macs.py --pretrained benchmarks/out/cifar_resnet56/pretrained.pt --align auto \
        --name latency_vs_macs_resnet56
    python benchmarks/latency_vs_macs.py --pretrained benchmarks/out/cifar_resnet20/pretrained.pt --align auto \
        --latency-align 8 --name latency_vs_macs_resnet20_align8   # another channel step at the same latency
    python benchmarks/latency_vs_macs.py --pretrained benchmarks/out/cifar_resnet20/pretrained.pt --align auto \
        --structures filter,channel,depth --name latency_vs_macs_resnet20_depth   # whole blocks may go too
    python benchmarks/latency_vs_macs.py --quick           # smoke run: 2000 / 1000 images, 1 epoch a phase

Results: benchmarks/results/latency_vs_macs.json and .md (benchmarks/out/ with --quick).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import onnx
from bench_log import log
from paper_cifar10 import REPO, export_compact, export_dense, finetune, machine, now, phase
from resnet20_runs import (
    add_training_args,
    as_recorded,
    finished_settings,
    ready,
    reuse_or_train,
    write_results,
)

from sslcompress.errors import ConfigError, TrainingError, UnreachableBudgetError
from sslcompress.finetune.checkpoint import load_checkpoint
from sslcompress.group_kinds import parse_kinds
from sslcompress.latency import current_key, default_path
from sslcompress.latency.profile import load_or_new, profile_model, time_sessions
from sslcompress.latency.table import save_table

MACS_FOLDER = "macs"  # the MAC-targeted run's folder in a run folder


def run_folder(base: Path, name: str, quick: bool = False) -> Path:
    """Where a run of this benchmark keeps its models: one folder per --name."""
    return base / (f"{name}_quick" if quick else name)


def latency_folder(out: Path, attempt: int) -> Path:
    """One latency-targeted attempt's folder: `latency` for the first, then `latency_2`, `latency_3`, ..."""
    return out / ("latency" if attempt == 1 else f"latency_{attempt}")


def compared_models(results: dict) -> dict[str, str]:
    """The files, relative to the run folder, of the three models a finished run compared: the dense one, the
    MAC-targeted one and the latency-targeted attempt that measured nearest it (its folder is in the results;
    runs that predate the field made one attempt)."""
    chosen = results["result"]["rows"]["latency"].get("folder", latency_folder(Path(), 1).name)
    return {"dense": "dense.onnx", "macs": f"{MACS_FOLDER}/compact.onnx", "latency": f"{chosen}/compact.onnx"}


def settings(args, weighting: str = "none", align=..., **target) -> dict:
    """One run's finetune options; `align` other than --align's where given (None: no alignment)."""
    return {"structures": args.structures, "lambdas": {kind: args.strength for kind in args.structures},
            "solver": "proximal", "weighting": weighting, "align": args.align if align is ... else align,
            "sparsify": phase(args.sparsify_epochs, args.lr, args.batch_size, 0.0, "constant"),
            "finetune": phase(args.finetune_epochs, args.finetune_lr, args.batch_size, 5e-4, "cosine"), **target}


def table_for(args, weights: Path) -> Path:
    """The latency table of this machine for the checkpoint's model at batch 1, 1 thread, profiled where missing."""
    key = current_key("cpu", 1, 1)
    path = default_path(key, REPO / "benchmarks" / "out" / "latency")
    table = load_or_new(path, key, on_stale=log)
    ckpt = load_checkpoint(weights)
    log(f"profiling {args.model} into {path} (only what the table lacks)")
    profile_model(ckpt.build().eval(), ckpt.model.input_shape, key, table, name=args.model)
    save_table(table, path)
    return path


def run(args, out: Path) -> dict:
    weights = Path(args.pretrained)
    table = table_for(args, weights)
    dense = out / "dense.onnx"
    export_dense(weights, dense)
    rows = {}
    report, secs, surgery = trained(args, weights, out / MACS_FOLDER,
                                    settings(args, target_flops=args.target_flops, latency_table=str(table)))

    timed = time_sessions({"dense": onnx.load(str(dense)), "macs": onnx.load(str(out / MACS_FOLDER / "compact.onnx"))},
                          (1, 3, 32, 32), current_key("cpu", 1, 1), rounds=args.rounds)
    rows["macs"] = {"report": report, "surgery_totals": surgery["totals"], "train_s": secs}
    # The table's milliseconds for the MAC-targeted model's measured latency: the dense model's prediction
    # over its measurement in the same rounds scales one onto the other.
    dense_pred = _dense_prediction(table, weights)
    target_ms = timed["macs"] * dense_pred / timed["dense"]
    log(f"MAC-targeted model: {timed['macs']:.3f} ms measured against dense {timed['dense']:.3f} ms; asking the "
        f"latency-targeted run for {target_ms:.3f} ms on the table's scale (dense predicted {dense_pred:.3f} ms)")
    # The prediction is not exact: where the latency-targeted model measures more than args.match off the
    # MAC-targeted one, the target moves and the run is repeated, so that the two compare at one measured
    # latency. The first correction is by the measured ratio; from the second on, the two attempts nearest
    # the match give a secant step, which does not overshoot back and forth as the ratio alone can.
    def latency_settings(target: float) -> dict:
        return settings(args, args.latency_weighting, args.latency_align, target_flops=None, target_latency=target,
                        latency_table=str(table))

    attempts, candidates = [], []
    for attempt in range(1, args.attempts + 1):
        folder = latency_folder(out, attempt)
        earlier = earlier_target(folder, latency_settings(target_ms)) if args.reuse else None
        if earlier is not None:
            log(f"latency-targeted attempt {attempt}: reading back the finished one in {folder}, asked "
                f"{earlier:.3f} ms (this run would ask {target_ms:.3f})")
            target_ms = earlier
        try:
            report, secs, surgery = trained(args, weights, folder, latency_settings(target_ms))
        except (UnreachableBudgetError, TrainingError) as exc:
            # A target below what the widths' step allows (refused before sparsify, or at its end): the
            # attempts end here.
            log(f"latency-targeted attempt {attempt}: asked {target_ms:.3f} ms, not reachable: {exc}")
            attempts.append({"asked_ms": target_ms, "unreachable": str(exc), "folder": folder.name})
            break
        pair = time_sessions({"macs": onnx.load(str(out / MACS_FOLDER / "compact.onnx")),
                              "latency": onnx.load(str(folder / "compact.onnx"))},
                             (1, 3, 32, 32), current_key("cpu", 1, 1), rounds=args.rounds)
        ratio = pair["latency"] / pair["macs"]
        attempts.append({"asked_ms": target_ms, "predicted_ms": report["latency"]["predicted_ms"],
                         "accuracy": report["accuracy"]["after_finetune"], "measured_over_macs_model": ratio,
                         "folder": folder.name})
        candidates.append({"report": report, "surgery_totals": surgery["totals"], "train_s": secs,
                           "asked_ms": target_ms, "folder": folder, "ratio": ratio})
        log(f"latency-targeted attempt {attempt}: asked {target_ms:.3f} ms, predicted "
            f"{report['latency']['predicted_ms']:.3f} ms, measured {ratio:.3f} of the MAC-targeted model's latency")
        if abs(ratio - 1) <= args.match:
            break
        target_ms = next_target(attempts)
    # The attempt that measured nearest the MAC-targeted model is the one compared.
    if not candidates:
        raise SystemExit(f"error: no latency-targeted run could be trained: {attempts[-1]['unreachable']}")
    best = min(candidates, key=lambda c: abs(c["ratio"] - 1))
    rows["latency"] = {k: v for k, v in best.items() if k != "ratio"}
    models = {n: onnx.load(str(p)) for n, p in (("dense", dense), ("macs", out / MACS_FOLDER / "compact.onnx"),
                                                ("latency", rows["latency"]["folder"] / "compact.onnx"))}
    final = {}
    for batch in args.batches:
        final[batch] = time_sessions(models, (batch, 3, 32, 32), current_key("cpu", 1, batch), rounds=args.rounds)
        log(f"batch {batch}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in final[batch].items()))
    return {"rows": {n: _row(r) for n, r in rows.items()}, "timed_ms": {str(b): t for b, t in final.items()},
            "dense_predicted_ms": dense_pred, "table": str(table), "attempts": attempts}


def trained(args, weights: Path, folder: Path, run_settings: dict) -> tuple[dict, float, dict]:
    """One SSL run, exported and cut: (its report, its training seconds, the surgery report). With --reuse, a
    run folder that already holds them from the same settings is read instead of trained again."""
    def train() -> tuple[dict, float, dict]:
        report, secs = finetune(args, args.model, weights, folder, run_settings)
        return report, secs, export_compact(args, folder / "sparse.pt", folder)

    return reuse_or_train(folder, run_settings, args.reuse, train)


def earlier_target(folder: Path, run_settings: dict) -> float | None:
    """The target a finished latency-targeted attempt in `folder` was asked for, where every other setting is
    `run_settings`'s; else None. The asked target comes from the MAC-targeted model's latency timed afresh in
    every run, so it moves with the machine's noise; without this `--reuse` would train every attempt again."""
    kept = finished_settings(folder)
    if kept is None or not isinstance(kept.get("target_latency"), (int, float)):
        return None
    same_otherwise = {**kept, "target_latency": None} == {**as_recorded(run_settings), "target_latency": None}
    return float(kept["target_latency"]) if same_otherwise else None


def next_target(attempts: list[dict]) -> float:
    """The next latency to ask for. One attempt: its target over its measured ratio. More: the secant through
    the two attempts nearest a ratio of 1, in logs (latency falls about as a power of the target), kept
    within a factor 1.5 of the nearest attempt's target; the ratio again where the two show no rising slope."""
    attempts = [a for a in attempts if "measured_over_macs_model" in a]
    if len(attempts) == 1:
        return attempts[0]["asked_ms"] / attempts[0]["measured_over_macs_model"]
    a, b = sorted(attempts, key=lambda x: abs(math.log(x["measured_over_macs_model"])))[:2]
    ta, tb = math.log(a["asked_ms"]), math.log(b["asked_ms"])
    ra, rb = math.log(a["measured_over_macs_model"]), math.log(b["measured_over_macs_model"])
    if ta == tb or (rb - ra) / (tb - ta) <= 0:
        # No slope to follow (one target twice, or a noisy pair where asking more measured less): the ratio.
        return a["asked_ms"] / a["measured_over_macs_model"]
    step = -ra * (tb - ta) / (rb - ra)
    return a["asked_ms"] * math.exp(max(-math.log(1.5), min(math.log(1.5), step)))


def _dense_prediction(table: Path, weights: Path) -> float:
    from sslcompress.finetune.structure import analyze
    from sslcompress.latency.predict import predict_dense
    from sslcompress.latency.table import load_table

    ckpt = load_checkpoint(weights)
    return predict_dense(load_table(table), analyze(ckpt.build().eval(), ckpt.model.input_shape))


def _row(r: dict) -> dict:
    rep, totals = r["report"], r["surgery_totals"]
    out = {"accuracy": rep["accuracy"], "macs_fraction": totals["macs_after"] / totals["macs"],
           "params_after": totals["params_after"], "budget": rep.get("budget"), "latency": rep.get("latency"),
           "train_s": r["train_s"], "widths": [lay["filters"] for lay in rep["layers"]]}
    if "asked_ms" in r:
        out["asked_ms"] = r["asked_ms"]
    if "folder" in r:
        out["folder"] = Path(r["folder"]).name
    return out


_MODEL_NAMES = {"resnet20": "ResNet-20", "resnet32": "ResNet-32", "resnet56": "ResNet-56"}


def render_md(doc: dict) -> str:
    res = doc["result"]
    md = [f"# Latency-targeted against MAC-targeted SSL ({_MODEL_NAMES.get(doc.get('model'), doc.get('model', 'resnet20'))}"
          ", CIFAR-10, ORT CPU, 1 thread)", "",
          f"Date {doc['date_utc']}. Command: `{doc['command']}`.", "",
          "| run | top-1 (test) | MACs kept | " + " | ".join(f"measured ms, batch {b}" for b in res["timed_ms"])
          + " |", "|---|---|---|" + "---|" * len(res["timed_ms"])]
    align = f" --align {doc['align']}" if doc.get("align") else ""
    latency_align = doc.get("latency_align", doc.get("align"))
    latency_align = f" --align {latency_align}" if latency_align else ""
    # Runs before --structures existed, and runs at its default, read as they always did.
    structures = doc.get("structures", ["filter", "channel"])
    kinds = f" -s {','.join(structures)}" if structures != ["filter", "channel"] else ""
    names = {"macs": f"--target-flops {doc['target_flops']}{align}{kinds}",
             "latency": f"--target-latency (the first's latency){latency_align}{kinds} --weighting "
                        f"{doc.get('latency_weighting', 'none')}"}
    dense_cells = " | ".join(f"{t['dense']:.3f}" for t in res["timed_ms"].values())
    md.append(f"| dense | {res['rows']['macs']['accuracy']['before']:.2%} | 100% | {dense_cells} |")
    for key, row in res["rows"].items():
        cells = " | ".join(f"{t[key]:.3f}" for t in res["timed_ms"].values())
        md.append(f"| {names[key]} | {row['accuracy']['after_finetune']:.2%} | {row['macs_fraction']:.1%} | {cells} |")
    lat = res["rows"]["latency"]
    md += ["", f"The latency-targeted run asked for {lat['asked_ms']:.3f} ms on the table's scale (dense predicted "
           f"{res['dense_predicted_ms']:.3f} ms) and its report predicted {lat['latency']['predicted_ms']:.3f} ms. "
           "All three models were timed in the same interleaved rounds at the end.", ""]
    if res.get("attempts"):
        md += ["Latency-targeted attempts (after the first, the target moves by the measured ratio; after later "
               "ones, by a secant through the two nearest the match; until the two compact models measure within "
               f"{doc.get('match', 0.05):.0%} of each other). The row above is the attempt that measured nearest "
               f"(`{lat.get('folder', 'latency')}`):", "",
               "| attempt | asked ms (table scale) | predicted ms | measured, over the MAC-targeted model | top-1 |",
               "|---|---|---|---|---|"]
        md += [f"| {i} | {a['asked_ms']:.3f} | {a['predicted_ms']:.3f} | {a['measured_over_macs_model']:.3f} | "
               f"{a['accuracy']:.2%} |" if "unreachable" not in a else
               f"| {i} | {a['asked_ms']:.3f} | not reachable at this channel step | - | - |"
               for i, a in enumerate(res["attempts"], 1)]
        md += [""]
    md += [
           f"Kept widths (filters kept/total per conv): MAC-targeted `{res['rows']['macs']['widths']}`; "
           f"latency-targeted `{lat['widths']}`.", "",
           f"Machine: nproc {doc['machine']['nproc']}; load average at end "
           f"{', '.join(f'{x:.2f}' for x in doc['machine']['load_average_at_end'])}.", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(ap)
    ap.add_argument("--align", default=None, help="--align of both runs: N or auto (the table's channel step)")
    ap.add_argument("--latency-align", default=None,
                    help="--align of the latency-targeted runs when it differs from --align's: N, auto, or 1 for "
                         "none (which channel step buys more accuracy at the MAC-targeted model's latency)")
    ap.add_argument("--structures", default="filter,channel",
                    help="SSL structures of both runs (e.g. filter,channel,depth: whole residual blocks may go too)")
    ap.add_argument("--name", default="latency_vs_macs", help="stem of the results and output folder")
    ap.add_argument("--latency-weighting", default="latency", choices=["none", "macs", "latency"],
                    help="--weighting of the latency-targeted run (its default with --target-latency: latency)")
    ap.add_argument("--attempts", type=int, default=3,
                    help="latency-targeted runs at most, the target corrected after each (by the ratio, then by secant)")
    ap.add_argument("--reuse", action="store_true",
                    help="read finished runs of the same settings from the output folder instead of training again "
                         "(latency-targeted attempts at the targets they were asked)")
    ap.add_argument("--match", type=float, default=0.05,
                    help="how close (relative) the two compact models' measured latencies must come")
    args = ap.parse_args(argv)
    try:
        args.structures = parse_kinds(args.structures)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.align not in (None, "auto"):
        args.align = int(args.align)
    if args.latency_align is None:
        args.latency_align = args.align
    elif args.latency_align != "auto":
        args.latency_align = int(args.latency_align) if int(args.latency_align) > 1 else None
    error = ready(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = run_folder(REPO / "benchmarks" / "out", args.name, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    args.model = load_checkpoint(args.pretrained).model.name
    doc = {"benchmark": "latency_vs_macs", "date_utc": now(), "command": " ".join(["python", *sys.argv]),
           "model": args.model, "structures": list(args.structures),
           "target_flops": args.target_flops, "align": args.align, "latency_align": args.latency_align,
           "match": args.match,
           "latency_weighting": args.latency_weighting, "result": run(args, out), "machine": machine()}
    print(write_results(args, doc, render_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
