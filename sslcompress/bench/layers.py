"""Per-layer GEMM study in the paper's manner (Wen et al. 2016, Table 4).

Each convolution is lowered to one GEMM (im2col): W (M x K, K = C*kh*kw) times X (K x N,
N = Ho*Wo*batch). Contenders for the same product:

    dense      torch.mm on W with its zeros left in (MKL sgemm on CPU, cuBLAS on CUDA)
    csr        torch sparse CSR W @ dense X (MKL sparse BLAS in MKL builds of torch; cuSPARSE SpMM)
    scipy_csr  scipy.sparse.csr_matrix(W) @ X, CPU only (scipy's own single-threaded loop, no BLAS)
    compact    dense GEMM of W without its all-zero rows and columns times X without the matching rows

Only the multiplication is timed. Building the CSR, slicing the compact operands and im2col happen
once beforehand: a structured layer never produces the removed rows of X nor the deleted filters'
outputs. X holds random values (timing does not depend on them; the lowering itself is `im2col`).

This module imports only the standard library, numpy and torch (scipy when present), so that
`benchmarks/paper_table4.py` runs on a GPU machine without the package's other dependencies.

The lowering and the imposed sparsities live in `sslcompress.bench.gemm`, the paper's Table 4 in
`sslcompress.bench.table4`; their names are re-exported here, so `from sslcompress.bench import layers as L`
reaches all of it.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from sslcompress.bench.gemm import (  # noqa: F401  (re-exported)
    ConvShape,
    ConvSpec,
    LayerGemm,
    _count,
    _pads,
    _pair,
    conv_as_gemm,
    im2col,
    lower_convs,
    magnitude_prune,
    random_weight,
    structured_prune,
)
from sslcompress.bench.table4 import (  # noqa: F401  (re-exported)
    ALEXNET_SHAPES,
    PAPER_HEADLINE,
    TABLE4,
    PaperRow,
    paper_mean,
    table4_layers,
)
from sslcompress.errors import ConfigError, SSLCompressError
from sslcompress.runtime.timing import rounds

DENSE, CSR, SCIPY_CSR, COMPACT = "dense", "csr", "scipy_csr", "compact"
CONTENDERS = (DENSE, CSR, SCIPY_CSR, COMPACT)
_CSR_BETA = ".*[Ss]parse CSR tensor support is in beta.*"
Progress = Callable[[int, int, "LayerTiming"], None]


class CudaUnavailableError(SSLCompressError):
    """CUDA was asked for where this torch cannot use it."""


# ---------------------------------------------------------------- results
def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class ContenderTiming:
    """One contender on one layer. samples_s: seconds per call, one sample per round (mean of `inner` calls)."""

    contender: str
    M: int  # the GEMM it actually ran (compact is smaller)
    K: int
    N: int
    nnz: int  # nonzeros of the weight operand it multiplies
    inner: int
    samples_s: tuple[float, ...]
    speedup: float  # dense median / this median
    paired_speedup: float  # median over rounds of dense / this in the same round
    mode: str = "eager"  # "graph": CUDA-graph replays of `inner` calls (kernel time, no launch overhead)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def q1_s(self) -> float:
        return _quantile(self.samples_s, 0.25)

    @property
    def q3_s(self) -> float:
        return _quantile(self.samples_s, 0.75)

    @property
    def min_s(self) -> float:
        return min(self.samples_s)


@dataclass(frozen=True)
class LayerTiming:
    """All contenders on one layer GEMM, timed in the same interleaved rounds."""

    name: str
    M: int
    K: int
    N: int
    nnz: int
    zero_rows: int
    zero_cols: int
    device: str
    threads: int | None
    backend: str
    timings: tuple[ContenderTiming, ...]

    def get(self, contender: str) -> ContenderTiming:
        for t in self.timings:
            if t.contender == contender:
                return t
        raise KeyError(contender)

    def speedup(self, contender: str) -> float:
        return self.get(contender).speedup

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.M * self.K)

    @property
    def row_sparsity(self) -> float:
        return self.zero_rows / self.M

    @property
    def col_sparsity(self) -> float:
        return self.zero_cols / self.K

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for t, src in zip(d["timings"], self.timings, strict=True):
            t.update(median_s=src.median_s, q1_s=src.q1_s, q3_s=src.q3_s, min_s=src.min_s)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerTiming:
        names = ContenderTiming.__dataclass_fields__
        timings = tuple(ContenderTiming(**{**{k: v for k, v in t.items() if k in names},
                                           "samples_s": tuple(t["samples_s"])}) for t in d["timings"])
        return cls(**{**{k: v for k, v in d.items() if k in cls.__dataclass_fields__}, "timings": timings})


def mean_speedup(timings: Iterable[LayerTiming], contender: str | Sequence[str]) -> float:
    """Arithmetic mean over layers (the paper's average); several contenders: the best per layer."""
    names = (contender,) if isinstance(contender, str) else tuple(contender)
    return statistics.fmean(max(t.speedup(c) for c in names if any(x.contender == c for x in t.timings))
                            for t in timings)


# ---------------------------------------------------------------- devices and threads
def resolve_device(device: str) -> torch.device:
    """torch.device for 'cpu' / 'cuda' / 'cuda:N'; a clear error where CUDA cannot be used."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"device {device!r} was requested but torch.cuda.is_available() is False (torch {torch.__version__},"
            f" CUDA build: {torch.version.cuda or 'none'}); run on a machine with an NVIDIA GPU and a CUDA"
            " build of torch, or use device 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


def scipy_available() -> bool:
    try:
        import scipy.sparse  # noqa: F401
    except ImportError:
        return False
    return True


def available_contenders(device: str = "cpu") -> tuple[str, ...]:
    if torch.device(device).type == "cuda":
        return DENSE, CSR, COMPACT
    return (DENSE, CSR, SCIPY_CSR, COMPACT) if scipy_available() else (DENSE, CSR, COMPACT)


@contextmanager
def pinned_threads(n: int | None):
    """torch intra-op threads = n, and numpy/scipy's BLAS pool too where threadpoolctl is installed."""
    if n is None:
        yield
        return
    if n < 1:
        raise ConfigError(f"threads must be at least 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        blas = nullcontext()
    else:
        blas = threadpool_limits(limits=n, user_api="blas")
    try:
        with blas:
            yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def fp32_matmul():
    """cuBLAS in true fp32 (no TF32), as the paper's sgemm."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):  # torch >= 2.9; do not mix with the legacy flag
        before = m.fp32_precision
        m.fp32_precision = "ieee"
        try:
            yield
        finally:
            m.fp32_precision = before
    else:
        before = m.allow_tf32
        m.allow_tf32 = False
        try:
            yield
        finally:
            m.allow_tf32 = before


def matmul_mode() -> str:
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        p = m.fp32_precision
        return "fp32 (TF32 off)" if p == "ieee" else f"fp32_precision={p}"
    return "fp32 (TF32 off)" if not m.allow_tf32 else "TF32 allowed"


def describe_backend(device: torch.device, threads: int | None) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return (f"cuda: {name}, torch {torch.__version__} CUDA {torch.version.cuda}; dense = cuBLAS"
                f" via torch.mm, {matmul_mode()}; csr = cuSPARSE via torch sparse CSR")
    mkl = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    n = threads if threads is not None else torch.get_num_threads()
    return f"cpu: torch {torch.__version__} ({mkl}), {n} thread(s); scipy_csr is single-threaded"


# ---------------------------------------------------------------- timing
@dataclass(frozen=True)
class _Op:
    fn: Callable[[], Any]
    dims: tuple[int, int, int]
    nnz: int
    rows: torch.Tensor | None  # rows of the dense product it equals (compact), None: all


def _ops(layer: LayerGemm, names: Sequence[str], dev: torch.device, gen: torch.Generator) -> dict[str, _Op]:
    w = torch.from_numpy(layer.weight).to(dev)
    x = torch.randn(layer.K, layer.N, generator=gen).to(dev)
    m, k, n = layer.M, layer.K, layer.N
    ops: dict[str, _Op] = {}
    for c in names:
        if c == DENSE:
            ops[c] = _Op(lambda: torch.mm(w, x), (m, k, n), layer.nnz, None)
        elif c == CSR:
            ws = w.to_sparse_csr()
            ops[c] = _Op(lambda ws=ws: torch.mm(ws, x), (m, k, n), layer.nnz, None)
        elif c == SCIPY_CSR:
            import scipy.sparse

            a, xn = scipy.sparse.csr_matrix(layer.weight), x.numpy()
            ops[c] = _Op(lambda a=a, xn=xn: a @ xn, (m, k, n), layer.nnz, None)
        elif c == COMPACT:
            rows = torch.from_numpy(layer.kept_rows).to(dev)
            cols = torch.from_numpy(layer.kept_cols).to(dev)
            wc = w.index_select(0, rows).index_select(1, cols).contiguous()
            xc = x.index_select(0, cols).contiguous()
            ops[c] = _Op(lambda wc=wc, xc=xc: torch.mm(wc, xc), (len(rows), len(cols), n),
                         int(torch.count_nonzero(wc)), rows)
    return ops


def _full(op: _Op, out: Any, m: int, like: torch.Tensor) -> torch.Tensor:
    out = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out)).to(like.device)
    if op.rows is None:
        return out
    full = torch.zeros(m, out.shape[1], dtype=out.dtype, device=out.device)
    return full.index_copy_(0, op.rows, out)


def _check(layer: LayerGemm, ops: dict[str, _Op]) -> None:
    ref = ops[DENSE].fn()
    tol = 1e-4 * float(ref.abs().max()) + 1e-6
    for c, op in ops.items():
        out = _full(op, op.fn(), layer.M, ref)
        if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-3, atol=tol):
            raise SSLCompressError(f"{layer.name}: contender {c} does not compute the dense product")


def contender_products(layer: LayerGemm, contenders: Sequence[str] | None = None, device: str = "cpu",
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Each contender's product W @ X as a full M x N tensor (compact's removed rows as zeros), to verify.

    X is the random matrix `study` would use for this layer as the first one with this seed.
    """
    dev = resolve_device(device)
    names = _names(contenders or available_contenders(device), dev)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_BETA)
        ops = _ops(layer, names, dev, torch.Generator().manual_seed(seed))
        ref = ops[DENSE].fn()
        return {c: _full(op, op.fn(), layer.M, ref) for c, op in ops.items()}


def _timed(fn: Callable[[], Any], inner: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - t0) / inner


def _graphed(fn: Callable[[], Any], calls: int) -> Callable[[], Any] | None:
    """One CUDA graph of `calls` back-to-back calls, replayed as a whole; None where fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # torch's capture recipe: warm up on a side stream first
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception:  # e.g. a library call that synchronises while capturing: time it eagerly instead
        torch.cuda.synchronize()
        return None
    return graph.replay


def _calibrate(op: _Op, warmup: int, sample_time: float, sync: Callable[[], None], graphs: bool
               ) -> tuple[Callable[[], Any], int, int, str]:
    """(callable to time, calls it makes, times to call it per sample, mode)."""
    for _ in range(warmup):
        op.fn()
    once = min(_timed(op.fn, 1, sync) for _ in range(3))
    per_sample = max(1, min(100_000, math.ceil(sample_time / max(once, 1e-7))))
    if graphs:
        calls = min(per_sample, 1000)
        replay = _graphed(op.fn, calls)
        if replay is not None:
            for _ in range(warmup):
                replay()
            once = min(_timed(replay, 1, sync) for _ in range(3))
            return replay, calls, max(1, math.ceil(sample_time / max(once, 1e-7))), "graph"
    return op.fn, 1, per_sample, "eager"


def _time_layer(layer: LayerGemm, names: Sequence[str], dev: torch.device, gen: torch.Generator, *, threads,
                backend: str, repeat: int, min_time: float, warmup: int, sample_time: float, check: bool,
                graphs: bool) -> LayerTiming:
    ops = _ops(layer, names, dev, gen)
    if check:
        _check(layer, ops)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    plan = {c: _calibrate(op, warmup, sample_time, sync, graphs and dev.type == "cuda") for c, op in ops.items()}
    samplers = {c: (lambda p=plan[c]: _timed(p[0], p[2], sync) / p[1]) for c in names}
    samples = rounds(samplers, min_rounds=repeat, min_time=min_time)  # rotating order: each takes each slot
    dense = samples[DENSE]
    timings = tuple(
        ContenderTiming(c, *ops[c].dims, ops[c].nnz, plan[c][1] * plan[c][2], tuple(samples[c]),
                        statistics.median(dense) / statistics.median(samples[c]),
                        statistics.median(d / s for d, s in zip(dense, samples[c], strict=True)), plan[c][3])
        for c in names)
    return LayerTiming(layer.name, layer.M, layer.K, layer.N, layer.nnz, layer.M - len(layer.kept_rows),
                       layer.K - len(layer.kept_cols), str(dev), threads, backend, timings)


def _names(contenders: Sequence[str], dev: torch.device) -> list[str]:
    names = [DENSE] + [c for c in dict.fromkeys(contenders) if c != DENSE]
    for c in names:
        if c not in CONTENDERS:
            raise ConfigError(f"unknown contender {c!r}; choose from {', '.join(CONTENDERS)}")
    if SCIPY_CSR in names and dev.type != "cpu":
        raise ConfigError("scipy_csr runs on the CPU only")
    if SCIPY_CSR in names and not scipy_available():
        raise ConfigError("contender scipy_csr needs scipy (pip install scipy), or leave it out")
    return names


def study(layers: Iterable[LayerGemm], contenders: Sequence[str] = (DENSE, CSR, COMPACT), *,
          device: str = "cpu", threads: int | None = None, repeat: int = 15, min_time: float = 0.0,
          warmup: int = 3, sample_time: float = 0.01, seed: int = 0, check: bool = True,
          cuda_graphs: bool = False, progress: Progress | None = None) -> list[LayerTiming]:
    """Time each layer's contenders in interleaved rounds; `dense` always runs, it is the baseline.

    Per layer: `warmup` untimed calls each, then rounds (at least `repeat`, and on until `min_time`
    seconds) in rotating order; a sample is the mean of enough back-to-back calls to last `sample_time`.
    On CUDA the device is synchronised before and after each sample and cuBLAS runs in fp32 (TF32 off); with
    `cuda_graphs` each contender's calls are captured in a CUDA graph and replayed, so a sample measures the
    GPU's work without Python and launch overhead (a contender that cannot be captured runs eagerly; see mode).
    `threads` sets torch's intra-op threads (and numpy's BLAS pool through threadpoolctl when installed)
    for the duration; None leaves them. With `check`, each contender's product is compared with dense first.
    """
    dev = resolve_device(device)
    names = _names(contenders, dev)
    if repeat < 1 or warmup < 0 or sample_time <= 0 or min_time < 0:
        raise ConfigError("repeat >= 1, warmup >= 0, sample_time > 0 and min_time >= 0 are required")
    layers = list(layers)
    gen = torch.Generator().manual_seed(seed)
    results: list[LayerTiming] = []
    with warnings.catch_warnings(), pinned_threads(threads), \
            fp32_matmul() if dev.type == "cuda" else nullcontext():
        warnings.filterwarnings("ignore", message=_CSR_BETA)
        backend = describe_backend(dev, threads) + ("; CUDA graphs" if cuda_graphs and dev.type == "cuda" else "")
        for i, layer in enumerate(layers):
            results.append(_time_layer(layer, names, dev, gen, threads=threads, backend=backend,
                                       repeat=repeat, min_time=min_time, warmup=warmup,
                                       sample_time=sample_time, check=check, graphs=cuda_graphs))
            if progress is not None:
                progress(i + 1, len(layers), results[-1])
    return results
