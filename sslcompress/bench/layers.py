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
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sslcompress.errors import ConfigError, SSLCompressError

DENSE, CSR, SCIPY_CSR, COMPACT = "dense", "csr", "scipy_csr", "compact"
CONTENDERS = (DENSE, CSR, SCIPY_CSR, COMPACT)
_CSR_BETA = ".*[Ss]parse CSR tensor support is in beta.*"
Progress = Callable[[int, int, "LayerTiming"], None]


class CudaUnavailableError(SSLCompressError):
    """CUDA was asked for where this torch cannot use it."""


# ---------------------------------------------------------------- lowering a conv to a GEMM
def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        return int(v), int(v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ConfigError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _pads(pad: Any) -> tuple[int, int, int, int]:
    """int, (ph, pw) or ONNX-ordered (top, left, bottom, right)."""
    if isinstance(pad, int | np.integer):
        return (int(pad),) * 4  # type: ignore[return-value]
    t = tuple(int(x) for x in pad)
    if len(t) == 2:
        return t[0], t[1], t[0], t[1]
    if len(t) == 4:
        return t  # type: ignore[return-value]
    raise ConfigError(f"pads must be an int, a pair or (top, left, bottom, right), got {pad!r}")


@dataclass(frozen=True)
class ConvShape:
    """A 2-D convolution's geometry: all that sizes its lowered GEMM."""

    name: str
    out_channels: int
    in_channels: int  # all of them, not per group
    kernel: tuple[int, int]
    input_hw: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, name: str, out_channels: int, in_channels: int, kernel: Any, input_hw: Any,
           stride: Any = 1, pad: Any = 0, dilation: Any = 1, groups: int = 1) -> ConvShape:
        if groups < 1 or out_channels % groups or in_channels % groups:
            raise ConfigError(f"{name}: {out_channels} and {in_channels} channels do not split into {groups} groups")
        return cls(name, int(out_channels), int(in_channels), _pair(kernel), _pair(input_hw),
                   _pair(stride), _pads(pad), _pair(dilation), int(groups))

    @property
    def output_hw(self) -> tuple[int, int]:
        t, left, b, r = self.pads
        ho = (self.input_hw[0] + t + b - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (self.input_hw[1] + left + r - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        if ho < 1 or wo < 1:
            raise ConfigError(f"{self.name}: the kernel does not fit the {self.input_hw} input")
        return ho, wo

    def gemm_dims(self, batch: int = 1) -> tuple[int, int, int]:
        """(M, K, N) of one group's GEMM; a grouped conv runs `groups` of them."""
        ho, wo = self.output_hw
        m = self.out_channels // self.groups
        k = self.in_channels // self.groups * self.kernel[0] * self.kernel[1]
        return m, k, ho * wo * batch


def im2col(x: torch.Tensor, kernel: Any, stride: Any = 1, pad: Any = 0, dilation: Any = 1) -> torch.Tensor:
    """(B, C, H, W) -> (C*kh*kw, B*Ho*Wo), rows in the weight's (c, i, j) order, columns image by image."""
    t, left, b, r = _pads(pad)
    if t or left or b or r:
        x = F.pad(x, (left, r, t, b))
    cols = F.unfold(x, _pair(kernel), dilation=_pair(dilation), stride=_pair(stride))  # (B, K, L)
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1)


def conv_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
                 pad: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    """conv2d computed as the lowered GEMMs the study times (one per group)."""
    b, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    shape = ConvShape.of("conv", o, c, (kh, kw), (h, w), stride, pad, dilation, groups)
    ho, wo = shape.output_hw
    og = o // groups
    outs = [weight[g * og:(g + 1) * og].reshape(og, -1)
            @ im2col(x[:, g * cg:(g + 1) * cg], (kh, kw), stride, pad, dilation) for g in range(groups)]
    y = torch.cat(outs, 0)
    if bias is not None:
        y = y + bias[:, None]
    return y.reshape(o, b, ho, wo).permute(1, 0, 2, 3)


@dataclass(frozen=True)
class LayerGemm:
    """One lowered GEMM to time: weight (M x K, float32, zeros as the layer has them) times X (K x N)."""

    name: str
    M: int
    K: int
    N: int
    weight: np.ndarray = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        w = np.ascontiguousarray(self.weight, dtype=np.float32)
        if w.shape != (self.M, self.K) or self.N < 1:
            raise ConfigError(f"{self.name}: weight {w.shape} does not match M x K = {self.M} x {self.K}, N = {self.N}")
        object.__setattr__(self, "weight", w)

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.weight))

    @property
    def kept_rows(self) -> np.ndarray:
        return np.flatnonzero(self.weight.any(axis=1))

    @property
    def kept_cols(self) -> np.ndarray:
        return np.flatnonzero(self.weight.any(axis=0))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.weight.size


@dataclass(frozen=True)
class ConvSpec:
    """A real conv to study: weight (O, C/groups, kh, kw) and the input size it sees."""

    name: str
    weight: np.ndarray = field(repr=False, compare=False)
    input_hw: Any = 1
    stride: Any = 1
    pad: Any = 0
    dilation: Any = 1
    groups: int = 1

    def shape(self) -> ConvShape:
        o, cg, kh, kw = np.shape(self.weight)
        return ConvShape.of(self.name, o, cg * self.groups, (kh, kw), self.input_hw, self.stride, self.pad,
                            self.dilation, self.groups)


def lower_convs(convs: Iterable[ConvSpec | Sequence[Any]], batch: int = 1) -> list[LayerGemm]:
    """Layer GEMMs from (name, weight, input_hw, stride, pad[, dilation, groups]) items.

    A grouped conv gives one GEMM per group, named `name[gI]` (a depthwise conv gives many tiny ones).
    """
    out: list[LayerGemm] = []
    for item in convs:
        spec = item if isinstance(item, ConvSpec) else ConvSpec(*item)
        w = np.asarray(spec.weight, dtype=np.float32)
        if w.ndim != 4:
            raise ConfigError(f"{spec.name}: a conv weight has 4 axes, got shape {w.shape}")
        shape = spec.shape()
        m, k, n = shape.gemm_dims(batch)
        for g in range(shape.groups):
            name = spec.name if shape.groups == 1 else f"{spec.name}[g{g}]"
            out.append(LayerGemm(name, m, k, n, w[g * m:(g + 1) * m].reshape(m, k)))
    return out


# ---------------------------------------------------------------- imposing sparsity
def _count(fraction: float, n: int) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"a sparsity is a fraction in [0, 1], got {fraction}")
    return min(n, math.floor(fraction * n + 0.5))


def magnitude_prune(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Copy with exactly round(sparsity * size) smallest-magnitude entries zeroed (ties by position)."""
    w = np.array(weight, dtype=np.float32, copy=True, order="C")
    n_zero = _count(sparsity, w.size)
    if n_zero:
        w.reshape(-1)[np.argsort(np.abs(w), axis=None, kind="stable")[:n_zero]] = 0.0
    return w


def structured_prune(weight: np.ndarray, row_sparsity: float, col_sparsity: float) -> np.ndarray:
    """Copy of a lowered (M x K) weight with its weakest rows, then its weakest columns, zeroed (L2 norm).

    Exactly round(r*M) zero rows and round(c*K) zero columns when the input has none and not every row goes.
    """
    w = np.array(weight, dtype=np.float32, copy=True, order="C")
    m, k = w.shape
    w[np.argsort(np.sqrt((w * w).sum(axis=1)), kind="stable")[:_count(row_sparsity, m)]] = 0.0
    w[:, np.argsort(np.sqrt((w * w).sum(axis=0)), kind="stable")[:_count(col_sparsity, k)]] = 0.0
    return w


def random_weight(m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((m, k)) / math.sqrt(k)).astype(np.float32)


# ---------------------------------------------------------------- the paper's Table 4
@dataclass(frozen=True)
class PaperRow:
    """One AlexNet conv layer in Wen et al. 2016, Table 4 (speed-ups of that layer's GEMM)."""

    layer: str
    l1_sparsity: float
    col_sparsity: float
    row_sparsity: float
    cpu_l1: float
    cpu_ssl: float
    gpu_l1: float
    gpu_ssl: float


TABLE4 = (
    PaperRow("conv1", 0.676, 0.000, 0.094, 0.80, 1.05, 0.25, 1.00),
    PaperRow("conv2", 0.924, 0.632, 0.129, 2.91, 3.37, 0.52, 2.37),
    PaperRow("conv3", 0.972, 0.769, 0.406, 4.84, 6.27, 1.38, 4.94),
    PaperRow("conv4", 0.966, 0.847, 0.469, 3.83, 9.73, 1.04, 4.03),
    PaperRow("conv5", 0.943, 0.807, 0.000, 2.76, 4.93, 1.36, 3.05),
)
# The abstract's rounded claims: SSL averages 5.1x (CPU) and 3.1x (GPU); about 1.7x / 3.4x over l1.
PAPER_HEADLINE = {"cpu_ssl": 5.1, "gpu_ssl": 3.1, "cpu_ssl_over_l1": 1.7, "gpu_ssl_over_l1": 3.4}

# torchvision's AlexNet (224x224, no groups: each layer is one GEMM; the layout this package's models and
# ONNX exports use) and Caffe's bvlc_alexnet (227x227, conv2/4/5 in 2 groups), which the paper timed.
ALEXNET_SHAPES: dict[str, tuple[ConvShape, ...]] = {
    "torchvision": (
        ConvShape.of("conv1", 64, 3, 11, 224, stride=4, pad=2),
        ConvShape.of("conv2", 192, 64, 5, 27, pad=2),
        ConvShape.of("conv3", 384, 192, 3, 13, pad=1),
        ConvShape.of("conv4", 256, 384, 3, 13, pad=1),
        ConvShape.of("conv5", 256, 256, 3, 13, pad=1),
    ),
    "caffe": (
        ConvShape.of("conv1", 96, 3, 11, 227, stride=4),
        ConvShape.of("conv2", 256, 96, 5, 27, pad=2, groups=2),
        ConvShape.of("conv3", 384, 256, 3, 13, pad=1),
        ConvShape.of("conv4", 384, 384, 3, 13, pad=1, groups=2),
        ConvShape.of("conv5", 256, 384, 3, 13, pad=1, groups=2),
    ),
}


def paper_mean(column: str) -> float:
    """Arithmetic mean over conv1..conv5 of a Table 4 column (cpu_l1, cpu_ssl, gpu_l1, gpu_ssl)."""
    return statistics.fmean(getattr(row, column) for row in TABLE4)


def table4_layers(shapes: str = "torchvision", batch: int = 1, seed: int = 0
                  ) -> tuple[list[LayerGemm], list[LayerGemm]]:
    """(l1 layers, SSL layers): AlexNet's conv GEMMs with Table 4's sparsities imposed on one random weight.

    l1 zeros are placed by magnitude on random weights (so at random places); SSL zeros whole rows and
    columns. For a grouped (Caffe) layer, one group's GEMM stands for the layer: all groups have its shape.
    """
    if shapes not in ALEXNET_SHAPES:
        raise ConfigError(f"unknown AlexNet shapes {shapes!r}; choose from {sorted(ALEXNET_SHAPES)}")
    if batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    rng = np.random.default_rng(seed)
    l1, ssl = [], []
    for shape, row in zip(ALEXNET_SHAPES[shapes], TABLE4, strict=True):
        m, k, n = shape.gemm_dims(batch)
        w = random_weight(m, k, rng)
        l1.append(LayerGemm(row.layer, m, k, n, magnitude_prune(w, row.l1_sparsity)))
        ssl.append(LayerGemm(row.layer, m, k, n, structured_prune(w, row.row_sparsity, row.col_sparsity)))
    return l1, ssl


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
    samples: dict[str, list[float]] = {c: [] for c in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        start, r = time.perf_counter(), 0
        while r < repeat or time.perf_counter() - start < min_time:
            k = r % len(names)  # rotate the order so that each contender takes each slot
            for c in (*names[k:], *names[:k]):
                fn, calls, reps, _ = plan[c]
                samples[c].append(_timed(fn, reps, sync) / calls)
            r += 1
    finally:
        if gc_was:
            gc.enable()
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
