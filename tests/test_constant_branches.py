"""A residual branch whose first layer's filters are all zero computes a constant per channel (its last
conv reads only zeros and writes its bias, through its norm): the cut adds that constant instead, on ONNX
models as every exporter writes them, and the outputs stay those of the uncut model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from corpus import torch_models as T

from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = ("layer1.1", "layer3.0")  # layer3.0 has a projection shortcut beside its branch


@torch.no_grad()
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(ModelSpec("resnet20", 10, 3, (T.SIDE, T.SIDE))).eval()
    for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.bias.uniform_(-0.5, 0.5)
    for name in BLOCKS:
        blk = m.get_submodule(name)
        for p in (blk.conv1.weight, blk.bn1.weight, blk.bn1.bias):
            p.zero_()
    return m


EXPORTS = {
    "legacy-opset9": lambda m: T.legacy(m, opset=9),
    "legacy-opset13": lambda m: T.legacy(m, opset=13),
    "legacy-opset23": lambda m: T.legacy(m, opset=T.NEWEST_LEGACY),
    "legacy-unfolded": lambda m: T.legacy(m, fold=False),
    "legacy-dynamic": lambda m: T.legacy(m, dynamic=(0, 2, 3)),
    "dynamo": lambda m: T.dynamo(m),
    "dynamo-dynamic-batch": lambda m: T.dynamo(m, dynamic=(0,)),
    "legacy-fp16": lambda m: T.legacy(m, dtype=torch.float16),
}


@pytest.mark.parametrize("export", list(EXPORTS))
def test_each_exporters_constant_branches_become_their_constants(export, tmp_path):
    proto = EXPORTS[export](_model())
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    spatial = "legacy-dynamic" == export  # no size to draw random inputs at: real batches, as users give
    batch = 3 if dims[0].dim_param else dims[0].dim_value
    fp16 = export == "legacy-fp16"
    x = np.random.default_rng(1).standard_normal((batch, 3, T.SIDE, T.SIDE)).astype(np.float16 if fp16 else np.float32)
    res = compress(proto, inputs=[x] if spatial else None)
    assert res.verification.passed
    # At a dynamic height and width too: the strided branch's size and its projection shortcut's get one name
    # (window_sizes.py), so that Add takes its constant as well.
    replaced = len(BLOCKS)
    assert len(res.report["blocks_constant"]) == replaced, res.report["blocks_constant"]
    assert res.report["zero_branches_kept"] == {}
    convs = sum(1 for n in proto.graph.node if n.op_type == "Conv")
    assert sum(1 for n in res.model.graph.node if n.op_type == "Conv") == convs - 2 * replaced
    # Compared here too, on a batch of 3 where the batch is dynamic: it broadcasts the (1, C, 1, 1) constant.
    outs = []
    for model in (proto, res.model):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64))
    scale = np.abs(outs[0]).max()
    assert np.abs(outs[0] - outs[1]).max() <= (T.FP16_RTOL if fp16 else 1e-5) * scale
    add_outputs = {n.name: n.output[0] for n in proto.graph.node if n.op_type == "Add"}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer}
    consts = [name for name in inits if name.endswith(".constant_branch")]
    assert len(consts) == replaced
    for c in consts:
        (reader,) = [n for n in res.model.graph.node if c in n.input]
        if fp16:
            # Added as it is: a (1, C, 1, 1) constant in the model's dtype.
            assert reader.op_type == "Add"
            assert inits[c].dtype == np.float16 and inits[c].shape[0] == 1 and inits[c].shape[2:] == (1, 1)
            continue
        # float32 NCHW: the shift of a BatchNormalization that scales by exactly 1 (scale 1, mean 0, variance 1,
        # epsilon 0), an op ORT's blocked layout carries.
        assert reader.op_type == "BatchNormalization" and list(reader.input).index(c) == 2
        scale, mean, var = (inits[reader.input[i]] for i in (1, 3, 4))
        assert inits[c].dtype == np.float32 and inits[c].shape == scale.shape == mean.shape == var.shape
        assert (scale == 1).all() and (mean == 0).all() and (var == 1).all()
        assert [a.f for a in reader.attribute if a.name == "epsilon"] == [0.0]
        # In the Add's place: its name and its sum's value name stay.
        assert reader.output[0] == add_outputs[reader.name.removesuffix(".constant_branch")]
    if not fp16 and not spatial:
        # ORT keeps the blocked layout through them: no more reorders than in the uncut model (an Add of a
        # (1, C, 1, 1) constant took each block out of it and back). Not at a dynamic height and width: there
        # the strided block keeps its branch, one channel wide, which leaves the layout by itself.
        assert _reorders(res.model, tmp_path) <= _reorders(proto, tmp_path)


def _reorders(model: onnx.ModelProto, tmp_path) -> int:
    """Layout reorders in ORT's optimised graph of the model (CPU, every optimisation)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    return ops.count("ReorderInput") + ops.count("ReorderOutput")
