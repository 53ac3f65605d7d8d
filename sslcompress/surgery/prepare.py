"""Passes that make a graph readable, whoever wrote it: constants become initializers.

Exporters make weights and shapes with nodes: torch's legacy exporter turns bit-identical
initializers into ``Identity`` nodes (every zero bias, every wholly zeroed layer of one shape),
``F.pad`` builds its pads from ``ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose ->
Reshape -> Cast``, converters ``Cast``, ``Reshape`` or ``Transpose`` weights and scale BatchNorm
through ``Unsqueeze`` of per-channel constants, and older files (IR 3) list every initializer as a
graph input. The channel analysis reads constants only, so these passes fold all of that first:

1. initializer-backed graph inputs become plain initializers (and unused ones go);
2. Constant nodes become initializers (shape inference reads shape operands only from those), and
   initializers read from the file become arrays once: the passes read every weight several times,
   and a tensor still backed by the ModelProto copies its bytes out on every read;
3. shapes are inferred;
4. entries of ``Shape`` that are static become constants (``x.size(1)`` with a dynamic batch);
5. onnxscript's constant folding, with its size limits lifted so weights fold too (quantize
   and dequantize nodes are kept: they are the model's quantization, not arithmetic to fold);
6. Identity nodes and whatever no output needs go; shapes are inferred again.

Every step computes what the graph computed: a folded node is evaluated on its constant inputs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from .head_round_trips import HeadRoundTripPass
from .ops.base import const_tensor, refine_shape
from .ops.dims import shape_vector
from .window_sizes import WindowSizesPass

log = logging.getLogger(__name__)

_KEEP = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
_SMALL = 1 << 16  # elements: a ConstantOfShape up to this size is shape arithmetic, not a tensor to store


def _should_fold(node: ir.Node) -> bool | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in _KEEP:
        return False
    if node.op_type == "ConstantOfShape":
        shape = const_tensor(node.inputs[0]) if node.inputs else None
        return shape is not None and int(np.prod(shape)) <= _SMALL
    return None


class InitializerInputsPass(ir.passes.InPlacePass):
    """Graph inputs that are initializers (IR < 4 lists every one) become plain initializers; those
    nothing reads are dropped with the rest of the unused ones."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = common.RemoveInitializersFromInputsPass()(model)
        if result.modified and model.ir_version < 4:
            model.ir_version = 4  # the first IR version whose initializers need not be inputs
        return ir.passes.PassResult(model, result.modified)


class ArrayInitializersPass(ir.passes.InPlacePass):
    """Initializers that still read their bytes from the ModelProto (``raw_data``, a dtype with a numpy
    type) become arrays, read once. The arrays are read-only, as every read of ``raw_data`` is; the
    values and their bytes are the same, so the model is unchanged."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for v in model.graph.initializers.values():
            t = v.const_value
            if not isinstance(t, ir.serde.TensorProtoTensor) or t.dtype not in _ARRAY_DTYPES \
                    or not t.raw.HasField("raw_data"):
                continue
            array = t.numpy()
            array.flags.writeable = False
            v.const_value = ir.Tensor(array, dtype=t.dtype, name=t.name, doc_string=t.doc_string or None,
                                      metadata_props=dict(t.metadata_props) or None)
            modified = True
        return ir.passes.PassResult(model, modified)


_ARRAY_DTYPES = frozenset({
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BOOL, ir.DataType.INT8,
    ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32,
    ir.DataType.INT64, ir.DataType.UINT64,
})


class StaticDimsPass(ir.passes.InPlacePass):
    """``Gather(Shape(x), i)`` and ``Slice`` of a Shape whose entries are static become constants, so
    ``x.size(1)`` reads as the number it is even where the batch is dynamic."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type not in ("Gather", "Slice") or node.domain not in ("", "ai.onnx"):
                continue
            if not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
                continue  # replaced by an earlier run of this pass: nothing reads it any more
            entries = _static_shape_entries(node)
            if entries is None:
                continue
            out = node.outputs[0]
            value = ir.Value(name=f"{out.name}.static", shape=ir.Shape(entries.shape),
                             type=ir.TensorType(ir.DataType.INT64), const_value=ir.tensor(entries, name=f"{out.name}.static"))
            model.graph.register_initializer(value)
            out.replace_all_uses_with(value, replace_graph_outputs=False)
            modified = modified or not out.uses()
        return ir.passes.PassResult(model, modified)


def _static_shape_entries(node: ir.Node) -> np.ndarray | None:
    """The entries a Gather or Slice picks from a Shape, where every one of them is a static size."""
    src = node.inputs[0] if node.inputs else None
    shape_node = src.producer() if src is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or src.is_graph_output():
        return None
    vec = shape_vector(node.outputs[0])
    if vec is None or any(d.value is None for d in vec):
        return None
    out = np.array([d.value for d in vec], np.int64)
    scalar = node.op_type == "Gather" and (idx := const_tensor(node.inputs[1])) is not None and idx.ndim == 0
    return out.reshape(()) if scalar else out


class FoldConstantsPass(ir.passes.InPlacePass):
    """onnxscript's constant folding with the size limits lifted, so weights made by nodes fold."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import fold_constants

        result = fold_constants(model, onnx_shape_inference=False, input_size_limit=1 << 62,
                                output_size_limit=1 << 62, should_fold=_should_fold)
        return ir.passes.PassResult(model, bool(result.modified))


class RuleShapesPass(ir.passes.InPlacePass):
    """Output shapes the op rules know where inference left them unknown (an Expand to a constant
    shape at an old opset, a flatten whose target is built at run time); inference then carries them on."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from .ops import rule_for

        before = [v.shape for node in model.graph for v in node.outputs]
        for node in model.graph:
            rule = rule_for(node)
            if rule is not None:
                rule.fill_shapes(node)
        after = [v.shape for node in model.graph for v in node.outputs]
        return ir.passes.PassResult(model, before != after)


class InferShapesPass(ir.passes.InPlacePass):
    """Shapes inferred afresh: stale shapes of intermediate values are cleared first, since a rewrite
    changed them; graph inputs and outputs keep what they declare."""

    def __init__(self, clear: bool = True) -> None:
        super().__init__()
        self.clear = clear

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.clear:
            for node in model.graph:
                for v in node.outputs:
                    if not v.is_graph_output():
                        v.shape = None
        known = {v: v.shape for node in model.graph for v in node.outputs if v.shape is not None}
        result = common.ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        # Inference invents a new symbol for every unknown size; a size the rules proved keeps its name.
        for v, shape in known.items():
            if v.shape is not None and shape is not None and len(v.shape) == len(shape):
                refine_shape(v, [o if not isinstance(n, int) and not isinstance(o, int) else None
                                 for o, n in zip(shape, v.shape, strict=True)])
        return ir.passes.PassResult(model, result.modified)


def rule_shapes_pass() -> ir.passes.PassBase:
    """Shapes the rules prove let inference go further, which may let the rules prove more: one round
    carries shapes past one op inference does not know (each fused attention of a transformer), so the
    rounds go on until nothing changes. Each round also names the sizes convs and pools compute from a
    symbolic height or width (window_sizes.py), which inference then carries on."""
    return ir.passes.PassManager([RuleShapesPass(), WindowSizesPass(), InferShapesPass(clear=False)], steps=64,
                                 early_stop=True)


def prepare_passes() -> list[ir.passes.PassBase]:
    """The passes that make any exporter's graph readable (see the module's docstring)."""
    return [
        InitializerInputsPass(),
        # Shape inference reads constant shape operands from initializers only.
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ArrayInitializersPass(),
        # Twice: sizes hidden behind a Pad built from shape arithmetic are known only once it folded.
        InferShapesPass(clear=False),
        StaticDimsPass(),
        FoldConstantsPass(),
        InferShapesPass(clear=False),
        StaticDimsPass(),
        FoldConstantsPass(),
        # Folding writes its results as Constant nodes, of attributes the model's opset may lack (value_ints
        # before opset 12); as initializers they are valid at any opset, and read like every other constant.
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.IdentityEliminationPass(),
        common.RemoveUnusedNodesPass(),
        rule_shapes_pass(),
        HeadRoundTripPass(),  # reads the shapes the rules proved
    ]
