"""How close does the latency table predict a compact model's latency in ONNX Runtime (CPU EP, 1 thread; or CUDA)?

For each model (resnet20 at 32x32, the builtin ImageNet resnet18 at 224x224; random weights from --seed,
random BatchNorm statistics so the export's folding is not a no-op) and each batch size (1 and 8):

1. profile: the per-layer latency table (`sslcompress.latency.profile_model`), cached in
   benchmarks/out/latency/ (a rerun measures nothing new). resnet18 uses a coarse grid (--step-resnet18,
   default 32: 2 widths on its 64-wide stage, 16 on its 512-wide one), resnet20 the default grid.
2. prunings: for each MAC target (default 70%, 50%, 30% of the dense MACs) the model's removable filter groups
   (`build_groups(..., ("filter",))`) are zeroed in a random order (seeded), as many as bring the MACs
   (`Counter`) to the target: a random structured pruning, not a trained one. Beside it (unless --no-aligned)
   an aligned one: every free width keeps a random share around the root of the target, rounded to ORT's
   channel block on this CPU, as `finetune --align auto` leaves widths. Each is exported
   (`export_onnx`, BatchNorm folded) and cut by the surgery (`compress`, shape lowering off: filter zeros
   leave no partial columns), which must pass its verification. The dense model is a case too (target 1.0).
3. predicted: `sslcompress.latency.predict(table, structure, count)`, the layers' table figures at the kept
   widths plus the calibrated overhead. Beside it, the naive MAC-proportional guess: the dense model's
   measured latency times the MAC fraction.
4. measured: the compact model alone in `sslcompress.runtime.timing.interleaved` (1 thread, no pinning,
   as the table's ops are timed), in --passes passes over all the models (default 3, --rounds samples shared
   among them), the median of the passes' medians: a slow window of the shared host touches one pass of a
   model, not all its samples. Beside it, the compact model and the dense one timed in the same rounds.

The ratio predicted / measured is the figure: the target set for the predictor is within 10% (0.9-1.1).
The machine is shared (2 cores, another job running), so every figure is noisy; the load average is
recorded beside each case.

Usage (from the repository root):

    python benchmarks/latency_prediction.py            # resnet20 + resnet18, batch 1 and 8 (several minutes)
    python benchmarks/latency_prediction.py --quick    # smoke run: resnet20, batch 1, one target, coarse grid
    python benchmarks/latency_prediction.py --provider cuda --out "$OUT"   # the same on the CUDA provider

Results: benchmarks/results/latency_prediction.{json,md} (benchmarks/out/ with --quick; --out DIR for another
folder). On CUDA the table has no channel blocks (`--align auto` reads a step of 1 there), so the aligned
prunings are left out, and "1 thread" is the CPU side's setting only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslcompress.finetune.counting import Counter
from sslcompress.finetune.groups import ParamGroup, build_groups
from sslcompress.finetune.structure import analyze
from sslcompress.io import atomic_write_bytes, atomic_write_json
from sslcompress.latency import (
    current_key,
    default_path,
    load_or_new,
    predict,
    predict_dense,
    profile_model,
    save_table,
)
from sslcompress.latency.profile import random_variant
from sslcompress.models import ModelSpec, build_model, natural_input
from sslcompress.runtime import create_session, interleaved, runner
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
RESULTS = REPO / "benchmarks" / "results"
TOLERANCE = 0.10  # the target: predicted within 10% of measured


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def csv(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------------------
# Models and random prunings


@torch.no_grad()
def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Trained-looking BatchNorm statistics: with unit variance and zero mean, folding would change nothing."""
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            bn.weight.copy_(0.5 + torch.rand(n, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(n, generator=gen))


def dense_model(name: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    channels, size = natural_input(name)
    torch.manual_seed(seed)
    model = build_model(ModelSpec(name, 10, channels, size))
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.eval(), (1, channels, *size)


@torch.no_grad()
def zero(model: nn.Module, groups: list[ParamGroup]) -> None:
    params = dict(model.named_parameters())
    for g in groups:
        for s in g.slices:
            params[s.param].index_fill_(0 if s.axis == "out" else 1, torch.tensor(s.index), 0.0)


def random_pruning(model: nn.Module, shape, structure, target: float, seed: int) -> tuple[nn.Module, int]:
    """A copy of `model` with random filter groups zeroed until its MACs are at most `target` of the dense
    MACs (the fewest that do, by bisection over a seeded random order); returns it and the groups zeroed."""
    import copy

    groups = [g for g in build_groups(model, shape, ("filter",), structure) if g.removable]
    order = np.random.default_rng(seed).permutation(len(groups))
    ranked = [groups[i] for i in order]

    def pruned(k: int) -> tuple[nn.Module, float]:
        m = copy.deepcopy(model)
        zero(m, ranked[:k])
        return m, Counter(m, shape, structure).count().macs_fraction

    lo, hi = 0, len(ranked)  # fraction(lo) > target >= fraction(hi), assuming more zeros never add MACs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pruned(mid)[1] <= target:
            hi = mid
        else:
            lo = mid
    return pruned(hi)[0], hi


def aligned_pruning(model: nn.Module, shape, structure, target: float, seed: int, block: int) -> nn.Module:
    """A copy of `model` whose every free width keeps a random share around sqrt(target) of its channels (a
    conv's MACs scale with its input and output widths), rounded to ORT's channel block: the kind of model
    `finetune --align auto` leaves, at about the target's MACs. Seeds from 1000 on: not the profile's own
    random calibration variants."""
    centre = target ** 0.5
    variant = random_variant(model, shape, structure, seed=1000 + seed, block=block, aligned=True,
                             share=(max(0.05, centre - 0.2), min(1.0, centre + 0.2)))
    if variant is None:
        raise SystemExit(f"error: no free width to narrow at {target:.0%}")
    return variant


def compact_onnx(model: nn.Module, shape) -> tuple[bytes, dict]:
    exported = export_onnx(model, (1, *shape[1:]), dynamic_batch=True)
    if exported.bn_remaining:
        raise SystemExit(f"error: {exported.bn_remaining} BatchNormalization nodes survived the export")
    result = compress(exported.model, shape_lowering="off")
    if not result.verification.passed:
        raise SystemExit(f"error: the compact model failed verification (rel {result.verification.rel:.3g})")
    return result.model.SerializeToString(), result.report["totals"]


# ---------------------------------------------------------------------------------------------
# Timing


def measure_samples(onnx_bytes: bytes, shape, batch: int, rounds: int, args) -> list[float]:
    """Timed samples (s) of the model alone at this batch, 1 thread (on CUDA: through bound device buffers)."""
    session = create_session(onnx_bytes, provider=args.provider, threads=1)
    x = np.random.default_rng(args.seed).standard_normal((batch, *shape[1:])).astype(np.float32)
    (_, samples), = interleaved({"model": runner(session, x, args.provider)}, repeat=rounds, warmup=args.warmup,
                                sample_time=args.sample_s).values()
    return list(samples)


def measure_pair_ms(dense_bytes: bytes, onnx_bytes: bytes, shape, batch: int, rounds: int, args) -> tuple[float, float]:
    """Median ms of the dense and the compact model timed in the same rounds: their ratio is immune to the
    machine's drift between the profile and this measurement, which on a shared machine dwarfs the error."""
    x = np.random.default_rng(args.seed).standard_normal((batch, *shape[1:])).astype(np.float32)
    runs = {n: runner(create_session(b, provider=args.provider, threads=1), x, args.provider)
            for n, b in (("dense", dense_bytes), ("compact", onnx_bytes))}
    raw = interleaved(runs, repeat=rounds, warmup=args.warmup, sample_time=args.sample_s)
    return tuple(1e3 * statistics.median(raw[n][1]) for n in ("dense", "compact"))


def measured_in_passes(compacts: list, shape, batch: int, args) -> list[dict]:
    """Each compact model timed alone and beside the dense one, in --passes passes over all of them (the rounds
    shared out among the passes): a window of a few seconds in which the shared host runs slow then touches one
    pass of a model, not all its samples. The figures are the medians of the passes' medians."""
    rounds = max(1, -(-args.rounds // args.passes))
    dense_bytes = compacts[0][4]
    per_case: list[dict] = [{"alone": [], "samples": [], "ratios": [], "load": os.getloadavg()[0]} for _ in compacts]
    for _ in range(args.passes):
        for got, (_, _, _, _, onnx_bytes, _) in zip(per_case, compacts, strict=True):
            samples = measure_samples(onnx_bytes, shape, batch, rounds, args)
            got["samples"] += samples
            got["alone"].append(1e3 * statistics.median(samples))
            pair_dense, pair_compact = measure_pair_ms(dense_bytes, onnx_bytes, shape, batch, rounds, args)
            got["ratios"].append(pair_compact / pair_dense)
    out = []
    for got in per_case:
        q1, q3 = np.quantile(got["samples"], [0.25, 0.75])
        out.append({"measured_ms": statistics.median(got["alone"]), "measured_iqr_ms": 1e3 * float(q3 - q1),
                    "pass_ms": got["alone"], "paired_ratio": statistics.median(got["ratios"]),
                    "load_before": got["load"]})
    return out


def step_for(name: str, args) -> int | None:
    return args.step_resnet18 if name == "resnet18" else args.step


def run_model(name: str, args, cases: list[dict], tables: dict) -> None:
    model, shape = dense_model(name, args.seed)
    structure = analyze(model, shape)
    prunings = [("dense", 1.0, model, 0)]
    for k, target in enumerate(args.targets):
        t0 = time.perf_counter()
        pruned, zeroed = random_pruning(model, shape, structure, target, args.seed + k)
        prunings.append((f"random {target:.0%}", target, pruned, zeroed))
        log(f"{name}: pruning to {target:.0%} of the MACs zeroed {zeroed} filter groups "
            f"[{time.perf_counter() - t0:.0f} s]")
        if not args.no_aligned:
            block = current_key(args.provider).block
            prunings.append((f"aligned ~{target:.0%}", target,
                             aligned_pruning(model, shape, structure, target, args.seed + k, block), None))
    compacts = []
    for label, target, m, zeroed in prunings:
        t0 = time.perf_counter()
        onnx_bytes, totals = compact_onnx(m, shape)
        count = Counter(m, shape, structure).count()
        compacts.append((label, target, zeroed, count, onnx_bytes, totals))
        log(f"{name} {label}: MACs {count.macs_fraction:.3f} of dense (ONNX {totals['macs_fraction']:.3f}) "
            f"[{time.perf_counter() - t0:.0f} s]")
    for batch in args.batch:
        key = current_key(args.provider, threads=1, batch=batch)
        path = default_path(key, args.table_dir)
        table = load_or_new(path, key, on_stale=log)
        t0 = time.perf_counter()
        measured_points = []
        profile_model(model, shape, key, table, step_for(name, args), measured_points.append, name=name,
                      rounds=args.profile_rounds, structure=structure)
        save_table(table, path)
        profile_s = time.perf_counter() - t0
        log(f"{name} batch {batch}: profile measured {len(measured_points)} point(s) [{profile_s:.0f} s] -> {path}")
        tables[f"{name} b{batch}"] = {"path": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
                                      "points": sum(len(e.points) for e in table.entries.values()),
                                      "measured_now": len(measured_points), "seconds": profile_s}
        dense_predicted = predict_dense(table, structure)
        measured = measured_in_passes(compacts, shape, batch, args)
        dense_measured = measured[0]["measured_ms"]
        for (label, target, zeroed, count, _, totals), m in zip(compacts, measured, strict=True):
            predicted = predict(table, structure, count)
            mac_guess = dense_measured * count.macs_fraction
            case = {"model": name, "batch": batch, "case": label, "target": target, "groups_zeroed": zeroed,
                    "macs_fraction": count.macs_fraction, "onnx_macs_fraction": totals["macs_fraction"],
                    "predicted_ms": predicted, **m,
                    "ratio": predicted / m["measured_ms"], "mac_guess_ratio": mac_guess / m["measured_ms"],
                    "relative_ratio": (predicted / dense_predicted) / m["paired_ratio"]}
            cases.append(case)
            log(f"{name} b{batch} {label}: predicted {predicted:.3f} ms, measured {m['measured_ms']:.3f} ms "
                f"(passes {', '.join(f'{x:.3f}' for x in m['pass_ms'])}), ratio {case['ratio']:.3f}; relative to "
                f"dense {case['relative_ratio']:.3f}; MAC-proportional {case['mac_guess_ratio']:.3f} "
                f"[load {m['load_before']:.1f}]")


# ---------------------------------------------------------------------------------------------
# Output


def summary(cases: list[dict]) -> dict:
    pruned = [c for c in cases if c["target"] < 1.0]
    within = [c for c in pruned if abs(c["ratio"] - 1) <= TOLERANCE]
    return {"cases": len(pruned), "within_10pct": len(within),
            "worst_ratio": max((c["ratio"] for c in pruned), key=lambda r: abs(r - 1), default=None),
            "mean_abs_error": statistics.fmean(abs(c["ratio"] - 1) for c in pruned) if pruned else None,
            "mac_guess_mean_abs_error": statistics.fmean(abs(c["mac_guess_ratio"] - 1) for c in pruned)
            if pruned else None,
            "relative_within_10pct": sum(abs(c["relative_ratio"] - 1) <= TOLERANCE for c in pruned),
            "relative_mean_abs_error": statistics.fmean(abs(c["relative_ratio"] - 1) for c in pruned)
            if pruned else None}


def _provider_words(doc: dict) -> str:
    if doc["args"].get("provider", "cpu") == "cuda":
        return f"CUDA EP on {doc['machine'].get('cuda_device') or 'a GPU'} (bound device buffers, each call synchronised)"
    return "CPU EP, 1 thread, no pinning"


def _provider_flag(doc: dict) -> str:
    return " --provider cuda" if doc["args"].get("provider", "cpu") == "cuda" else ""


def render_markdown(doc: dict) -> str:
    s = doc["summary"]
    lines = [
        "# Latency prediction: the per-layer table against measured compact models",
        "",
        f"{doc['date']}, {doc['machine']['cpu']} ({doc['machine']['cpus']} CPUs, shared), onnxruntime "
        f"{doc['machine']['onnxruntime']}, {_provider_words(doc)}. `python benchmarks/latency_prediction.py"
        f"{' --quick' if doc['args']['quick'] else ''}{_provider_flag(doc)}` ({doc['seconds']:.0f} s).",
        "",
        "Random structured prunings (*random*: random filter groups zeroed to the MAC target; *aligned*: every "
        "width keeping a random share of about the root of the target, rounded to ORT's channel block, as "
        "`--align auto` leaves them), exported and cut by the surgery; *predicted* is "
        "`sslcompress.latency.predict` on the profiled table (calibrated by the dense model and its narrowed "
        "variants, uniform and random, timed whole at profile time; other draws than these cases), *measured* "
        "the compact model alone in ORT (the median of the medians of "
        f"{doc['args'].get('passes', 1)} passes over all models, {doc['args']['rounds']} samples in all). "
        "*MAC guess* is the dense model's measured latency times the MAC "
        "fraction, for comparison.",
        "",
        "*Relative*: the prediction as a fraction of the predicted dense latency, over the compact model's latency "
        "as a fraction of the dense model's, the two timed in the same rounds right after (median over the "
        "passes): immune to the "
        "machine's drift between the profile and the measurement (the other job on this machine changes its "
        "load by tens of percent within minutes).",
        "",
        "| model | batch | case | MACs kept | predicted ms | measured ms (IQR) | predicted / measured | relative | MAC guess / measured | load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        flag = "" if c["target"] == 1.0 or abs(c["ratio"] - 1) <= TOLERANCE else " *"
        lines.append(f"| {c['model']} | {c['batch']} | {c['case']} | {c['macs_fraction']:.1%} | "
                     f"{c['predicted_ms']:.3f} | {c['measured_ms']:.3f} ({c['measured_iqr_ms']:.3f}) | "
                     f"{c['ratio']:.3f}{flag} | {c['relative_ratio']:.3f} | {c['mac_guess_ratio']:.3f} | "
                     f"{c['load_before']:.1f} |")
    lines += ["", "`*`: outside the 10% target.", ""]
    if s["cases"]:
        lines.append(f"Pruned cases within 10%: **{s['within_10pct']} of {s['cases']}**; mean |ratio - 1| "
                     f"{s['mean_abs_error']:.1%} (the MAC-proportional guess: {s['mac_guess_mean_abs_error']:.1%}); "
                     f"worst ratio {s['worst_ratio']:.3f}. Relative to dense: {s['relative_within_10pct']} of "
                     f"{s['cases']} within 10%, mean |ratio - 1| {s['relative_mean_abs_error']:.1%}.")
    lines += ["", "Tables (profiled once, cached under benchmarks/out/latency/; one file per batch, both models' "
              "entries in it):", ""]
    for name, t in doc["tables"].items():
        lines.append(f"- {name}: {t['points']} grid points in the file, {t['measured_now']} measurements in this run "
                     f"(ops, and the whole models as one; {t['seconds']:.0f} s), `{t['path']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet20,resnet18")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--targets", default="0.7,0.5,0.3", help="MAC fractions the random prunings keep")
    ap.add_argument("--step", type=int, default=None, help="table grid step (default: the library's default)")
    ap.add_argument("--step-resnet18", type=int, default=32, help="the coarser grid step for resnet18")
    ap.add_argument("--rounds", type=int, default=30, help="timed samples per compact model, over all passes")
    ap.add_argument("--passes", type=int, default=3,
                    help="passes over all compact models per batch, each timing every one (default 3)")
    ap.add_argument("--profile-rounds", type=int, default=5, help="timed samples per table op")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-s", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-dir", type=Path, default=OUT / "latency")
    ap.add_argument("--no-aligned", action="store_true",
                    help="only the random prunings, not the random ones aligned to ORT's channel block")
    ap.add_argument("--quick", action="store_true", help="resnet20, batch 1, target 0.5, step 16, 5 rounds")
    ap.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                    help="ONNX Runtime provider of the table and the timings (cuda needs onnxruntime-gpu)")
    ap.add_argument("--name", default="latency_prediction",
                    help="results file stem under benchmarks/results (default latency_prediction)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder of the results (default benchmarks/results; benchmarks/out with --quick)")
    args = ap.parse_args(argv)
    if args.provider == "cuda":
        from sslcompress.runtime import probe_cuda

        try:
            probe_cuda()  # a missing GPU package is one line before any model is built
        except Exception as exc:
            raise SystemExit(f"error: {exc}") from None
        args.no_aligned = True  # no channel blocks on CUDA: an "aligned" pruning would be a random one again
    if args.quick:
        args.models, args.batch, args.targets, args.step, args.rounds, args.passes = "resnet20", "1", "0.5", 16, 6, 2
    args.models, args.batch, args.targets = csv(args.models), csv(args.batch, int), csv(args.targets, float)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cases: list[dict] = []
    tables: dict = {}
    for name in args.models:
        run_model(name, args, cases, tables)
    key = current_key(args.provider)
    doc = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": key.machine, "cpus": key.cpus, "onnxruntime": key.ort_version,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "args": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        "seconds": time.perf_counter() - t0,
        "summary": summary(cases), "cases": cases, "tables": tables,
    }
    folder = args.out if args.out is not None else (OUT if args.quick else RESULTS)
    stem = folder / ("latency_prediction_quick" if args.quick and args.out is None else args.name)
    atomic_write_json(doc, stem.with_suffix(".json"))
    atomic_write_bytes(render_markdown(doc).encode(), stem.with_suffix(".md"))
    log(f"wrote {stem}.json and .md ({doc['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
