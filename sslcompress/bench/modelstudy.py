"""The per-layer study on a model's own convs: each conv of the three variants lowered to one GEMM.

For every group-1 2-D Conv of the dense model, with weight W (M filters x K = C*kh*kw) and N = Ho*Wo*batch:

    dense      torch.mm, the dense GEMM (its time does not depend on the values, zeros or not)
    csr        torch sparse CSR of the unstructured variant's W (same shape, its zeros) x X
    scipy_csr  the same with scipy (CPU)
    compact    torch.mm of the structured variant's weight for that layer (M' x K': the filters and
               input channels the surgery kept) x the K' rows of X it reads

Two rounds of `layers.study` per layer: (dense, csr, scipy_csr) on the unstructured weight, then
(dense, compact) on the structured weight placed in the corner of an M x K matrix (so the study's own
compact contender runs exactly the M' x K' GEMM and checks it against the dense product). Each study is
interleaved round by round and its dense contender is its own baseline (see `embed` for compact rows that
are zero all the same). Weights come from the ONNX initializers (BatchNorm already folded), input sizes
from ONNX shape inference. Grouped and depthwise convs are listed as skipped. On CUDA (cuBLAS vs cuSPARSE
through torch) each contender's calls are replayed from a CUDA graph where they can be captured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import layers as L
from .variants import weight_layers

StudyProgress = Callable[[str], None]


@dataclass(frozen=True)
class LayerStudy:
    """One conv of the model at one (device, threads, batch)."""

    name: str
    device: str
    threads: int | None
    batch: int
    M: int
    K: int
    N: int
    compact: tuple[int, int] | None  # the structured layer's GEMM (M', K'); None: the surgery removed it
    unstructured: L.LayerTiming  # dense, csr[, scipy_csr] on the unstructured weight
    structured: L.LayerTiming | None  # dense, compact on the structured weight; None when removed

    @property
    def sparsity(self) -> float:
        """Zeros of the unstructured weight."""
        return self.unstructured.sparsity

    @property
    def ideal(self) -> float | None:
        """MACs of the dense GEMM over the compact one."""
        if self.compact is None:
            return None
        return self.M * self.K / max(1, self.compact[0] * self.compact[1])

    def speedup(self, contender: str) -> float | None:
        """dense median / contender median within the study that timed it; None where not timed."""
        for t in (self.unstructured, self.structured):
            if t is not None and any(c.contender == contender for c in t.timings) and contender != L.DENSE:
                return t.speedup(contender)
        return None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["compact"] = list(self.compact) if self.compact else None
        d["unstructured"] = self.unstructured.to_dict()
        d["structured"] = self.structured.to_dict() if self.structured else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerStudy:
        kw = {f.name: d[f.name] for f in fields(cls)}
        kw["compact"] = tuple(d["compact"]) if d["compact"] else None
        kw["unstructured"] = L.LayerTiming.from_dict(d["unstructured"])
        kw["structured"] = L.LayerTiming.from_dict(d["structured"]) if d["structured"] else None
        return cls(**kw)


@dataclass(frozen=True)
class ConvInfo:
    name: str
    spec: L.ConvSpec
    shape: L.ConvShape


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def model_convs(proto: onnx.ModelProto) -> tuple[dict[str, ConvInfo], dict[str, str]]:
    """({name: conv} for group-1 2-D Convs with a constant weight, {name: why skipped} for the other Convs)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    inits = {t.name: t for t in proto.graph.initializer}
    convs: dict[str, ConvInfo] = {}
    skipped: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        name = node.name or node.output[0]
        if len(node.input) < 2 or node.input[1] not in inits:
            skipped[name] = "weight is not a constant"
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        a = _attrs(node)
        x = shapes.get(node.input[0]) or []
        if w.ndim != 4:
            skipped[name] = f"{w.ndim - 2}-D conv"
        elif int(a.get("group", 1)) != 1:
            skipped[name] = f"grouped conv ({a.get('group')} groups)"
        elif a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            skipped[name] = "auto_pad"
        elif len(x) != 4 or x[2] is None or x[3] is None:
            skipped[name] = "input size unknown"
        else:
            spec = L.ConvSpec(name, w, (x[2], x[3]), tuple(a.get("strides", (1, 1))),
                              tuple(a.get("pads", (0, 0, 0, 0))), tuple(a.get("dilations", (1, 1))))
            convs[name] = ConvInfo(name, spec, spec.shape())
    return convs, skipped


def compact_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The structured model's lowered weights (M' x K') by node name: Conv weights, and lowered MatMuls'."""
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for name, (op, w) in weight_layers(proto).items():
        if op in ("Conv", "MatMul"):
            arr = np.array(numpy_helper.to_array(inits[w]))  # a writable copy: torch shares its memory
            if op == "Conv" and arr.ndim == 4:
                out[name] = arr.reshape(arr.shape[0], -1)
            elif op == "MatMul" and arr.ndim == 2 and inits.get(w) is not None:
                out[name] = arr
    return out


def _weights_by_name(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: t for t in proto.graph.initializer}
    return {name: np.array(numpy_helper.to_array(inits[w])) for name, (op, w) in weight_layers(proto).items()
            if op == "Conv"}


def embed(compact: np.ndarray, m: int, k: int) -> np.ndarray:
    """An M x K weight whose nonzero rows and columns are exactly the M' x K' compact weight's.

    A row or column of the compact weight that is zero all the same (a filter kept alive by a residual
    coupling) is still computed by the structured model, so it gets a token nonzero: the study's compact
    contender then multiplies exactly M' x K', as ONNX Runtime does. Timing does not depend on the values.
    """
    mc, kc = compact.shape
    out = np.zeros((m, k), dtype=np.float32)
    out[:mc, :kc] = compact
    block = out[:mc, :kc]
    block[~block.any(axis=1), 0] = 1e-3
    block[0, ~block.any(axis=0)] = 1e-3
    return out


def study_model(dense: onnx.ModelProto, unstructured: onnx.ModelProto, structured: onnx.ModelProto, *,
                threads: Sequence[int | None] = (1,), devices: Sequence[str] = ("cpu",), batch: int = 1,
                repeat: int = 10, warmup: int = 2, sample_time: float = 0.005, seed: int = 0,
                say: StudyProgress | None = None) -> tuple[list[LayerStudy], dict[str, str]]:
    """Every group-1 conv, per device and thread count; returns (rows, {conv: why skipped})."""
    convs, skipped = model_convs(dense)
    unstr = _weights_by_name(unstructured)
    compact = compact_weights(structured)
    # A layer is removed when the structured model lost it while keeping the others' names; with no name in
    # common the models were named apart, and "removed" would be a guess.
    removed = set(convs) - set(compact) if set(convs) & set(compact) else set()
    jobs: list[tuple[ConvInfo, np.ndarray, np.ndarray | None]] = []
    for name, c in convs.items():
        m, k, n = c.shape.gemm_dims(batch)
        w = unstr.get(name)
        if w is None or w.size != m * k:
            skipped[name] = "no conv of this name and shape in the unstructured model"
            continue
        wc = compact.get(name)
        if wc is None and name not in removed:
            skipped[name] = "no layer of this name in the structured model (neither kept nor removed by the surgery)"
            continue
        if wc is not None and (wc.shape[0] > m or wc.shape[1] > k):
            skipped[name] = f"the structured layer ({wc.shape[0]} x {wc.shape[1]}) is larger than the dense one"
            continue
        jobs.append((c, w.reshape(m, k), wc))
    rows: list[LayerStudy] = []
    for device in devices:
        csr = tuple(x for x in L.available_contenders(device) if x != L.COMPACT)
        for t in (threads if device == "cpu" else (None,)):  # CPU threads only launch the GPU's work
            for i, (c, w, wc) in enumerate(jobs):
                if say is not None:
                    say(f"{device}, {t or 'default'} thread(s): {c.name} ({i + 1}/{len(jobs)})")
                m, k, n = c.shape.gemm_dims(batch)
                # On CUDA each contender's calls replay from a CUDA graph: the GPU's own time, not the launches'
                # (a small GEMM on a recent GPU is bound by the launch); see `mode` in each timing.
                opts = dict(device=device, threads=t, repeat=repeat, warmup=warmup, sample_time=sample_time,
                            seed=seed, cuda_graphs=device != "cpu")
                u = L.study([L.LayerGemm(c.name, m, k, n, w)], csr, **opts)[0]
                s = None
                if wc is not None:
                    s = L.study([L.LayerGemm(c.name, m, k, n, embed(wc, m, k))], (L.DENSE, L.COMPACT), **opts)[0]
                rows.append(LayerStudy(c.name, device, t, batch, m, k, n,
                                       tuple(wc.shape) if wc is not None else None, u, s))
    return rows, skipped
