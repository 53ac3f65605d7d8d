"""Surgery on ImageNet ResNets with block-internal channels zeroed: cost of the surgery, and what it buys in ORT.

Issue 3. For ResNet-18 and ResNet-50 (built-ins, torchvision layout, random init) a seeded random
50% or 75% of the *block-internal* channels are zeroed: the outputs of every conv inside a
residual block except the block's last one (whose output is added to the shortcut), i.e. conv1 in
a BasicBlock and conv1, conv2 in a Bottleneck. Zeroing a channel zeroes the conv's filter and the
following BN's gamma and beta, so after eval-mode BN folding the channel is exactly zero. All BN
running statistics get non-trivial values (running_var ~ U(0.5, 1.5), small running_mean, gamma
~ U(0.5, 1.5), small beta), so folding really changes the weights and the check is not trivial.

Per model and kept fraction:

    export_onnx(dynamic batch)                 in this process
    compress()                                 in a spawned child: time and peak memory
    ORT latency, uncut vs compact              in this process, interleaved round by round

Surgery: `report["seconds"]` of compress (surgery passes, and surgery + verification) and the wall
time of the whole compress() call, median over --surgery-repeats calls in one child. Peak memory:
the child loads the ONNX model, resets its resident-set high-water mark (Linux
/proc/self/clear_refs; falls back to the whole-process ru_maxrss), runs compress(), and reports the
peak RSS of the process during compress (imports and the loaded model included) and the increase
over the RSS just before the call. The compact model must pass verification, or the run aborts.

Latency: CPUExecutionProvider, ORT_ENABLE_ALL, intra-op threads 1 and 2, inter-op 1, and
`session.force_spinning_stop` = 1 (two sessions live in this process; spinning pools of idle
sessions slow each other down, see ../shared/reference/ort-cpu-facts.md), the workers of both
sessions and the calling thread pinned to the same CPUs (`sslcompress bench`'s placement: unpinned,
one session can keep its workers on a busier core for the whole run). Each round times one
block of back-to-back runs of each session, the order alternating from round to round; the block
length is set in the warm-up so that an uncut block lasts about --block-s. Reported: median
per-run latency of each, speed-up = uncut median / compact median, the median and a bootstrap 95%
interval of the per-round ratio, and efficiency = speed-up / MAC reduction (target >= 0.95).

Side by side (--against REV, default cde5295, the implementation before surgery v2): instead of the
latency run, REV is checked out into a temporary git worktree (removed at the end) and, on the same
exported files, its compress() and this tree's run in child processes (benchmarks/surgery_child.py,
PYTHONPATH = the tree, the same venv), alternately (old/new, then new/old) --sbs-repeats times, each
child calling compress() --sbs-calls times (the first call cold, the others warm). Per call: wall
time, report["seconds"], peak RSS and its increase over the RSS before the call (as above), and a
stage breakdown (exclusive seconds per timed function, RSS at the end of each stage). Both compact
models must pass verification and, with shape lowering off, have the same MACs. --sbs-lowering
(default off; 'default' = each side's own default: auto for the old code, predict for the new).
Each mode writes its own section of the results file and keeps the other's.

Usage (from the repository root):

    python benchmarks/surgery_resnet.py            # full run: resnet18+50, keep 0.5/0.25, batch 1/8, threads 1/2
    python benchmarks/surgery_resnet.py --quick    # smoke run: resnet18, keep 0.5, 112x112, batch 1, 1 thread
    python benchmarks/surgery_resnet.py --against --sbs-lowering off,default   # old vs new compress()
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rss import peak_kib, reset_peak, status_kib  # beside this script
from torch import nn

from sslcompress.bench import sessions as bench_sessions
from sslcompress.io import atomic_write_bytes, atomic_write_json
from sslcompress.models import ModelSpec, build_model
from sslcompress.models.imagenet import BasicBlock, Bottleneck
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx, save_onnx

REPO = Path(__file__).resolve().parents[1]
TARGET_SURGERY_S = 5.0  # ResNet-50, issue 3
TARGET_PEAK_MIB = 2048.0  # 2 GiB, issue 3
TARGET_EFFICIENCY = 0.95  # speed-up / MAC reduction, issue 3
TARGET_SBS_S = 2.5  # ResNet-50 compress() with one deserialization (surgery v2)
TARGET_SBS_PEAK_MIB = 1.2 * 1024  # 1.2 GiB, the same issue
RTOL_OF_MAX = 1e-4  # the library's verification criterion, reused for the parent's own check


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def csv(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------------------
# The sparse model


def block_internal_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """(name, conv, bn) of every block-internal conv: all convs of a block but its last one."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, BasicBlock):
            pairs.append((f"{name}.conv1", module.conv1, module.bn1))
        elif isinstance(module, Bottleneck):
            pairs.append((f"{name}.conv1", module.conv1, module.bn1))
            pairs.append((f"{name}.conv2", module.conv2, module.bn2))
    return pairs


def trunk_writers(model: nn.Module) -> list[list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]]:
    """The stem and every residual trunk, each as the (name, conv, bn) pairs that write its channels: the stem
    and the blocks' last convs up to the next projection shortcut, which starts the next trunk. A channel
    zeroed in every writer of its trunk is zero after each Add and ReLU, so every reader loses it too."""
    trunks = [[("conv1", model.conv1, model.bn1)]]
    for name, module in model.named_modules():
        if not isinstance(module, (BasicBlock, Bottleneck)):
            continue
        if module.downsample is not None:
            trunks.append([(f"{name}.downsample.0", module.downsample[0], module.downsample[1])])
        last = (module.conv3, module.bn3) if isinstance(module, Bottleneck) else (module.conv2, module.bn2)
        trunks[-1].append((f"{name}.{'conv3' if isinstance(module, Bottleneck) else 'conv2'}", *last))
    return trunks


@torch.no_grad()
def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Trained-looking BN statistics: with unit var and zero mean, folding would be a no-op."""
    for bn in model.modules():
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = bn.num_features
            bn.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            bn.weight.copy_(0.5 + torch.rand(n, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(n, generator=gen))


def kept_count(n: int, keep: float, align: int = 1) -> int:
    """How many of n channels a share `keep` keeps: rounded to a multiple of `align` (at least one multiple, at
    most n), as `--align` leaves widths for the runtime's channel blocks."""
    return min(n, max(align, align * round(n * keep / align)))


@torch.no_grad()
def zero_written_channels(groups, keep: float, gen: torch.Generator, align: int = 1) -> tuple[int, int]:
    """Zero a random (1 - keep) of each group's channels in every (name, conv, bn) of the group that writes them:
    the filters (and biases) and the BN gamma and beta, so the folded bias beta - gamma*mean/std is 0 too;
    (zeroed, total) channels."""
    zeroed = total = 0
    for writers in groups:
        n = writers[0][1].out_channels
        n_zero = n - kept_count(n, keep, align)
        idx = torch.randperm(n, generator=gen)[:n_zero]
        for _, conv, bn in writers:
            conv.weight[idx] = 0.0
            if conv.bias is not None:
                conv.bias[idx] = 0.0
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0
        zeroed += n_zero
        total += n
    return zeroed, total


def zero_channels(pairs, keep: float, gen: torch.Generator, align: int = 1) -> tuple[int, int]:
    """Zero a random (1 - keep) of each pair's filters and BN gamma/beta; (zeroed, total) channels."""
    return zero_written_channels([[pair] for pair in pairs], keep, gen, align)


SCOPES = ("blocks", "all")  # block-internal channels only, or the stem and residual trunks too


def sparse_resnet(name: str, keep: float, size: int, seed: int, scope: str = "blocks",
                  align: int = 1) -> tuple[nn.Module, dict]:
    """The ResNet with a random (1 - keep) of its block-internal channels zeroed, and with scope "all" the same
    share of the stem's and of every residual trunk's channels (what filter- and channel-wise SSL zeroes across
    the whole network), the kept widths multiples of `align`; (model, what was zeroed)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    torch.manual_seed(seed)
    model = build_model(ModelSpec(name, num_classes=1000, in_channels=3, input_size=(size, size)))
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(model, gen)
    pairs = block_internal_pairs(model)
    zeroed, total = zero_channels(pairs, keep, gen, align)
    zeroing = {"scope": scope, "align": align, "block_internal_convs": len(pairs), "channels_zeroed": zeroed,
               "channels_total": total}
    if scope == "all":
        trunks = trunk_writers(model)
        t_zeroed, t_total = zero_written_channels(trunks, keep, gen, align)
        zeroing.update(trunks=len(trunks), trunk_channels_zeroed=t_zeroed, trunk_channels_total=t_total)
    model.eval()
    return model, zeroing


# ---------------------------------------------------------------------------------------------
# Surgery in a child process, for an honest peak-memory figure


def _surgery_child(src: str, dst: str, result_path: str, repeats: int) -> None:
    """Runs in a spawned process: load, compress `repeats` times, write the compact model and a JSON."""
    torch.set_num_threads(1)
    proto = onnx.load(src)
    baseline_kib = status_kib("VmRSS") or 0
    reset_ok = reset_peak()
    runs = []
    res = None
    for _ in range(repeats):
        del res  # free the previous result first: two compact models alive would inflate the peak
        t0 = time.perf_counter()
        res = compress(proto)
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, **{f"{k}_s": v for k, v in res.report["seconds"].items()}})
    peak = peak_kib(reset_ok)
    save_onnx(res.model, dst)
    report = {k: v for k, v in res.report.items() if k != "layers"}
    atomic_write_json({
        "runs": runs, "report": report, "verification_passed": bool(res.verification.passed),
        "peak_rss_mib": peak / 1024, "baseline_rss_mib": baseline_kib / 1024,
        "increase_mib": (peak - baseline_kib) / 1024,
        "peak_method": "VmHWM after clear_refs reset" if reset_ok else "ru_maxrss of the whole child",
    }, result_path)


def run_surgery(src: Path, dst: Path, workdir: Path, repeats: int) -> dict:
    import json

    result_path = workdir / "surgery_result.json"
    result_path.unlink(missing_ok=True)
    # spawn, not fork: a forked child would inherit this process's memory (torch model, exports)
    proc = mp.get_context("spawn").Process(target=_surgery_child, args=(str(src), str(dst), str(result_path), repeats))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not result_path.is_file():
        raise SystemExit(f"error: the surgery child failed (exit code {proc.exitcode}); see its traceback above")
    out = json.loads(result_path.read_text())
    runs = out["runs"]
    out["median"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return out


# ---------------------------------------------------------------------------------------------
# Latency in ORT


def make_session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    # The bench's own sessions: ORT_ENABLE_ALL, inter-op 1, force_spinning_stop (two sessions share this
    # process) and the workers pinned to the same CPUs for both models (see sslcompress.bench.sessions).
    return bench_sessions.make_session(model_bytes, "cpu", threads, pin=True)


def _block(sess: ort.InferenceSession, feed: dict, reps: int) -> float:
    """Seconds per run, over `reps` back-to-back runs."""
    t0 = time.perf_counter()
    for _ in range(reps):
        sess.run(None, feed)
    return (time.perf_counter() - t0) / reps


def check_same_outputs(uncut: ort.InferenceSession, compact: ort.InferenceSession, feed: dict) -> float:
    """The model we time is the model that was verified: same outputs, by the library's criterion."""
    a = uncut.run(None, feed)[0].astype(np.float64)
    b = compact.run(None, feed)[0].astype(np.float64)
    rel = float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
    if not rel <= RTOL_OF_MAX:
        raise SystemExit(f"error: the compact model's outputs differ from the uncut model's (rel {rel:.3g})")
    return rel


def bootstrap_median_ci(values: list[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median."""
    rng = np.random.default_rng(seed)
    arr = np.asarray(values)
    meds = np.median(rng.choice(arr, size=(n, arr.size), replace=True), axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(lo), float(hi)


def time_pair(uncut_bytes: bytes, compact_bytes: bytes, batch: int, size: int, threads: int,
              rounds: int, warmup: int, block_s: float, seed: int) -> dict:
    uncut, compact = make_session(uncut_bytes, threads), make_session(compact_bytes, threads)
    where = bench_sessions.placement(threads)
    with bench_sessions.calling_thread_on(where[0] if where else None):
        return _time_pair(uncut, compact, batch, size, threads, rounds, warmup, block_s, seed)


def _time_pair(uncut, compact, batch: int, size: int, threads: int, rounds: int, warmup: int, block_s: float,
               seed: int) -> dict:
    name = uncut.get_inputs()[0].name
    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)
    feed = {name: x}
    rel = check_same_outputs(uncut, compact, feed)
    # Warm-up rounds (first runs allocate and pick kernels); the last one sets the block length.
    t_uncut = 0.0
    for _ in range(max(1, warmup)):
        t_uncut = _block(uncut, feed, 1)
        _block(compact, feed, 1)
    reps = max(1, round(block_s / t_uncut))
    times_u, times_c = [], []
    for r in range(rounds):
        if r % 2 == 0:  # alternate which goes first: a drift in load hits both sides alike
            tu = _block(uncut, feed, reps)
            tc = _block(compact, feed, reps)
        else:
            tc = _block(compact, feed, reps)
            tu = _block(uncut, feed, reps)
        times_u.append(tu)
        times_c.append(tc)
    ratios = [u / c for u, c in zip(times_u, times_c)]
    med_u, med_c = statistics.median(times_u), statistics.median(times_c)
    lo, hi = bootstrap_median_ci(ratios, seed)
    return {
        "batch": batch, "threads": threads, "rounds": rounds, "warmup_rounds": warmup, "runs_per_block": reps,
        "uncut_ms": 1e3 * med_u, "compact_ms": 1e3 * med_c, "speedup": med_u / med_c,
        "round_ratio_median": statistics.median(ratios), "round_ratio_ci95": [lo, hi],
        "round_ratio_min_max": [min(ratios), max(ratios)],
        "uncut_ms_rounds": [1e3 * t for t in times_u], "compact_ms_rounds": [1e3 * t for t in times_c],
        "output_rel_diff": rel,
    }


# ---------------------------------------------------------------------------------------------
# One model at one kept fraction


def export_case(name: str, keep: float, args, src: Path) -> tuple[dict, float]:
    """The sparse model exported to `src`: (zeroing counts, export seconds)."""
    model, zeroing = sparse_resnet(name, keep, args.size, args.seed)
    log(f"{name} keep {keep:g}: zeroed {zeroing['channels_zeroed']}/{zeroing['channels_total']} block-internal "
        f"channels in {zeroing['block_internal_convs']} convs; exporting at {args.size}x{args.size}")
    t0 = time.perf_counter()
    exported = export_onnx(model, (1, 3, args.size, args.size), dynamic_batch=True)
    export_s = time.perf_counter() - t0
    del model
    if not exported.bn_folded:
        raise SystemExit(f"error: {exported.bn_remaining} BatchNormalization nodes survived the export of {name}")
    save_onnx(exported.model, src)
    return zeroing, export_s


def bench_case(name: str, keep: float, args, workdir: Path) -> dict:
    t_case = time.perf_counter()
    src, dst = workdir / f"{name}_uncut.onnx", workdir / f"{name}_compact.onnx"
    zeroing, export_s = export_case(name, keep, args, src)
    uncut_bytes = src.read_bytes()

    log(f"{name} keep {keep:g}: export {export_s:.1f} s; compress() x{args.surgery_repeats} in a spawned child")
    surgery = run_surgery(src, dst, workdir, args.surgery_repeats)
    if not surgery["verification_passed"]:
        v = surgery["report"]["verification"]
        raise SystemExit(f"error: VERIFICATION FAILED for {name} keep {keep:g}: max abs {v['max_abs']:.3g}, "
                         f"rel {v['rel']:.3g}; the compact model does not compute what the uncut one does"
                         + (f"; first diverging node: {v['first_diverging_node']}" if v.get("first_diverging_node") else ""))
    totals = surgery["report"]["totals"]
    reduction = totals["macs"] / totals["macs_after"]
    med = surgery["median"]
    log(f"{name} keep {keep:g}: MACs {totals['macs'] / 1e9:.3f} G -> {totals['macs_after'] / 1e9:.3f} G "
        f"({reduction:.2f}x); surgery {med['surgery_s']:.2f} s, compress() {med['wall_s']:.2f} s, "
        f"peak RSS {surgery['peak_rss_mib']:.0f} MiB (+{surgery['increase_mib']:.0f}); verification passed "
        f"(rel {surgery['report']['verification']['rel']:.2e})")

    compact_bytes = dst.read_bytes()
    latency = []
    for batch in args.batch:
        for threads in args.threads:
            t0 = time.perf_counter()
            row = time_pair(uncut_bytes, compact_bytes, batch, args.size, threads, args.rounds, args.warmup,
                            args.block_s, args.seed)
            row["efficiency"] = row["speedup"] / reduction
            row["wall_s"] = time.perf_counter() - t0
            latency.append(row)
            log(f"{name} keep {keep:g} batch {batch} threads {threads}: uncut {row['uncut_ms']:.2f} ms, compact "
                f"{row['compact_ms']:.2f} ms, speed-up {row['speedup']:.2f}x (round ratios "
                f"{row['round_ratio_ci95'][0]:.2f}..{row['round_ratio_ci95'][1]:.2f}), efficiency "
                f"{row['efficiency']:.3f} ({row['wall_s']:.0f} s)")
    return {
        "model": name, "keep": keep, "input": [3, args.size, args.size], "seed": args.seed, **zeroing,
        "export_s": export_s, "macs": totals["macs"], "macs_after": totals["macs_after"], "mac_reduction": reduction,
        "params": totals["params"], "params_after": totals["params_after"], "surgery": surgery,
        "latency": latency, "wall_s": time.perf_counter() - t_case,
    }


# ---------------------------------------------------------------------------------------------
# Side by side: compress() of another revision (a git worktree) against this tree's, same files


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def add_worktree(rev: str) -> tuple[Path, str]:
    """REV checked out (detached) in a temporary git worktree: (its path, the full commit)."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = Path(tempfile.mkdtemp(prefix=f"surgery_resnet_{commit[:7]}_"))
    path.rmdir()  # git worktree add wants to create it
    git("worktree", "add", "--detach", str(path), commit)
    return path, commit


def remove_worktree(path: Path) -> None:
    try:
        git("worktree", "remove", "--force", str(path))
    except subprocess.CalledProcessError as exc:
        log(f"warning: could not remove the worktree {path}: {exc.stderr.strip()}")


def run_child(src: Path, root: Path, lowering: str | None, calls: int, result: Path, save: Path | None = None) -> dict:
    """One compress() child (benchmarks/surgery_child.py) with PYTHONPATH = root, the same venv."""
    import json

    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "surgery_child.py"), str(src), str(result), "--root", str(root),
           "--calls", str(calls)]
    if lowering is not None:
        cmd += ["--lowering", lowering]
    if save is not None:
        cmd += ["--save", str(save)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    load = list(os.getloadavg())
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=result.parent, capture_output=True, text=True)
    if proc.returncode != 0 or not result.is_file():
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"error: the compress() child for {root} failed (exit code {proc.returncode})")
    out = json.loads(result.read_text())
    out["load_before"] = load
    out["child_wall_s"] = time.perf_counter() - t0
    return out


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# Stage labels (surgery_child.py) gathered into the parts of a compress() call, old and new alike.
STAGE_GROUPS = [
    ("channel passes (zero branches, fold, prune, features, kernels)",
     ("pass: zero residual branches", "pass: constant channel folding", "pass: dead channel pruning",
      "pass: feature selection", "pass: kernel shrinking", "remove_zero_branches", "fold_constant_channels",
      "prune_dead_channels", "select_features", "shrink_kernels")),
    ("prepare passes (constants to initializers, constant folding, ...)",
     ("pass: InitializerInputsPass", "pass: RemoveInitializersFromInputsPass",
      "pass: LiftConstantsToInitializersPass", "pass: StaticDimsPass", "pass: FoldConstantsPass",
      "pass: IdentityEliminationPass", "pass: RemoveUnusedNodesPass", "pass: RuleShapesPass", "pass: PassManager")),
    ("shape inference", ("onnx.infer_shapes", "pass: ShapeInferencePass", "pass: InferShapesPass", "_with_shapes")),
    ("onnx_ir deserialize + serialize", ("onnx_ir.deserialize_model", "onnx_ir.serialize_model")),
    ("shape lowering", ("lower_sparse_columns_ir", "lower_sparse_columns")),
    ("checker (full, after the passes)", ("onnx.check_model", "finish")),
    ("MACs and parameters (report)", ("layers_of", "parameters_of", "layers", "parameters", "build_report")),
    ("verification inputs", ("check_verifiable", "as_feeds", "random_batches")),
    ("verification: model to bytes, feeds, comparison", ("compare", "first_diverging_node")),
    ("verification: ORT sessions (2)", ("ORT session",)),
    ("verification: ORT runs", ("ORT run",)),
]


def stage_groups(call: dict) -> dict[str, float]:
    """A call's exclusive stage seconds by part; what no timed stage covers is compress()'s own body."""
    out = {name: 0.0 for name, _ in STAGE_GROUPS}
    where = {label: name for name, labels in STAGE_GROUPS for label in labels}
    for label, st in call["stages"].items():
        name = where.get(label, "other timed stages")
        out[name] = out.get(name, 0.0) + st["s"]
    out["compress() body (model sizes, report)"] = call["wall_s"] - sum(st["s"] for st in call["stages"].values())
    return out


def peak_stage(call: dict) -> str | None:
    """The top-level stage at whose end the call's high-water mark first showed its final value."""
    line = call.get("timeline") or []
    if not line:
        return None
    top = max(e["hwm_mib"] for e in line)
    return next((e["stage"] for e in line if e["hwm_mib"] >= top - 0.5), None)


def summarize_side(children: list[dict]) -> dict:
    """Figures of one side over its children: the first call of each child is cold, the others warm."""
    first = [c["calls"][0] for c in children]
    warm = [k for c in children for k in c["calls"][1:]] or first
    every = [k for c in children for k in c["calls"]]
    return {
        "wall_s": _spread([k["wall_s"] for k in warm]),
        "wall_s_cold": _spread([k["wall_s"] for k in first]),
        "surgery_s": _spread([k["seconds"]["surgery"] for k in warm]),
        "verification_s": _spread([k["seconds"]["total"] - k["seconds"]["surgery"] for k in warm]),
        "peak_rss_mib": _spread([k["peak_rss_mib"] for k in every]),
        "peak_rss_mib_cold": _spread([k["peak_rss_mib"] for k in first]),
        "increase_mib": _spread([k["increase_mib"] for k in every]),
        "increase_mib_cold": _spread([k["increase_mib"] for k in first]),
        "baseline_rss_mib_cold": _spread([k["baseline_rss_mib"] for k in first]),
        "passed": all(k["passed"] for k in every), "rel_max": max(k["rel"] for k in every),
        "macs": sorted({k["macs"] for k in every}), "macs_after": sorted({k["macs_after"] for k in every}),
        "shape_lowering": sorted({str(k["shape_lowering"]) for k in every}),
        "stage_groups_s": {g: statistics.median(stage_groups(k)[g] for k in warm) for g in stage_groups(warm[0])},
        "stages_s": {label: {"s": statistics.median(k["stages"].get(label, {"s": 0.0})["s"] for k in warm),
                             "n": warm[0]["stages"][label]["n"]}
                     for label in warm[0]["stages"]},
        "peak_stage": peak_stage(warm[0]), "timeline_warm": warm[0].get("timeline"),
        "sslcompress": children[0]["sslcompress"],
    }


def side_by_side(args, workdir: Path) -> Iterator[dict]:
    """Old (REV in a worktree) and new (this tree) compress() on the same files, alternately."""
    rev_path, commit = add_worktree(args.against)
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "sslcompress"))
    log(f"side by side: {args.against} ({commit[:10]}) in {rev_path} against this tree ({head[:10]}"
        f"{', with uncommitted changes under sslcompress/' if dirty else ''})")
    sides = {"old": rev_path, "new": REPO}
    doc = {"date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
           "against": args.against, "old_commit": commit, "new_commit": head, "new_uncommitted": dirty,
           "load_average_start": list(os.getloadavg()),
           "settings": {"models": args.models, "keep": args.keep, "size": args.size, "seed": args.seed,
                        "repeats": args.sbs_repeats, "calls_per_child": args.sbs_calls,
                        "lowering": args.sbs_lowering},
           "targets": {"wall_s_resnet50": TARGET_SBS_S, "peak_rss_mib_resnet50": TARGET_SBS_PEAK_MIB},
           "cases": [], "verdicts": [], "complete": False}
    try:
        for name in args.models:
            for keep in args.keep:
                src = workdir / f"{name}_{keep:g}_uncut.onnx"
                zeroing, _ = export_case(name, keep, args, src)
                for lowering in args.sbs_lowering:
                    kw = None if lowering == "default" else lowering
                    children = {"old": [], "new": []}
                    for r in range(args.sbs_repeats):
                        # old/new, then new/old: a drift in the machine's load hits both sides alike
                        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                            res = run_child(src, sides[side], kw, args.sbs_calls, workdir / f"child_{side}.json")
                            children[side].append(res)
                            c = res["calls"]
                            log(f"{name} keep {keep:g} lowering {lowering} {side} #{r + 1}: "
                                + ", ".join(f"{k['wall_s']:.2f} s (passes {k['seconds']['surgery']:.2f}) "
                                            f"peak {k['peak_rss_mib']:.0f} MiB (+{k['increase_mib']:.0f})" for k in c)
                                + f"; load {res['load_before'][0]:.2f}")
                    case = {"model": name, "keep": keep, "lowering": lowering, **zeroing,
                            "old": summarize_side(children["old"]), "new": summarize_side(children["new"])}
                    slim_case(case, children)  # the summaries keep the stage medians; the JSON stays small
                    case["children"] = children
                    o, n = case["old"], case["new"]
                    if not (o["passed"] and n["passed"]):
                        raise SystemExit(f"error: VERIFICATION FAILED for {name} keep {keep:g} lowering {lowering} "
                                         f"(old passed: {o['passed']}, new passed: {n['passed']})")
                    case["same_macs"] = o["macs"] == n["macs"] and o["macs_after"] == n["macs_after"]
                    if lowering == "off" and not case["same_macs"]:
                        raise SystemExit(f"error: {name} keep {keep:g}: old and new compact models differ in MACs "
                                         f"({o['macs_after']} vs {n['macs_after']})")
                    doc["cases"].append(case)
                    doc["verdicts"] = sbs_verdicts(doc["cases"])
                    doc["load_average_end"] = list(os.getloadavg())
                    yield doc  # partial results survive a later failure
                src.unlink(missing_ok=True)
    finally:
        remove_worktree(rev_path)
    doc["complete"] = True
    doc["load_average_end"] = list(os.getloadavg())
    yield doc


def slim_case(case: dict, children: dict) -> None:
    """Per call only the figures (stages and timelines are in the sides' summaries, timelines for ResNet-50)."""
    for kids in children.values():
        for kid in kids:
            for k in kid["calls"]:
                k.pop("timeline", None)
                k.pop("stages", None)
                k.pop("stage_groups_s", None)
    if case["model"] != "resnet50":
        for side in ("old", "new"):
            case[side].pop("timeline_warm", None)


def sbs_verdicts(cases: list[dict]) -> list[str]:
    lines = []
    for c in cases:
        if c["model"] != "resnet50":
            continue
        n, o = c["new"], c["old"]
        t, p = n["wall_s"]["median"], n["peak_rss_mib"]["max"]
        tag = f"resnet50 keep {c['keep']:g} lowering {c['lowering']}"
        lines.append(f"{tag}: new compress() {t:.2f} s median (old {o['wall_s']['median']:.2f} s), target <= "
                     f"{TARGET_SBS_S:g} s: {'met' if t <= TARGET_SBS_S else 'MISSED'}")
        lines.append(f"{tag}: new peak RSS {p:.0f} MiB at most (old {o['peak_rss_mib']['max']:.0f} MiB), target <= "
                     f"{TARGET_SBS_PEAK_MIB:.0f} MiB: {'met' if p <= TARGET_SBS_PEAK_MIB else 'MISSED'}")
    return lines


def _rng(x: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(x['median'])} ({fmt.format(x['min'])}-{fmt.format(x['max'])})"


def render_sbs(doc: dict) -> list[str]:
    m = doc["machine"]
    st = doc["settings"]
    lines = [
        f"## Side by side: this tree's surgery against {doc['against']}", "",
        f"Generated by `{doc['command']}` on {doc['date_utc']}"
        + ("" if doc.get("complete") else " (**incomplete**: the run has not finished, or failed)") + ".", "",
        f"Old = `compress()` at {doc['against']} ({doc['old_commit'][:10]}, checked out in a git worktree"
        f"{'; the implementation before surgery v2, one (de)serialization per pass' if doc['old_commit'].startswith('cde5295') else ''}"
        f"); new = this tree ({doc['new_commit'][:10]}"
        f"{', with uncommitted changes under sslcompress/' if doc['new_uncommitted'] else ''}). Both with `shape_lowering=\"off\"` unless the lowering column says `default` (each "
        "side's own default: `auto`, timed in ORT, before surgery v2; `predict` since). Same ONNX files (exported once per case), "
        f"same venv; {st['repeats']} child processes per side, run alternately (old/new, then new/old), "
        f"{st['calls_per_child']} compress() calls per child.", "",
        "| model | kept | lowering | side | compress() s, warm: median (range) | first call in the process s "
        "| passes s | verification s | peak RSS MiB: median (range) | increase MiB | MACs after (G) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["cases"]:
        for side in ("old", "new"):
            s = c[side]
            lines.append(
                f"| {c['model']} | {c['keep']:.0%} | {c['lowering']} | {side} | {_rng(s['wall_s'])} | "
                f"{_rng(s['wall_s_cold'])} | {s['surgery_s']['median']:.2f} | {s['verification_s']['median']:.2f} | "
                f"{_rng(s['peak_rss_mib'], '{:.0f}')} | {_rng(s['increase_mib'], '{:.0f}')} | "
                f"{', '.join(f'{x / 1e9:.3f}' for x in s['macs_after'])} |")
    lines += ["", *[f"- {v}" for v in doc["verdicts"]], "",
              "compress() s = wall time of the whole call (passes, checker, verification in ORT, report); warm = every "
              "call after a child's first (lazy imports and ORT's first session fall in the first, shown apart). "
              "Passes = the call's own report['seconds']['surgery']; verification = total - surgery. Peak RSS = the "
              "child's resident-set high-water mark during the call (VmHWM, reset through /proc/self/clear_refs just "
              "before it; the whole process: Python, torch, ORT, the loaded ModelProto), over all calls; increase = "
              "peak - RSS just before the call. Every compact model passed verification; with lowering off, old and "
              "new give the same MACs.", ""]
    big = [c for c in doc["cases"] if c["model"] == "resnet50"] or doc["cases"]
    if big:
        c = big[0]
        groups = list(dict.fromkeys([*c["new"]["stage_groups_s"], *c["old"]["stage_groups_s"]]))
        lines += [f"### Where a warm call's time goes: {c['model']}, {c['keep']:.0%} kept, lowering {c['lowering']}", "",
                  "Exclusive seconds per stage (median over the warm calls), timed in the children "
                  "(benchmarks/surgery_child.py).", "",
                  "| part | old s | new s |", "|---|---|---|"]
        for g in groups:
            lines.append(f"| {g} | {c['old']['stage_groups_s'].get(g, 0.0):.3f} | {c['new']['stage_groups_s'].get(g, 0.0):.3f} |")
        lines.append(f"| **whole call** | **{c['old']['wall_s']['median']:.3f}** | **{c['new']['wall_s']['median']:.3f}** |")
        lines += ["", "New, stage by stage (count = calls per compress()):", "", "| stage | count | s |", "|---|---|---|"]
        for label, v in sorted(c["new"]["stages_s"].items(), key=lambda kv: -kv[1]["s"]):
            if v["s"] >= 0.001:
                lines.append(f"| {label} | {v['n']} | {v['s']:.3f} |")
        lines += ["", f"Peak memory: the high-water mark is reached at the end of `{c['new']['peak_stage']}` (new) and "
                  f"`{c['old']['peak_stage']}` (old)."]
        tl = c["new"].get("timeline_warm") or []
        marks = [e for e in tl if e["stage"] in ("onnx_ir.deserialize_model", "onnx.check_model", "ORT session",
                                                  "compare", "build_report")]
        if marks:
            lines.append("New, RSS at the end of: " + ", ".join(
                f"{e['stage']} {e['rss_mib']:.0f} MiB" for e in marks) + ".")
        lines.append("")
    lines += [f"Machine: {m['cpu']}, nproc {m['nproc']}, ORT {m['onnxruntime']}, onnx {m['onnx']}, torch {m['torch']}, "
              f"{m['platform']}. Load average (1, 5, 15 min) at start "
              f"{', '.join(f'{x:.2f}' for x in doc['load_average_start'])}, at end "
              f"{', '.join(f'{x:.2f}' for x in doc.get('load_average_end', doc['load_average_start']))}; the 1-minute "
              f"load before each child is in the JSON (children[*].load_before). The machine has 2 cores shared "
              "with other work: compare old and new within this table, not with figures taken at another time.", ""]
    return lines


# ---------------------------------------------------------------------------------------------
# Verdicts and output


def verdicts(cases: list[dict]) -> list[str]:
    lines = []
    for c in cases:
        tag = f"{c['model']} keep {c['keep']:g}"
        s = c["surgery"]
        if c["model"] == "resnet50":
            t = s["median"]["wall_s"]
            lines.append(f"{tag}: compress() {t:.2f} s (surgery passes {s['median']['surgery_s']:.2f} s), "
                         f"target < {TARGET_SURGERY_S:g} s: {'met' if t < TARGET_SURGERY_S else 'MISSED'}")
        p = s["peak_rss_mib"]
        lines.append(f"{tag}: peak RSS {p:.0f} MiB, target < {TARGET_PEAK_MIB:.0f} MiB: "
                     f"{'met' if p < TARGET_PEAK_MIB else 'MISSED'}")
        for r in c["latency"]:
            e = r["efficiency"]
            lines.append(f"{tag} batch {r['batch']} threads {r['threads']}: efficiency {e:.3f}, target >= "
                         f"{TARGET_EFFICIENCY}: {'met' if e >= TARGET_EFFICIENCY else 'MISSED'}")
    return lines


def render_table(cases: list[dict]) -> str:
    lines = ["| model | kept | MACs before (G) | MACs after (G) | MAC reduction | surgery s (compress() s) "
             "| peak MiB (increase) | batch | threads | uncut ms | compact ms | speed-up (round-ratio 95% CI) "
             "| efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        s = c["surgery"]
        head = (f"| {c['model']} | {c['keep']:.0%} | {c['macs'] / 1e9:.3f} | {c['macs_after'] / 1e9:.3f} | "
                f"{c['mac_reduction']:.2f}x | {s['median']['surgery_s']:.2f} ({s['median']['wall_s']:.2f}) | "
                f"{s['peak_rss_mib']:.0f} (+{s['increase_mib']:.0f}) |")
        for r in c["latency"]:
            lo, hi = r["round_ratio_ci95"]
            lines.append(f"{head} {r['batch']} | {r['threads']} | {r['uncut_ms']:.2f} | {r['compact_ms']:.2f} | "
                         f"{r['speedup']:.2f}x ({lo:.2f}..{hi:.2f}) | {r['efficiency']:.3f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    from sslcompress.runtime.cpu import cpu_model

    return cpu_model()


def machine_info() -> dict:
    cpu = cpu_name()
    return {"nproc": os.cpu_count(), "cpu": cpu, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def render_latency(doc: dict) -> list[str]:
    m = doc["machine"]
    partial = [] if doc["complete"] else ["**Incomplete: the run has not finished (or failed).**", ""]
    commit = f" (this tree at {doc['commit'][:10]})" if doc.get("commit") else ""
    return [
        "## Surgery cost and ORT speed-up", "",
        f"Generated by `{doc['command']}` on {doc['date_utc']}{commit}, with the surgery of that day.", "",
        *partial,
        render_table(doc["cases"]), "",
        *[f"- {v}" for v in doc["verdicts"]], "",
        "Kept = fraction of block-internal channels kept (BasicBlock conv1; Bottleneck conv1 and conv2). MACs "
        "count every Conv/Gemm of the exported graph (stem, downsample and fc included), per image. "
        "'surgery s' = compress()'s own report['seconds']['surgery'] (the passes); 'compress() s' = wall time of the "
        "whole call, verification in ORT included; medians over the repeats of one spawned child. "
        "Peak MiB = resident-set high-water mark of that child during compress() (Python, torch, ORT and the loaded "
        "model included); increase = peak - RSS just before the call. Latency: ORT CPU EP, ORT_ENABLE_ALL, "
        "inter-op 1, force_spinning_stop 1, threads pinned alike for both models; median per-run time over rounds, uncut and compact timed side by side "
        "in alternating order. Speed-up = uncut median / compact median; the interval is a bootstrap 95% "
        "interval of the median per-round ratio. Efficiency = speed-up / MAC reduction.", "",
        f"Settings: input {doc['settings']['size']}x{doc['settings']['size']}, seed {doc['settings']['seed']}, "
        f"{doc['settings']['rounds']} rounds (+{doc['settings']['warmup']} warm-up), uncut block about "
        f"{doc['settings']['block_s']} s, {doc['settings']['surgery_repeats']} compress() call(s) per case.", "",
        f"Machine: {m['cpu']}, nproc {m['nproc']}, ORT {m['onnxruntime']}, onnx {m['onnx']}, torch {m['torch']} "
        f"({m['torch_threads']} thread), {m['platform']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in doc['load_average_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in doc['load_average_end'])}. Wall time {doc['wall_time_s']:.0f} s.", "",
    ]


def render_md(doc: dict) -> str:
    """The side-by-side section (--against) and the latency run, each with its own command and date."""
    quick = " (QUICK check, not a result)" if doc.get("quick") else ""
    lines = [f"# Surgery on ResNets with block-internal channels zeroed{quick}", ""]
    if doc.get("side_by_side"):
        lines += render_sbs(doc["side_by_side"])
    if doc.get("cases"):
        lines += render_latency(doc)
    return "\n".join(lines)


def write_results(doc: dict, res_dir: Path, stem: str, *, end_load: bool = True) -> None:
    if end_load:
        doc["load_average_end"] = list(os.getloadavg())
    atomic_write_json(doc, res_dir / f"{stem}.json")
    atomic_write_bytes(render_md(doc).encode(), res_dir / f"{stem}.md")


def read_results(res_dir: Path, stem: str) -> dict:
    """The results file as it is (a run of one mode keeps the other mode's section), or {}."""
    import json

    path = res_dir / f"{stem}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet50", help="comma list of resnet18, resnet50")
    ap.add_argument("--keep", default="0.5,0.25", help="fractions of block-internal channels kept (comma list)")
    ap.add_argument("--batch", default="1,8", help="batch sizes timed (comma list)")
    ap.add_argument("--threads", default="1,2", help="ORT intra-op thread counts (comma list)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per (batch, threads)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up rounds (one run of each session)")
    ap.add_argument("--block-s", type=float, default=0.2,
                    help="target length of an uncut block of back-to-back runs in a round (at least one run)")
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--surgery-repeats", type=int, default=3, help="compress() calls per case (median time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: resnet18, keep 0.5, 112x112, batch 1, 1 thread, 5 rounds; results to benchmarks/out")
    ap.add_argument("--out", default=None,
                    help="where the .json/.md go (default benchmarks/results; benchmarks/out with --quick)")
    ap.add_argument("--against", nargs="?", const="cde5295", default=None, metavar="REV",
                    help="side by side instead of latency: compress() at REV (a temporary git worktree; default "
                         "cde5295, the implementation before surgery v2) against this tree's, on the same files")
    ap.add_argument("--sbs-repeats", type=int, default=3, help="--against: child processes per side (alternating)")
    ap.add_argument("--sbs-calls", type=int, default=2,
                    help="--against: compress() calls per child (the first is cold, the rest warm)")
    ap.add_argument("--sbs-lowering", default="off",
                    help="--against: shape_lowering values to compare (comma list; 'default' = each side's own)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.keep, args.batch, args.threads = "resnet18", "0.5", "1", "1"
        args.rounds, args.warmup, args.size, args.surgery_repeats = min(args.rounds, 5), 1, 112, 1
        args.sbs_repeats = 1
    args.sbs_lowering = csv(args.sbs_lowering)
    if args.sbs_repeats < 1 or args.sbs_calls < 1:
        ap.error("--sbs-repeats and --sbs-calls must be at least 1")
    args.models = csv(args.models)
    args.keep, args.batch, args.threads = csv(args.keep, float), csv(args.batch, int), csv(args.threads, int)
    unknown = [m for m in args.models if m not in ("resnet18", "resnet50")]
    if unknown:
        ap.error(f"unknown model(s) {unknown}: this benchmark knows resnet18 and resnet50")
    if not all(0 < k <= 1 for k in args.keep):
        ap.error("--keep fractions must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # torch only builds and exports here; keep it off the cores ORT is timed on
    res_dir = Path(args.out or REPO / "benchmarks" / ("out" if args.quick else "results"))
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = "surgery_resnet_quick" if args.quick else "surgery_resnet"
    previous = read_results(res_dir, stem)
    if args.against:
        doc = previous if previous.get("benchmark") == "surgery_resnet" else {"benchmark": "surgery_resnet"}
        doc["quick"] = args.quick
        with tempfile.TemporaryDirectory(prefix="surgery_resnet_") as tmp:
            for sbs in side_by_side(args, Path(tmp)):
                doc["side_by_side"] = sbs
                write_results(doc, res_dir, stem, end_load=False)
        print("\n".join(render_sbs(doc["side_by_side"])))
        log(f"wrote {res_dir / stem}.json and .md")
        return 0
    t_all = time.perf_counter()
    doc = {"benchmark": "surgery_resnet", "quick": args.quick, "complete": False,
           "commit": git("rev-parse", "HEAD"), "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
           "load_average_start": list(os.getloadavg()),
           "settings": {k: getattr(args, k) for k in ("models", "keep", "batch", "threads", "rounds", "warmup",
                                                       "block_s", "size", "surgery_repeats", "seed")},
           "targets": {"surgery_s_resnet50": TARGET_SURGERY_S, "peak_rss_mib": TARGET_PEAK_MIB,
                       "efficiency": TARGET_EFFICIENCY},
           "peak_memory_note": "peak_rss_mib: RSS high-water mark of the spawned child during compress() "
                               "(process baseline included); increase_mib: peak minus RSS just before the call",
           "cases": [], "verdicts": [], "wall_time_s": 0.0}
    if previous.get("side_by_side"):
        doc["side_by_side"] = previous["side_by_side"]  # the --against run's section stays
    log(f"ORT {ort.__version__}, nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; "
        f"{len(args.models) * len(args.keep)} case(s) x {len(args.batch) * len(args.threads)} timings")
    with tempfile.TemporaryDirectory(prefix="surgery_resnet_") as tmp:
        for name in args.models:
            for keep in args.keep:
                doc["cases"].append(bench_case(name, keep, args, Path(tmp)))
                doc["verdicts"] = verdicts(doc["cases"])
                doc["wall_time_s"] = time.perf_counter() - t_all
                write_results(doc, res_dir, stem)  # partial results survive a later failure
    doc["complete"] = True
    doc["wall_time_s"] = time.perf_counter() - t_all
    write_results(doc, res_dir, stem)
    print(render_table(doc["cases"]))
    print()
    print("\n".join(doc["verdicts"]))
    log(f"done in {doc['wall_time_s']:.0f} s; wrote {res_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
