"""The paper's Table 4 on this machine: AlexNet conv1..conv5 lowered GEMMs, l1 CSR and SSL compact vs dense.

Wen et al. 2016 timed each AlexNet conv layer as one GEMM (im2col): dense BLAS, CSR sparse x dense for the
l1-trained (unstructured) weights, and the dense GEMM with all-zero rows and columns removed for the SSL
weights. We impose their Table 4 sparsities on random weights of AlexNet's conv shapes (row 1, l1: that
fraction of zeros placed by magnitude, i.e. at random places -> CSR; row 2, SSL: that fraction of zero
columns and zero rows -> compact) and print our speed-ups (dense median / contender median, per layer, and
their arithmetic mean as in the paper) beside theirs.

Shapes: torchvision's AlexNet by default (224x224 input, no groups, each layer one GEMM; the layout this
package's models and ONNX exports use). `--shapes caffe` gives Caffe's bvlc_alexnet, which the paper timed
(227x227, conv2/4/5 in 2 groups: one group's GEMM is timed, every group having its shape).
Batch: `--batch 1` by default, because Caffe lowers and multiplies image by image (N = Ho*Wo per GEMM).

Threads: `--threads 1,all` runs the CPU study with torch at 1 thread (the paper's setting) and at all cores.
numpy/scipy's OpenBLAS pool is separate from torch's: this script sets OPENBLAS_NUM_THREADS=1 before numpy
loads (no numpy BLAS call is timed; scipy's CSR x dense is scipy's own single-threaded loop, at every
`--threads`), and the library also pins that pool to torch's count through threadpoolctl when installed.

CUDA (`--device cuda`): torch.mm = cuBLAS in fp32 (TF32 off), torch sparse CSR = cuSPARSE, compact = cuBLAS;
operands live on the device, the CSR is built once outside the timed loop, and the device is synchronised
before and after each sample. `--cuda-mode graph,eager` (default) times each twice: replayed from a CUDA
graph (the GPU's time; at batch 1 an H200 spends a few microseconds per AlexNet GEMM, far less than one
launch from Python) and called eagerly (launch overhead included). Runs with torch and numpy alone, from the
repository root:

    PYTHONPATH=. python benchmarks/paper_table4.py --device cuda

Usage (repository root):

    python benchmarks/paper_table4.py                 # CPU, 1 thread and all threads -> benchmarks/results
    python benchmarks/paper_table4.py --threads 1
    python benchmarks/paper_table4.py --quick         # smoke run, 1 thread, few rounds -> benchmarks/out
    python benchmarks/paper_table4.py --device all    # CPU, and CUDA where torch sees a GPU

Writes paper_table4_<device>.json (every sample) and .md (the tables), each written whole or not at all.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads; see the docstring

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from sslcompress.bench import layers as L  # noqa: E402
from sslcompress.bench.paper import cpus  # noqa: E402
from sslcompress.io import atomic_write_bytes  # noqa: E402

PAPER_COL = {"cpu": "cpu", "cuda": "gpu"}
CUDA_MODES = {"graph": "CUDA graphs (GPU time of the kernels, no launch overhead)",
              "eager": "eager (wall time per call from Python, launch overhead included)"}


def parse_threads(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip().lower()
        n = cpus() if part == "all" else int(part)
        if n < 1:
            raise ValueError(f"thread count must be at least 1: {part}")
        if n not in out:
            out.append(n)
    return out


def run_device(device: str, args: argparse.Namespace, say) -> dict:
    l1_layers, ssl_layers = L.table4_layers(args.shapes, args.batch, args.seed)
    cpu = device == "cpu"
    l1_contenders = tuple(c for c in L.available_contenders(device) if c != L.COMPACT)
    opts = dict(device=device, repeat=args.repeat, min_time=args.min_time, warmup=args.warmup,
                sample_time=args.sample_time, seed=args.seed)

    def progress(i: int, n: int, t: L.LayerTiming) -> None:
        parts = ", ".join(f"{c.contender} {c.median_s * 1e3:.3f} ms" + ("" if c.contender == L.DENSE else
                                                                         f" ({c.speedup:.2f}x)")
                          for c in t.timings)
        say(f"  [{i}/{n}] {t.name}: {parts}")

    runs = []
    plans = [(t, None) for t in args.threads] if cpu else [(None, m) for m in args.cuda_mode]
    for threads, mode in plans:
        label = f"{threads} thread(s)" if cpu else f"CUDA {mode}"
        graphs = mode == "graph"
        say(f"{device} {label}: l1 row ({', '.join(l1_contenders)})")
        t0 = time.perf_counter()
        l1 = L.study(l1_layers, l1_contenders, threads=threads, cuda_graphs=graphs, progress=progress, **opts)
        say(f"{device} {label}: SSL row (dense, compact)")
        ssl = L.study(ssl_layers, (L.DENSE, L.COMPACT), threads=threads, cuda_graphs=graphs, progress=progress,
                      **opts)
        modes = sorted({c.mode for t in l1 + ssl for c in t.timings})
        runs.append({"threads": threads, "mode": mode, "timing_modes": modes, "backend": l1[0].backend,
                     "wall_s": time.perf_counter() - t0, "l1": [t.to_dict() for t in l1],
                     "ssl": [t.to_dict() for t in ssl], "summary": summarize(l1, ssl, device)})
    return {"device": device, "runs": runs}


def summarize(l1: list[L.LayerTiming], ssl: list[L.LayerTiming], device: str) -> dict:
    col = PAPER_COL[device]
    csrs = [c for c in (L.CSR, L.SCIPY_CSR) if any(x.contender == c for x in l1[0].timings)]
    s = {"l1_torch_csr": L.mean_speedup(l1, L.CSR), "l1_best_csr": L.mean_speedup(l1, csrs),
         "ssl": L.mean_speedup(ssl, L.COMPACT),
         "ssl_ideal": sum(t.M * t.K / max(1, c.M * c.K) for t in ssl for c in [t.get(L.COMPACT)]) / len(ssl),
         "paper_l1": L.paper_mean(f"{col}_l1"), "paper_ssl": L.paper_mean(f"{col}_ssl")}
    if L.SCIPY_CSR in csrs:
        s["l1_scipy_csr"] = L.mean_speedup(l1, L.SCIPY_CSR)
    s["ssl_over_l1_torch_csr"] = s["ssl"] / s["l1_torch_csr"]
    s["ssl_over_l1_best_csr"] = s["ssl"] / s["l1_best_csr"]
    s["paper_ssl_over_l1"] = s["paper_ssl"] / s["paper_l1"]
    return s


def _ms(c: L.ContenderTiming) -> str:
    return f"{c.median_s * 1e3:.3f} ({c.q1_s * 1e3:.3f}-{c.q3_s * 1e3:.3f})"


def render(result: dict, meta: dict) -> str:
    device = result["device"]
    col = PAPER_COL[device]
    lines = [f"# Table 4 (AlexNet per-layer GEMM speed-ups) on {device.upper()}", "",
             f"{meta['date']}; {meta['machine']}; shapes `{meta['shapes']}`, batch {meta['batch']} image(s)"
             f" per GEMM; {meta['repeat']} interleaved rounds per layer, sample >= {meta['sample_time']} s.",
             "Times: median (IQR) ms per GEMM. Speed-up x = dense median / contender median, same rounds.", ""]
    for run in result["runs"]:
        l1 = [L.LayerTiming.from_dict(d) for d in run["l1"]]
        ssl = [L.LayerTiming.from_dict(d) for d in run["ssl"]]
        scipy = any(c.contender == L.SCIPY_CSR for c in l1[0].timings)
        title = f"{run['threads']} thread(s)" if run["threads"] else f"CUDA, {CUDA_MODES[run['mode']]}"
        fell_back = run["mode"] == "graph" and "eager" in run["timing_modes"]
        lines += [f"## {title}", "", f"Backend: {run['backend']}." + (
            " Some contenders could not be captured in a CUDA graph and ran eagerly (see `mode` in the JSON)."
            if fell_back else ""), "",
                  "Row 1, l1 (unstructured zeros, CSR sparse x dense):", "",
                  "| layer | GEMM M x K x N | sparsity | dense ms | torch CSR ms | x |"
                  + (" scipy CSR ms | x |" if scipy else "") + " paper x |",
                  "|---|---|---|---|---|---|" + ("---|---|" if scipy else "") + "---|"]
        for t, p in zip(l1, L.TABLE4, strict=True):
            c = t.get(L.CSR)
            row = (f"| {t.name} | {t.M} x {t.K} x {t.N} | {t.sparsity:.1%} | {_ms(t.get(L.DENSE))} | {_ms(c)}"
                   f" | **{c.speedup:.2f}** |")
            if scipy:
                sc = t.get(L.SCIPY_CSR)
                row += f" {_ms(sc)} | {sc.speedup:.2f} |"
            lines.append(row + f" {getattr(p, col + '_l1'):.2f} |")
        lines += ["", "Row 2, SSL (zero rows and columns removed, compact dense GEMM):", "",
                  "| layer | column / row sparsity | compact M' x K' | ideal x | dense ms | compact ms | x | paper x |",
                  "|---|---|---|---|---|---|---|---|"]
        for t, p in zip(ssl, L.TABLE4, strict=True):
            c = t.get(L.COMPACT)
            lines.append(f"| {t.name} | {t.col_sparsity:.1%} / {t.row_sparsity:.1%} | {c.M} x {c.K} |"
                         f" {t.M * t.K / max(1, c.M * c.K):.2f} | {_ms(t.get(L.DENSE))} | {_ms(c)} |"
                         f" **{c.speedup:.2f}** | {getattr(p, col + '_ssl'):.2f} |")
        s = run["summary"]
        lines += ["", "Averages over conv1..conv5 (arithmetic mean of per-layer speed-ups, as the paper):", "",
                  "| | ours | paper |", "|---|---|---|",
                  f"| l1, torch CSR | {s['l1_torch_csr']:.2f}x | {s['paper_l1']:.2f}x |"]
        if "l1_scipy_csr" in s:
            lines.append(f"| l1, scipy CSR | {s['l1_scipy_csr']:.2f}x | |")
        lines += [f"| l1, best CSR per layer | {s['l1_best_csr']:.2f}x | |",
                  f"| SSL compact | **{s['ssl']:.2f}x** (ideal {s['ssl_ideal']:.2f}x) | {s['paper_ssl']:.2f}x |",
                  f"| SSL / l1 (torch CSR) | {s['ssl_over_l1_torch_csr']:.2f} | {s['paper_ssl_over_l1']:.2f} |",
                  f"| SSL / l1 (best CSR) | {s['ssl_over_l1_best_csr']:.2f} | |", ""]
    lines += ["Notes:", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="cpu",
                    help="all: CPU, and CUDA where torch sees a GPU")
    ap.add_argument("--threads", default=None, help="CPU torch threads, e.g. 1,all (default 1,all; 1 with --quick)")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds per layer (default 25; 3 with --quick)")
    ap.add_argument("--min-time", type=float, default=0.0, help="keep running rounds until this many seconds per layer")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per contender (default 3)")
    ap.add_argument("--sample-time", type=float, default=None, help="seconds one sample lasts at least (default 0.02)")
    ap.add_argument("--cuda-mode", default="graph,eager",
                    help="CUDA timing: graph (kernels replayed from a CUDA graph), eager (plain calls), or both")
    ap.add_argument("--batch", type=int, default=1, help="images per GEMM (default 1: Caffe multiplies per image)")
    ap.add_argument("--shapes", choices=sorted(L.ALEXNET_SHAPES), default="torchvision")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 thread, 3 rounds, short samples")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; benchmarks/out with --quick)")
    args = ap.parse_args(argv)
    q = args.quick
    args.cuda_mode = [m.strip() for m in args.cuda_mode.split(",") if m.strip()]
    if not args.cuda_mode or set(args.cuda_mode) - set(CUDA_MODES):
        ap.error(f"--cuda-mode takes {' and/or '.join(CUDA_MODES)}")
    args.threads = parse_threads(args.threads or ("1" if q else "1,all"))
    args.repeat = args.repeat or (3 if q else 25)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.sample_time = args.sample_time or (0.002 if q else 0.02)
    out = Path(args.out) if args.out else REPO / "benchmarks" / ("out" if q else "results")

    if args.device == "cuda" and not torch.cuda.is_available():
        try:
            L.resolve_device("cuda")
        except L.CudaUnavailableError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "all":
        if torch.cuda.is_available():
            devices.append("cuda")
        else:
            print("note: torch sees no CUDA device; running the CPU study only", flush=True)

    def say(msg: str) -> None:
        print(msg, flush=True)

    say(f"torch {torch.__version__}, cpus {cpus()}, scipy {'yes' if L.scipy_available() else 'no'},"
        f" shapes {args.shapes}, batch {args.batch}, repeat {args.repeat}, threads {args.threads}")
    for device in devices:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        result = run_device(device, args, say)
        machine = f"{platform.machine()} {cpus()} cpus" + (
            f", {torch.cuda.get_device_name()}" if device == "cuda" else "")
        notes = [
            f"Shapes `{args.shapes}`: " + ("torchvision AlexNet (224x224, no groups: each layer is one GEMM, the"
                                          " layout of this package's models and ONNX exports)" if args.shapes ==
                                          "torchvision" else "Caffe bvlc_alexnet (227x227; for conv2/4/5 one of"
                                          " the 2 group GEMMs is timed)") + "; the paper timed Caffe's.",
            f"Batch {args.batch}: N = Ho*Wo*batch; Caffe lowers and multiplies one image at a time.",
            "Weights are random; l1 zeros are the smallest magnitudes (random places), SSL zeros are whole"
            " rows/columns. Counts are round(fraction x size); see the sparsity columns.",
            "Only the multiplication is timed (CSR built and compact operands sliced beforehand); every"
            " contender's product was checked against dense before timing.",
            "Dense times do not depend on the zeros in W, so each row's dense column is its own baseline.",
        ]
        if device == "cpu":
            notes.append("scipy CSR is single-threaded at every thread count; OPENBLAS_NUM_THREADS="
                         f"{os.environ.get('OPENBLAS_NUM_THREADS')} (numpy's pool, not torch's).")
            notes.append("The paper's CPU figures: 1 thread of a Xeon E5-2630 v2 with MKL (mkl_scsrmm for CSR).")
        else:
            notes.append("The paper's GPU figures: cuBLAS vs cuSPARSE csrmm (Caffe, 2016 GPU). Here a sample is"
                         " the wall time of back-to-back calls between two device synchronisations, divided by"
                         " the calls: in graph mode the calls are replayed from one CUDA graph (the GPU's own"
                         " time), in eager mode they are launched one by one from Python (a small GEMM on a"
                         " recent GPU is then bound by the launch, not the kernel).")
        meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
                "shapes": args.shapes, "batch": args.batch, "repeat": args.repeat,
                "sample_time": args.sample_time, "notes": notes}
        doc = {"benchmark": "paper_table4", "quick": q, **meta, "args": {k: v for k, v in vars(args).items()},
               "env": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                       "platform": platform.platform(), "cpus": cpus(), "scipy": L.scipy_available(),
                       "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                       "load_average_start": list(load0), "load_average_end": list(os.getloadavg()),
                       "wall_s": time.perf_counter() - t0},
               "paper": {"rows": [vars(r) for r in L.TABLE4], "headline": L.PAPER_HEADLINE,
                         "means": {c: L.paper_mean(c) for c in ("cpu_l1", "cpu_ssl", "gpu_l1", "gpu_ssl")}},
               **result}
        md = render(result, meta)
        atomic_write_bytes((json.dumps(doc, indent=1) + "\n").encode(), out / f"paper_table4_{device}.json")
        atomic_write_bytes(md.encode(), out / f"paper_table4_{device}.md")
        say("")
        say(md)
        say(f"wrote {out / f'paper_table4_{device}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
