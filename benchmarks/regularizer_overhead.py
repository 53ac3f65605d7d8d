"""Training-step overhead of the group-Lasso regulariser against plain training, side by side.

Variants (each its own copy of the same initial model, its own optimizer):

    plain         forward, cross-entropy, backward, SGD step
    prox_fc       plain + GroupLasso.proximal_step(lr, lambdas) over filter+channel groups
    prox_all      plain + proximal_step over filter, channel, shape, kernel_row, kernel_col groups
    subgrad_fc    loss + GroupLasso.penalty(lambdas) (filter+channel) backward, SGD step, then the
                  pipeline's threshold zeroing (|w| < 1e-4 -> 0 on grouped parameters)

The optimizer is the library's (`make_optimizer`: SGD, Nesterov momentum 0.9) with the sparsify
phase's settings (lr 0.01, no weight decay). Steps run in rounds: each round runs STEPS steps of
every variant, in an order that rotates from round to round, so load drift (the cores are shared)
hits all variants alike. Per round and variant we take the mean step time; we report the median
over rounds of (a) those times and (b) the per-round ratio variant / plain (the figure to trust:
both sides of a ratio come from the same few seconds). Data: fixed real MNIST batches (LeNet) and
fixed random 3x32x32 batches (ResNet-20), pre-normalised, so no data loading is timed.

Usage (from the repository root):

    python benchmarks/regularizer_overhead.py            # LeNet 30 rounds x 20 steps, ResNet-20 8 x 4
    python benchmarks/regularizer_overhead.py --quick    # a few rounds, to check it runs
    python benchmarks/regularizer_overhead.py --no-resnet
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from sslcompress.config import TrainOptions
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.loop import current_lr, make_optimizer
from sslcompress.finetune.regularizer import GroupLasso
from sslcompress.finetune.structure import analyze
from sslcompress.models import ModelSpec, build_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist" / "mnist.npz"
FC = ("filter", "channel")
ALL5 = ("filter", "channel", "shape", "kernel_row", "kernel_col")
VARIANTS = ("plain", "prox_fc", "prox_all", "subgrad_fc")
TARGET_PROX_FC = 0.10  # overhead target of the proximal filter+channel solver


class Trainer:
    """One variant: its own model copy, optimizer and regulariser."""

    def __init__(self, name: str, base: torch.nn.Module, input_shape, lam: float, lr: float, threshold: float):
        self.name = name
        self.model = copy.deepcopy(base)
        self.model.train()
        self.opt = make_optimizer(self.model, TrainOptions(lr=lr, weight_decay=0.0, momentum=0.9))
        self.threshold = threshold
        self.lasso = None
        self.after_s = 0.0  # time spent in the regulariser's after-step part
        self.steps = 0
        kinds = {"plain": None, "prox_fc": FC, "prox_all": ALL5, "subgrad_fc": FC}[name]
        if kinds is not None:
            structure = analyze(self.model, input_shape)
            groups = build_groups(self.model, input_shape, kinds, structure)
            self.lasso = GroupLasso(self.model, groups, "none")
            self.lambdas = {k: lam for k in self.lasso.kinds}
            self.n_groups = {k: ix.n for k, ix in self.lasso.kinds.items()}
            params = dict(self.model.named_parameters())
            names = sorted({s.param for g in self.lasso.groups for s in g.slices})
            self.grouped = [params[n] for n in names]
        else:
            self.n_groups = {}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        if self.name == "subgrad_fc":
            loss = loss + self.lasso.penalty(self.lambdas)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.name.startswith("prox"):
            t = time.perf_counter()
            self.lasso.proximal_step(current_lr(self.opt), self.lambdas)
            self.after_s += time.perf_counter() - t
        elif self.name == "subgrad_fc":
            t = time.perf_counter()
            with torch.no_grad():
                for p in self.grouped:
                    p.masked_fill_(p.abs() < self.threshold, 0.0)
            self.after_s += time.perf_counter() - t
        self.steps += 1


def mnist_batches(path: Path, n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import numpy as np

    with np.load(path) as z:
        x = torch.from_numpy(z["x_train"][: n * batch].copy()).float().div_(255.0).unsqueeze(1)
        y = torch.from_numpy(z["y_train"][: n * batch].astype("int64"))
    x = (x - 0.1307) / 0.3081
    return [(x[i * batch:(i + 1) * batch].contiguous(), y[i * batch:(i + 1) * batch].contiguous()) for i in range(n)]


def random_batches(shape, n: int, batch: int, classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def bench(model_name: str, in_shape: tuple[int, int, int], batches, rounds: int, steps: int, warmup: int,
          lam: float, lr: float, threshold: float) -> dict:
    torch.manual_seed(0)
    spec = ModelSpec(model_name, num_classes=10, in_channels=in_shape[0], input_size=(in_shape[1], in_shape[2]))
    base = build_model(spec)
    trainers = [Trainer(v, base, spec.input_shape, lam, lr, threshold) for v in VARIANTS]
    per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
    after_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS if v != "plain"}
    k = 0
    t_start = time.perf_counter()
    for r in range(warmup + rounds):
        times = {}
        shift = r % len(trainers)
        for tr in trainers[shift:] + trainers[:shift]:
            tr.after_s = 0.0
            t0 = time.perf_counter()
            for i in range(steps):
                x, y = batches[(k + i) % len(batches)]
                tr.step(x, y)
            times[tr.name] = (time.perf_counter() - t0) / steps
            if r >= warmup:
                after_round[tr.name].append(tr.after_s / steps)
        k += steps
        if r < warmup:
            continue
        for v in VARIANTS:
            per_round[v].append(times[v])
        for v in ratios:
            ratios[v].append(times[v] / times["plain"])
    wall = time.perf_counter() - t_start
    med = {v: statistics.median(per_round[v]) for v in VARIANTS}
    out = {
        "model": model_name, "input": list(in_shape), "batch": batches[0][0].shape[0],
        "rounds": rounds, "steps_per_round": steps, "warmup_rounds": warmup, "lambda": lam, "lr": lr,
        "groups": {tr.name: tr.n_groups for tr in trainers},
        "median_step_ms": {v: 1e3 * med[v] for v in VARIANTS},
        "median_regularizer_ms": {v: 1e3 * statistics.median(after_round[v]) for v in VARIANTS if v != "plain"},
        "overhead_median_of_round_ratios": {v: statistics.median(ratios[v]) - 1 for v in ratios},
        "overhead_ratio_of_medians": {v: med[v] / med["plain"] - 1 for v in ratios},
        "round_ratio_quartiles": {v: [q - 1 for q in statistics.quantiles(ratios[v], n=4)] for v in ratios}
        if rounds >= 2 else {},
        "wall_time_s": wall,
    }
    return out


def render(results: list[dict]) -> str:
    lines = ["| model | variant | groups | median step (ms) | regulariser part (ms) | overhead (median of round ratios) "
             "| overhead (ratio of medians) | round-ratio IQR |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for v in VARIANTS:
            groups = ", ".join(f"{k} {n}" for k, n in res["groups"][v].items()) or "-"
            if v == "plain":
                lines.append(f"| {res['model']} | {v} | {groups} | {res['median_step_ms'][v]:.2f} | - | - | - | - |")
                continue
            iqr = res["round_ratio_quartiles"].get(v)
            iqr_s = f"{iqr[0]:+.1%} .. {iqr[2]:+.1%}" if iqr else "-"
            lines.append(f"| {res['model']} | {v} | {groups} | {res['median_step_ms'][v]:.2f} | "
                         f"{res['median_regularizer_ms'][v]:.3f} | {res['overhead_median_of_round_ratios'][v]:+.1%} | "
                         f"{res['overhead_ratio_of_medians'][v]:+.1%} | {iqr_s} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="MNIST .npz for the LeNet batches")
    ap.add_argument("--results", default=None,
                    help="where the .json/.md go (default benchmarks/results; benchmarks/out with --quick)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--resnet-rounds", type=int, default=8)
    ap.add_argument("--resnet-steps", type=int, default=4)
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: 2 threads on 2 shared cores oversubscribe badly)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.resnet_rounds, args.resnet_steps = 3, 5, 1, 2, 2

    t_all = time.perf_counter()
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, nproc {os.cpu_count()}", flush=True)
    lenet = bench("lenet5", (1, 28, 28), mnist_batches(Path(args.data), 20, 64), args.rounds, args.steps,
                  args.warmup, args.lam, args.lr, 1e-4)
    results.append(lenet)
    print(render([lenet]), flush=True)
    if not args.no_resnet:
        resnet = bench("resnet20", (3, 32, 32), random_batches((3, 32, 32), 8, 64), args.resnet_rounds,
                       args.resnet_steps, 1, args.lam, args.lr, 1e-4)
        results.append(resnet)
    wall = time.perf_counter() - t_all
    table = render(results)
    ov = lenet["overhead_median_of_round_ratios"]["prox_fc"]
    verdict = (f"LeNet proximal filter+channel overhead {ov:+.1%} (target <= {TARGET_PROX_FC:.0%}): "
               f"{'met' if ov <= TARGET_PROX_FC else 'MISSED'}")
    machine = {"nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "platform": platform.platform(),
               "load_average_at_end": list(os.getloadavg())}
    doc = {"benchmark": "regularizer_overhead", "quick": args.quick,
           "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine,
           "wall_time_s": wall, "target_prox_fc_overhead": TARGET_PROX_FC, "verdict": verdict, "results": results}
    res_dir = Path(args.results or REPO / "benchmarks" / ("out" if args.quick else "results"))
    res_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (res_dir / f"regularizer_overhead{suffix}.json").write_text(json.dumps(doc, indent=2))
    md = [f"# Regulariser overhead per training step{' (QUICK check, not a result)' if args.quick else ''}", "",
          f"Generated by `{doc['command']}` on {doc['date_utc']}.", "", table, "", f"**{verdict}**", "",
          "Overhead = step time / plain step time - 1. 'Median of round ratios' compares each variant with the "
          "plain steps of the same round (drift cancels); 'ratio of medians' compares medians over all rounds. "
          "'Regulariser part' = median time per step spent in proximal_step (prox) or the threshold zeroing "
          "(subgrad; its penalty cost sits inside forward/backward).", "",
          f"Settings: batch 64, lambda {args.lam} for every kind, lr {args.lr}, SGD Nesterov momentum 0.9, no weight "
          f"decay; LeNet {lenet['rounds']} rounds x {lenet['steps_per_round']} steps (+{lenet['warmup_rounds']} "
          "warm-up rounds) on 20 fixed real MNIST batches"
          + ("" if args.no_resnet else f"; ResNet-20 {results[-1]['rounds']} rounds x "
             f"{results[-1]['steps_per_round']} steps (+1 warm-up) on fixed random 3x32x32 batches") + ".", "",
          f"Machine: nproc {machine['nproc']}, torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"{machine['platform']}; load average at end {', '.join(f'{x:.2f}' for x in machine['load_average_at_end'])} "
          "(cores shared with other work). Wall time "
          f"{wall:.0f} s.", ""]
    (res_dir / f"regularizer_overhead{suffix}.md").write_text("\n".join(md))
    print()
    print(table)
    print(verdict)
    print(f"wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
