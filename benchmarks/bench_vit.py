"""Structured speed-up of ViTs in ONNX Runtime: half the MLP neurons and a quarter of the attention heads gone.

For each model (the ViT-S/16 layout at 224x224, `vit_small`, and the built-in `vit_tiny` at CIFAR's 32x32),
random weights are built and, per block, a random half of the MLP hidden units and a random quarter of all
heads (spread over the blocks as evenly as the count allows) are zeroed: fc1 rows and biases and fc2 columns,
q/k/v rows and biases and output-projection columns. The model is exported with a dynamic batch (onnxsim fuses
each attention into ORT's contrib Attention op), cut by the surgery (verified in ORT against the uncut
export), and benched by the library's `run_bench`, as `sslcompress bench --dense D --structured S` does: dense,
unstructured (the same nonzeros per layer, by magnitude) and structured, interleaved rounds in one process.

Target: at batch 8, the structured speed-up reaches at least 0.9 of the MAC reduction (speed-up times the
fraction of MACs kept >= 0.9).

Usage (from the repository root):

    python benchmarks/bench_vit.py                           # both models, batch 1 and 8, 1 thread
    python benchmarks/bench_vit.py --models vit_tiny --rounds 5

Results: benchmarks/results/bench_vit.json and .md; the ONNX models under benchmarks/out/bench_vit/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_log import csv, log
from paper_cifar10 import REPO, machine, now, summarize_bench

from sslcompress.bench.config import BenchConfig
from sslcompress.bench.run import run_bench
from sslcompress.io import atomic_write_bytes, atomic_write_json
from sslcompress.models.registry import build_builtin
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx
from sslcompress.surgery.units import transformer_units

STEM = "bench_vit"
MODELS = {"vit_small": (1000, (224, 224)), "vit_tiny": (10, (32, 32))}
TARGET = 0.9


def heads_per_block(depth: int, heads: int, fraction: float) -> list[int]:
    """How many heads each block loses: round(fraction * all heads), spread as evenly as the count allows."""
    total = round(fraction * depth * heads)
    return [total // depth + (1 if i < total % depth else 0) for i in range(depth)]


@torch.no_grad()
def zero_units(model, neurons: float, heads: float, rng: np.random.Generator) -> None:
    """Zero a random `neurons` share of every MLP's hidden units and a random `heads` share of the heads."""
    losses = heads_per_block(len(model.blocks), model.blocks[0].attn.num_heads, heads)
    for block, lose in zip(model.blocks, losses, strict=True):
        mlp, att = block.mlp, block.attn
        dead = torch.as_tensor(rng.choice(mlp.fc1.out_features, round(neurons * mlp.fc1.out_features), replace=False))
        mlp.fc1.weight[dead] = 0
        mlp.fc1.bias[dead] = 0
        mlp.fc2.weight[:, dead] = 0
        for h in rng.choice(att.num_heads, lose, replace=False):
            rows = slice(int(h) * att.head_dim, (int(h) + 1) * att.head_dim)
            for lin in (att.q, att.k, att.v):
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            att.proj.weight[:, rows] = 0


def run_model(args, name: str, out: Path) -> dict:
    classes, size = MODELS[name]
    torch.manual_seed(args.seed)
    model = build_builtin(name, classes, 3, size).eval()
    zero_units(model, args.neurons, args.heads, np.random.default_rng(args.seed))
    log(f"{name}: exporting (dynamic batch) and cutting")
    exported = export_onnx(model, (1, 3, *size), dynamic_batch=True)
    t0 = time.perf_counter()
    cut = compress(exported.model)
    surgery_s = time.perf_counter() - t0
    v = cut.verification
    if not v.passed:
        raise SystemExit(f"error: the compact {name} differs from the uncut one by {v.max_abs:.3g}")
    dense_path, compact_path = out / f"{name}_dense.onnx", out / f"{name}_compact.onnx"
    atomic_write_bytes(exported.model.SerializeToString(), dense_path)
    atomic_write_bytes(cut.model.SerializeToString(), compact_path)
    units = {k: transformer_units(m).to_dict() for k, m in (("dense", exported.model), ("structured", cut.model))}
    cfg = BenchConfig(dense=str(dense_path), structured=str(compact_path), threads=tuple(args.threads),
                      batches=tuple(args.batch), repeat=args.rounds, memory=False, seed=args.seed)
    log(f"{name}: bench, threads {args.threads}, batch {args.batch}, {args.rounds} rounds")
    res = summarize_bench(run_bench(cfg, lambda e: log(f"bench {e.stage}: {e.message}") if e.done == 0 else None))
    totals = cut.report["totals"]
    fraction = totals["macs_after"] / totals["macs"]
    speed = {}
    for key, s in res["speed"].items():
        ratio = s["structured"]["speedup"]
        speed[key] = {"threads": s["threads"], "batch": s["batch"], "dense_ms": s["dense_ms"],
                      "structured_ms": s["structured"]["median_ms"], "structured": ratio,
                      "ci95": s["structured"]["ci95"], "unstructured": s["unstructured"]["speedup"],
                      "of_mac_limit": ratio * fraction}
    at8 = [s["of_mac_limit"] for s in speed.values() if s["batch"] == 8]
    return {"model": name, "input": [3, *size], "macs": totals["macs"], "macs_after": totals["macs_after"],
            "macs_fraction": fraction, "params": totals["params"], "params_after": totals["params_after"],
            "units": units, "verification": {"passed": v.passed, "max_abs": v.max_abs, "rel": v.rel},
            "surgery_s": surgery_s, "speed": speed, "target_met_at_batch_8": bool(at8) and min(at8) >= TARGET,
            "env": res["env"]}


def render_md(doc: dict) -> str:
    md = ["# ViT structured speed-up in ONNX Runtime (CPU)", "",
          f"Date {doc['date_utc']}. Command: `{doc['command']}`. Random weights; per block a random "
          f"{doc['neurons']:.0%} of the MLP neurons and {doc['heads']:.0%} of all heads zeroed, exported with a "
          "dynamic batch (contrib Attention), cut and verified in ORT; dense, unstructured and structured timed "
          "in interleaved rounds in one process by the library's bench.", "",
          "| model | MACs dense -> cut | heads | MLP neurons | threads | batch | dense ms | structured | "
          "of the MAC limit | unstructured |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"].values():
        u = r["units"]
        heads = f"{sum(u['structured']['heads'])}/{sum(u['dense']['heads'])}"
        neurons = f"{sum(u['structured']['neurons'])}/{sum(u['dense']['neurons'])}"
        for s in r["speed"].values():
            md.append(f"| {r['model']} {r['input'][1]}x{r['input'][2]} | {r['macs'] / 1e6:.1f}M -> "
                      f"{r['macs_after'] / 1e6:.1f}M ({r['macs_fraction']:.1%}) | {heads} | {neurons} | {s['threads']} | "
                      f"{s['batch']} | {s['dense_ms']:.2f} | {s['structured']:.2f}x [{s['ci95'][0]:.2f}, "
                      f"{s['ci95'][1]:.2f}] | {s['of_mac_limit']:.2f} | {s['unstructured']:.2f}x |")
    md += ["", "Of the MAC limit: structured speed-up times the fraction of MACs kept (1.0: as fast as the MACs "
           f"say). Target: >= {TARGET} at batch 8."]
    for r in doc["rows"].values():
        md.append(f"- {r['model']}: target {'met' if r['target_met_at_batch_8'] else 'missed'}; verification max abs "
                  f"{r['verification']['max_abs']:.2g} (relative {r['verification']['rel']:.2g}); surgery "
                  f"{r['surgery_s']:.1f} s.")
    m = doc["machine"]
    md += ["", f"Machine: nproc {m['nproc']}, torch {m['torch']}; load average at end "
           f"{', '.join(f'{x:.2f}' for x in m['load_average_at_end'])} (shared cores: timings are noisy, the ratios "
           "come from interleaved rounds).", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--neurons", type=float, default=0.5, help="share of each MLP's hidden units zeroed")
    ap.add_argument("--heads", type=float, default=0.25, help="share of all heads zeroed")
    ap.add_argument("--threads", default="1", help="ORT intra-op threads, comma list")
    ap.add_argument("--batch", default="1,8", help="batch sizes, comma list")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=None, help="the .json/.md folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.models, args.threads, args.batch = csv(args.models), csv(args.threads, int), csv(args.batch, int)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        ap.error(f"--models takes {', '.join(MODELS)}; got {', '.join(unknown) or 'nothing'}")
    torch.set_num_threads(1)
    out = REPO / "benchmarks" / "out" / STEM
    results = Path(args.results or REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    rows = {name: run_model(args, name, out) for name in args.models}
    doc = {"benchmark": STEM, "date_utc": now(), "machine": machine(), "neurons": args.neurons, "heads": args.heads,
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows}
    path = results / f"{STEM}.json"
    atomic_write_json(doc, path)
    atomic_write_bytes(render_md(doc).encode(), path.with_suffix(".md"))
    log(f"wrote {path} and {path.with_suffix('.md')}")
    print(render_md(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
