"""The surgery's passes check the graph they get and the graph they leave."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from sslcompress.errors import SurgeryError
from sslcompress.surgery.passes import SurgeryPass, run_passes


def _model() -> ir.Model:
    w = np.ones((2, 3, 1, 1), np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["t"], name="c"),
                           helper.make_node("Relu", ["t"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                          [numpy_helper.from_array(w, "w")])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _misorder(model: ir.Model) -> None:
    relu = next(n for n in model.graph if n.op_type == "Relu")
    conv = next(n for n in model.graph if n.op_type == "Conv")
    model.graph.remove(relu)
    model.graph.insert_before(conv, relu)


def test_a_pass_that_leaves_a_reader_before_its_value_is_caught():
    with pytest.raises(SurgeryError, match="After misorder: node 'r' reads 't' before it is made"):
        run_passes(_model(), [SurgeryPass(_misorder, "misorder")])


def test_a_pass_refuses_a_graph_out_of_order():
    model = _model()
    _misorder(model)
    with pytest.raises(SurgeryError, match="Before noop: node 'r' reads 't'"):
        run_passes(model, [SurgeryPass(lambda m: None, "noop")])


def test_an_error_of_ours_inside_a_pass_comes_out_as_itself():
    def fail(model):
        raise SurgeryError("this one")

    with pytest.raises(SurgeryError, match="^this one$"):
        run_passes(_model(), [SurgeryPass(fail, "fail")])
