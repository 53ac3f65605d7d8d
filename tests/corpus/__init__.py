"""A corpus of ONNX models as users bring them, each with planted structured zeros and a record of them.

Every entry is an uncut ONNX model (a `ModelProto`, or a path where the model must be read from
disk, e.g. with external data) and, per weighted layer (Conv, ConvTranspose, Gemm or a MatMul
with a constant weight), numbered in the order the uncut graph lists them, the number of output
channels the compact model must keep. Exporters name nodes differently but all list the layers
in forward order, so a layer is known by its index here; in the compact model it is found by
node name where the surgery kept the name, else by order among the layers that must survive.

Builders live in `tests/corpus/torch_models.py` (our own torch nets through every exporter and
export option), `tests/corpus/detector.py` (a one-stage detector: feature pyramid, a head shared by the
levels, NMS, QDQ) and `tests/corpus/handwritten.py` (graphs written with onnx.helper).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops through which a weight stays a constant: the legacy exporter's deduplicated initializers
# (Identity), QDQ weights (DequantizeLinear), fp16 conversions (Cast), layout changes.
CONSTANT_THROUGH = ("Identity", "DequantizeLinear", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze")


@dataclass
class Entry:
    """One corpus model and what its compact model must look like.

    planted: layer index -> the output channels whose filters (and bias, BN gamma/beta) were zeroed;
    expect: layer index -> output channels the compact model keeps, for every layer that survives;
    expect_in: layer index -> input channels (features for a Gemm after a flatten) it keeps;
    removed: layer indexes that must be gone (a zeroed residual branch);
    dims: concrete sizes for symbolic input dimensions, by symbol name (a symbolic batch is 2);
    compress_inputs: real batches for `compress(inputs=...)`, only where the model's spatial size
    is dynamic (the documented way to verify such a model);
    rtol: output tolerance relative to max |output| (1e-4 for fp32).
    """

    name: str
    model: onnx.ModelProto
    planted: dict[int, tuple[int, ...]]
    expect: dict[int, int]
    expect_in: dict[int, int] = field(default_factory=dict)
    removed: frozenset[int] = frozenset()
    path: Path | None = None
    dims: dict[str, int] = field(default_factory=dict)
    compress_inputs: list[np.ndarray] | None = None
    rtol: float = 1e-4
    note: str = ""

    @property
    def source(self) -> onnx.ModelProto | str:
        """What `compress` gets: the path where the model lives on disk, else the proto."""
        return str(self.path) if self.path is not None else self.model


# ---------------------------------------------------------------- reading layers


@dataclass(frozen=True)
class Layer:
    index: int
    name: str
    op: str
    out_channels: int
    in_channels: int
    output: str  # the node's output value
    channel_axis: int  # of that output: 1 for Conv, -1 for Gemm / MatMul


def _constants(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of every value that is a constant: initializers, Constant nodes and what the
    CONSTANT_THROUGH ops make of constants only (their shape from shape inference)."""
    g = model.graph
    shapes: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in g.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
        elif node.op_type in CONSTANT_THROUGH and node.input and all(i in shapes for i in node.input if i):
            v = known.get(node.output[0])
            if v is not None and v.type.tensor_type.HasField("shape"):
                shapes[node.output[0]] = tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
    return shapes


def weighted_layers(model: onnx.ModelProto) -> list[Layer]:
    """Conv / ConvTranspose / Gemm / MatMul nodes whose weight is a constant, in graph order."""
    consts = _constants(model)
    out: list[Layer] = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED or len(node.input) < 2 or node.input[1] not in consts:
            continue
        w = consts[node.input[1]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            cout, cin, axis = w[0], w[1] * int(attrs.get("group", 1)), 1
        elif node.op_type == "ConvTranspose":
            cout, cin, axis = w[1] * int(attrs.get("group", 1)), w[0], 1
        elif node.op_type == "Gemm":
            cout, cin = (w[0], w[1]) if attrs.get("transB", 0) else (w[1], w[0])
            axis = -1
        else:
            cout, cin, axis = w[-1], w[-2], -1
        out.append(Layer(len(out), node.name, node.op_type, int(cout), int(cin), node.output[0], axis))
    return out


def layer_problems(before: onnx.ModelProto, after: onnx.ModelProto, entry: Entry) -> list[str]:
    """What the compact model gets wrong about the entry's record, one line each (empty: nothing).

    Uncut layers are found in the compact model by node name where every layer of both models
    has a unique, non-empty name and every layer that must survive kept it; else by order among
    the layers that must survive, which needs the compact model to have exactly that many."""
    lb, la = weighted_layers(before), weighted_layers(after)
    by_name = {lay.name: lay for lay in la}
    survivors = [lay for lay in lb if lay.index not in entry.removed]
    names_ok = (
        all(lay.name for lay in lb + la)
        and len({lay.name for lay in lb}) == len(lb)
        and len(by_name) == len(la)
        and all(lay.name in by_name for lay in survivors)
    )
    problems = []
    if names_ok:
        found = {lay.index: by_name[lay.name] for lay in survivors}
        kept = [lay for lay in lb if lay.index in entry.removed and lay.name in by_name]
        problems += [f"layer {lay.index} ({lay.op} {lay.name!r}) must be gone, it is still there" for lay in kept]
        extra = len(la) - len(survivors) - len(kept)
        if extra:
            problems.append(f"the compact model has {extra} weighted layers more than the uncut one")
    elif len(la) == len(survivors):
        found = {b.index: a for b, a in zip(survivors, la, strict=True)}
    else:
        return [f"{len(survivors)} weighted layers must survive (uncut {len(lb)}, removed {sorted(entry.removed)}), "
                f"the compact model has {len(la)}: {_table(lb, la)}"]
    for i, lay in sorted(found.items()):
        want_out, want_in = entry.expect.get(i), entry.expect_in.get(i)
        if (want_out is not None and lay.out_channels != want_out) or (want_in is not None and lay.in_channels != want_in):
            problems.append(f"layer {i} ({lay.op} {lay.name!r}): {lay.in_channels}->{lay.out_channels} channels, "
                            f"want {want_in if want_in is not None else lay.in_channels}->{want_out}")
    return problems


def _table(lb: list[Layer], la: list[Layer]) -> str:
    def row(lays):
        return ", ".join(f"{x.index}:{x.op}({x.name or '-'}) {x.in_channels}->{x.out_channels}" for x in lays)

    return f"uncut [{row(lb)}]; compact [{row(la)}]"


# ---------------------------------------------------------------- running


_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
}


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (exports may list initializers as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def feeds(model: onnx.ModelProto, dims: dict[str, int], seed: int, batch: int = 2) -> dict[str, np.ndarray]:
    """Random standard-normal feeds, each of its input's declared dtype and shape."""
    rng = np.random.default_rng(seed)
    out = {}
    for v in real_inputs(model):
        tt = v.type.tensor_type
        shape = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(dims[d.dim_param])
            elif i == 0:
                shape.append(batch)
            else:
                raise AssertionError(f"input {v.name!r}: give a size for dynamic dim {i} ({d.dim_param!r})")
        out[v.name] = rng.standard_normal(shape).astype(_NP[tt.elem_type])
    return out


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = session(model)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, feed), strict=True))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy whose graph also outputs the named intermediate values (types from shape inference)."""
    m = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in m.graph.value_info}
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(known[n])
    return m
