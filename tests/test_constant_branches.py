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
def test_each_exporters_constant_branches_become_their_constants(export):
    proto = EXPORTS[export](_model())
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    spatial = "legacy-dynamic" == export  # no size to draw random inputs at: real batches, as users give
    batch = 3 if dims[0].dim_param else dims[0].dim_value
    fp16 = export == "legacy-fp16"
    x = np.random.default_rng(1).standard_normal((batch, 3, T.SIDE, T.SIDE)).astype(np.float16 if fp16 else np.float32)
    res = compress(proto, inputs=[x] if spatial else None)
    assert res.verification.passed
    # At a dynamic height and width a strided conv's output size is a new symbol, which cannot be shown equal
    # to the shortcut's: that Add keeps its branch, and the report says why.
    replaced = 1 if spatial else len(BLOCKS)
    assert len(res.report["blocks_constant"]) == replaced, res.report["blocks_constant"]
    if spatial:
        assert list(res.report["zero_branches_kept"].values()) == [
            "its operands' shapes cannot be shown equal to the sum's"]
    convs = sum(1 for n in proto.graph.node if n.op_type == "Conv")
    assert sum(1 for n in res.model.graph.node if n.op_type == "Conv") == convs - 2 * replaced
    # Compared here too, on a batch of 3 where the batch is dynamic: it broadcasts the (1, C, 1, 1) constant.
    outs = []
    for model in (proto, res.model):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64))
    scale = np.abs(outs[0]).max()
    assert np.abs(outs[0] - outs[1]).max() <= (T.FP16_RTOL if fp16 else 1e-5) * scale
    consts = [i for i in res.model.graph.initializer if i.name.endswith(".constant_branch")]
    assert len(consts) == replaced
    want = onnx.TensorProto.FLOAT16 if fp16 else onnx.TensorProto.FLOAT
    assert all(c.data_type == want and list(c.dims)[0] == 1 and list(c.dims)[2:] == [1, 1] for c in consts)
