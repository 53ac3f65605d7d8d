"""End to end on ORT (CPU, or the CUDA EP): ResNet-18/50 dense vs unstructured-sparse vs structured-sparse.

Issue 4, benchmark 2. The same ResNets as `surgery_resnet.py` (50% and 75% of block-internal
channels zeroed, with their BatchNorm scale and shift), exported (dense: the uncut model, whose
zeros stock ORT multiplies like any weight), cut by the surgery (structured), and the
unstructured variant built by `sslcompress bench` itself: the dense weights with as many nonzeros
per layer as the structured model keeps, placed by magnitude. All three timed by
`sslcompress.bench.run.run_bench`: interleaved rounds, batch 1 and 8, 1 and 2 threads. With
`--provider cuda` (onnxruntime-gpu installed) the same bench path times the CUDA execution provider: inputs
and outputs bound on the device once (I/O binding), each call synchronised before the clock stops.

Target: structured speed-up >= 0.95 x the MAC reduction; unstructured about 1.0x (stated, not
hidden). Writes results/bench_resnet.json (every BenchResult) and results/bench_resnet.md.

    python benchmarks/bench_resnet.py [--models resnet18,resnet50] [--keep 0.5,0.25] [--repeat 15]
    python benchmarks/bench_resnet.py --provider cuda --batch 1,8,64 --threads 1 --name bench_resnet_cuda
    python benchmarks/bench_resnet.py --provider cuda --half ...     # both models in float16, as GPUs deploy them

With `--half` the dense and the structured model are converted to float16 after the (float32) cut is verified
(ONNX Runtime's float16 converter, inputs and outputs float16 too) and the bench times them in half precision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sslcompress.bench.config import BenchConfig
from sslcompress.bench.run import check_config, run_bench
from sslcompress.errors import SSLCompressError
from sslcompress.io import atomic_write_bytes, atomic_write_json
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx, save_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from surgery_resnet import sparse_resnet  # noqa: E402  (the same zeroing as the surgery benchmark)

HERE = Path(__file__).resolve().parent


def machine_line(env: dict) -> str:
    """The host the figures belong to, from the bench's own record of it."""
    parts = [env.get("cpu"), env.get("cuda_device"), f"ORT {env['onnxruntime']}" if env.get("onnxruntime") else None]
    parts = [p for p in parts if p]
    return f"Machine: {', '.join(parts)}." if parts else ""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cut_case(name: str, keep: float, args, work: Path, scope: str = "blocks",
             align: int = 1) -> tuple[Path, Path, dict, dict]:
    """The zeroed ResNet exported with a dynamic batch and cut, verified, both models written to `work`:
    (dense path, structured path, the surgery's totals, what was zeroed)."""
    model, zeroing = sparse_resnet(name, keep, args.size, args.seed, scope, align)
    return (*export_and_cut(model, (1, 3, args.size, args.size), f"{name}_{keep:g}", work,
                            half=getattr(args, "half", False)), zeroing)


def export_and_cut(model, input_shape: tuple[int, ...], stem: str, work: Path, half: bool = False
                   ) -> tuple[Path, Path, dict]:
    """`model` exported with a dynamic batch and cut, verified (or the script stops), both models written to
    `work` (in float16 with `half`): (dense path, structured path, the surgery's totals)."""
    exported = export_onnx(model, input_shape, dynamic_batch=True)
    cut = compress(exported.model, shape_lowering="off")
    if not cut.verification.passed:
        raise SystemExit(f"error: verification failed for {stem}: {cut.report['verification']}")
    suffix = "_fp16" if half else ""
    dense, structured = work / f"{stem}_dense{suffix}.onnx", work / f"{stem}_structured{suffix}.onnx"
    save_onnx(as_half(exported.model) if half else exported.model, dense)
    save_onnx(as_half(cut.model) if half else cut.model, structured)
    return dense, structured, cut.report["totals"]


def as_half(proto):
    """The model in float16, inputs and outputs too (ONNX Runtime's converter, as a GPU deployment makes it)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=False)


def one_case(name: str, keep: float, args, work: Path, cut=cut_case) -> dict:
    """`name` at `keep` cut by `cut` (cut_case's signature and result), then timed dense, unstructured and
    structured in interleaved rounds."""
    dense, structured, totals, zeroing = cut(name, keep, args, work)
    reduction = totals["macs"] / totals["macs_after"]
    log(f"{name} keep {keep:g}: MACs {totals['macs'] / 1e9:.3f} G -> {totals['macs_after'] / 1e9:.3f} G "
        f"({reduction:.2f}x); timing dense, unstructured and structured")
    config = BenchConfig(dense=str(dense), structured=str(structured), providers=tuple(args.provider),
                         threads=tuple(args.threads), batches=tuple(args.batch), repeat=args.repeat,
                         warmup=args.warmup, memory="cpu" in args.provider)
    result = run_bench(config, lambda e: None)
    rows = []
    for t in result.timings:
        if t.variant == "dense":
            continue
        rows.append({"variant": t.variant, "provider": t.provider, "batch": t.batch, "threads": t.threads,
                     "median_ms": 1e3 * t.median_s, "speedup": t.speedup, "speedup_ci": list(t.speedup_ci),
                     "efficiency": t.speedup / reduction if t.variant == "structured" else None,
                     "dense_ms": 1e3 * result.timing("dense", t.provider, t.threads, t.batch).median_s})
        r = rows[-1]
        log(f"  {t.variant:12} {t.provider} batch {t.batch} threads {t.threads}: {r['median_ms']:.2f} ms vs dense "
            f"{r['dense_ms']:.2f} ms, {t.speedup:.2f}x [{t.speedup_ci[0]:.2f}, {t.speedup_ci[1]:.2f}]"
            + (f", efficiency {r['efficiency']:.3f}" if r["efficiency"] is not None else ""))
    return {"model": name, "keep": keep, **zeroing, "macs": totals["macs"], "macs_after": totals["macs_after"],
            "mac_reduction": reduction, "rows": rows, "bench": result.to_dict()}


def render(cases: list[dict], started: str, command: str, env: dict,
           title: str = "Dense vs unstructured vs structured on ONNX Runtime") -> str:
    providers = ", ".join(dict.fromkeys(r.get("provider", "cpu").upper() for c in cases for r in c["rows"]))
    lines = [f"# {title} ({providers})", "",
             f"Generated by `{command}` on {started}. {machine_line(env)} Speed-ups are over the dense "
             "(uncut) model in the same interleaved rounds, with 95% bootstrap intervals; efficiency = "
             "structured speed-up / MAC reduction (target >= 0.95). The unstructured model has exactly the "
             "structured model's nonzero weights per layer; stock ORT runs it with dense kernels.", "",
             "| model | kept | MAC reduction | provider | batch | threads | dense ms | unstructured | structured "
             "| efficiency |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        by = {(r["variant"], r.get("provider", "cpu"), r["batch"], r["threads"]): r for r in c["rows"]}
        for (variant, provider, batch, threads), r in by.items():
            if variant != "structured":
                continue
            u = by[("unstructured", provider, batch, threads)]
            lines.append(f"| {c['model']} | {c['keep']:.0%} | {c['mac_reduction']:.2f}x | {provider} | {batch} | "
                         f"{threads} | "
                         f"{r['dense_ms']:.2f} | {u['speedup']:.2f}x [{u['speedup_ci'][0]:.2f}, {u['speedup_ci'][1]:.2f}] | "
                         f"{r['speedup']:.2f}x [{r['speedup_ci'][0]:.2f}, {r['speedup_ci'][1]:.2f}] | "
                         f"{r['efficiency']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--keep", default="0.5,0.25", help="fractions of block-internal channels kept")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--half", action="store_true",
                   help="time the dense and the structured model in float16 (converted after the float32 cut)")
    add_timing_options(p, "bench_resnet")
    args = p.parse_args(argv)
    if not timing_options_ok(args):
        return 2
    half = {"title": "Dense vs unstructured vs structured on ONNX Runtime, float16"} if args.half else {}
    run_cases(args, argv, "bench_resnet.py", **half)
    return 0


def run_cases(args, argv: list[str] | None, script: str, cut=cut_case, **render_options) -> None:
    """Every --models x --keep case cut by `cut` and timed (one_case), the results written (write_results)."""
    torch.set_num_threads(1)  # torch only builds the models here; ORT does the timed work
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    cases = [one_case(m, float(k), args, work, cut) for m in args.models.split(",") for k in args.keep.split(",")]
    write_results(cases, args, argv, started, script, **render_options)


def add_timing_options(p: argparse.ArgumentParser, name: str) -> None:
    """The options of a script that times its cases with one_case: batches, threads, rounds, seed, providers,
    and where the models and results go (`name`: the results' stem and the work folder's)."""
    p.add_argument("--batch", default="1,8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", default="cpu", help="ORT execution providers timed (comma list of cpu, cuda)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--work", default=str(HERE / "out" / name), help="folder of the models it writes")
    p.add_argument("--name", default=name, help="stem of the .json and .md results")


def timing_options_ok(args) -> bool:
    """The comma lists parsed in place; False, after one line on stderr, where a provider cannot run here (CUDA
    without onnxruntime-gpu), before any model is built."""
    args.batch = [int(x) for x in args.batch.split(",")]
    args.threads = [int(x) for x in args.threads.split(",")]
    args.provider = [x.strip() for x in args.provider.split(",") if x.strip()]
    try:
        check_config(BenchConfig(dense="-", structured="-", providers=tuple(args.provider),
                                 threads=tuple(args.threads), batches=tuple(args.batch)))
    except SSLCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True


def write_results(cases: list[dict], args, argv: list[str] | None, started: str, script: str, **render_options) -> None:
    """`<name>.json` (every case) and `<name>.md` (the table) under --out, the table printed too."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    env = cases[0]["bench"].get("env", {}) if cases else {}
    atomic_write_json({"started": started, "command": command, "args": {k: v for k, v in vars(args).items()},
                       "cases": cases}, out / f"{args.name}.json")
    md = render(cases, started, command, env, **render_options)
    atomic_write_bytes(md.encode(), out / f"{args.name}.md")
    print(md)


if __name__ == "__main__":
    sys.exit(main())
