"""INT8 on top of structure: ONNX Runtime's static quantization of a float32 image model, scored before and after.

What `sslcompress quantize` runs. The model (dense or compact) is pre-processed as ORT recommends (shape
inference, graph optimisation), then quantized in the QDQ format (QuantizeLinear/DequantizeLinear around each
quantized op, which every execution provider reads), int8 weights per output channel, uint8 activations by ranges
calibrated on training images of the data set, normalised as in training and never augmented. Top-1 of the
float model and of the INT8 model on the same test images makes the report. Nothing here prints or writes a
file the caller did not ask for: the quantized model comes back as a ModelProto.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import ConfigError, UnsupportedModelError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Ops whose presence means the model is quantized already (QDQ pairs or QOperator kernels).
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                  "MatMulInteger", "DynamicQuantizeLinear"}
_CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class QuantizeResult:
    model: onnx.ModelProto
    report: dict[str, Any]


def check_quantizable(proto: onnx.ModelProto) -> tuple[str, tuple[int | None, ...]]:
    """The image input's name and shape; one clear sentence (UnsupportedModelError) for a model ORT's static
    quantization cannot take as it is."""
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"quantize takes a model with one image input; this one has {len(inputs)} "
                                    f"inputs ({', '.join(i.name for i in inputs)})")
    x = inputs[0]
    elem = x.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(f"quantize takes a float32 model; input {x.name!r} is "
                                    f"{onnx.TensorProto.DataType.Name(elem).lower()}")
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in x.type.tensor_type.shape.dim)
    if len(shape) != 4:
        raise UnsupportedModelError(f"quantize takes images (batch, C, H, W) or (batch, H, W, C); input {x.name!r} "
                                    f"has shape {['?' if d is None else d for d in shape]}")
    done = sorted({n.op_type for n in proto.graph.node} & _QUANTIZED_OPS)
    if done:
        raise UnsupportedModelError(f"the model is quantized already ({', '.join(done)}); quantize its float32 "
                                    "model instead")
    return x.name, shape


class _Images:
    """ORT's calibration reader over an array of images, one batch a call."""

    def __init__(self, name: str, x: np.ndarray, batch: int) -> None:
        self.name, self.x, self.batch, self.at = name, x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.at >= len(self.x):
            return None
        part = self.x[self.at:self.at + self.batch]
        self.at += self.batch
        return {self.name: part}

    def rewind(self) -> None:
        self.at = 0


def calibration_images(spec: str, shape: tuple[int | None, ...], count: int, seed: int = 0) -> np.ndarray:
    """`count` training images of the data set, normalised as in training, not augmented, in the model's
    input layout (channels last for a (batch, H, W, C) input)."""
    from .data import load_data
    from .data.layout import in_input_layout

    if count < 1:
        raise ConfigError(f"--calibration must be a positive number of images, got {count}")
    data = load_data(spec, limit_train=count, limit_test=1, seed=seed)
    x = np.concatenate([b.numpy() for b, _ in data.batches("train", 64, augment=False)]).astype(np.float32)
    return in_input_layout(x[:count], shape, data.name)


def quantize_model(proto: onnx.ModelProto, data: str, *, calibration: int = 256, test_images: int = 1000,
                   method: str = "minmax", per_channel: bool = True, seed: int = 0,
                   space_to_depth: bool | None = None) -> QuantizeResult:
    """The QDQ INT8 model of `proto` and its report: top-1 before and after on up to `test_images` test
    images of `data`, calibration on `calibration` of its training images. `space_to_depth`: as
    `quantize_qdq`."""
    _check_method(method)
    _, shape = check_quantizable(proto)
    fixed_batch = shape[0]
    calib = calibration_images(data, shape, calibration, seed)
    test = _test_images(data, shape, test_images, seed)
    t0 = time.perf_counter()
    quantized, notes = quantize_qdq(proto, calib, method=method, per_channel=per_channel,
                                    space_to_depth=space_to_depth)
    seconds = time.perf_counter() - t0
    before, after = (_top1(m, test, fixed_batch) for m in (proto, quantized))
    ops = {}
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    report = {"format": "QDQ", "weights": "int8 per channel" if per_channel else "int8 per tensor",
              "activations": "uint8", "reduced_range": reduced_range(),
              "calibration": {"images": len(calib), "method": method, "data": data},
              "accuracy": {"float32": before, "int8": after, "test_images": len(test.x) // (fixed_batch or 1)
                           * (fixed_batch or 1)},
              "nodes": {"before": len(proto.graph.node), "after": len(quantized.graph.node), **ops},
              "bytes": {"before": proto.ByteSize(), "after": quantized.ByteSize()},
              "seconds": seconds, "notes": notes}
    return QuantizeResult(quantized, report)


def quantize_qdq(proto: onnx.ModelProto, calibration: np.ndarray, *, method: str = "minmax",
                 per_channel: bool = True, space_to_depth: bool | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """The QDQ INT8 model of `proto`, activation ranges calibrated on the given images (normalised as in
    training, e.g. from `calibration_images`), and notes on what was skipped or rewritten; nothing scored.
    Callers that quantize several models of one shape (the bench's dense and structured) calibrate them on
    one array. `space_to_depth`: fold the stride of convolutions over a few channels (the stem) into the
    channels first (`space_to_depth.py`: the same sums, a faster integer kernel on x86); None folds on x86
    CPUs only, where it was measured."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .space_to_depth import quantize_before_space_to_depth, strided_convs_as_space_to_depth

    _check_method(method)
    name, shape = check_quantizable(proto)
    if space_to_depth is None:
        space_to_depth = _x86()
    with tempfile.TemporaryDirectory(prefix="sslcompress-quantize-") as tmp, _quiet_logging():
        src, pre, out = (Path(tmp) / f for f in ("float.onnx", "pre.onnx", "int8.onnx"))
        float_model, notes = shifts_as_adds(proto), []
        if space_to_depth:
            float_model, folded = strided_convs_as_space_to_depth(float_model)
            notes += [f"{f.conv}: stride {f.block} folded into the channels (SpaceToDepth), a stride-1 "
                      f"{f.kernel[0]}x{f.kernel[1]} conv over {f.channels} channels" for f in folded]
        onnx.save(float_model, src)
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(pre))
        except Exception as exc:  # noqa: BLE001 - ORT raises anything here; quantizing without it still works
            pre = src
            notes.append(f"pre-processing skipped: {str(exc).splitlines()[0][:200]}")
        reader = _Images(name, calibration, shape[0] or _CALIBRATION_BATCH)
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        try:
            quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=reduced_range(), calibrate_method=methods[method])
        except Exception as exc:  # noqa: BLE001 - one sentence for whatever ORT's quantizer raises
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UnsupportedModelError(f"ONNX Runtime could not quantize the model: {first[:300]}") from exc
        quantized = onnx.load(str(out))
        if space_to_depth:
            quantized, moved = quantize_before_space_to_depth(quantized)
            notes += ["SpaceToDepth moved behind the quantization it fed: it shuffles uint8"] * bool(moved)
        return quantized, notes


def shifts_as_adds(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model with every BatchNormalization that only shifts (scale 1, mean 0, variance 1,
    epsilon 0, all initializers: how the cut adds a constant residual branch in float32, for ORT's blocked
    float layout) written as the Add of a (1, C, 1, 1) constant: the same sum, and an op ORT's quantizer
    makes an integer kernel (QLinearAdd), where a BatchNormalization stays float between a DequantizeLinear
    and a QuantizeLinear, with layout transposes around it."""
    inits = {t.name: t for t in proto.graph.initializer}

    def values(name: str) -> np.ndarray | None:
        t = inits.get(name)
        return None if t is None else onnx.numpy_helper.to_array(t)

    ranks = _ranks(proto)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph, nodes, dropped = out.graph, [], set()
    for node in proto.graph.node:  # the original's nodes: the copy's are cleared below, these are copied back
        nodes.append(node)
        if (node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 5
                or len(node.output) != 1):
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale, shift, mean, var = (values(n) for n in node.input[1:5])
        rank = ranks.get(node.input[0])
        if eps != 0 or rank is None or rank < 2 or any(v is None for v in (scale, shift, mean, var)):
            continue
        if not ((scale == 1).all() and (mean == 0).all() and (var == 1).all()) or shift.ndim != 1:
            continue
        name = f"{node.name or node.output[0]}.shift"
        graph.initializer.append(onnx.numpy_helper.from_array(shift.reshape((1, -1) + (1,) * (rank - 2)), name))
        nodes[-1] = onnx.helper.make_node("Add", [node.input[0], name], list(node.output), name=node.name)
        dropped.update(node.input[1:5])
    if not dropped:
        return proto
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name not in dropped or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out


def _ranks(proto: onnx.ModelProto) -> dict[str, int]:
    """The rank of every value shape inference can tell (graph inputs and outputs included)."""
    from .onnx_names import value_shapes

    return {name: len(shape) for name, shape in value_shapes(proto).items()}


def _x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def reduced_range() -> bool:
    """Whether weights keep 7 bits: uint8 activations times int8 weights (U8S8, what ORT's x86 kernels run
    fastest: on ResNet-18 every conv and residual Add becomes an integer kernel, where int8 activations left
    11 of 20 convs in float between QDQ pairs) can saturate the 16-bit sums of AVX2/AVX-512 without VNNI,
    so there the weights lose a bit, as ORT advises; VNNI and other CPUs keep all 8."""
    from .runtime.cpu import has_vnni

    return _x86() and not has_vnni()


def _check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """ORT's quantizer logs its per-tensor decisions through the root logger; the library never talks."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _test_images(data: str, shape, limit: int, seed: int):
    from .bench.accuracy import load_test_images

    return load_test_images(data, shape, limit=limit, seed=seed)


def _top1(proto: onnx.ModelProto, images, static_batch: int | None) -> float:
    from .bench.accuracy import top1
    from .runtime import create_session

    correct, counted = top1(create_session(proto.SerializeToString()), images, static_batch)
    return correct / counted
