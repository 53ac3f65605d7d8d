"""Channel analysis on ONNX: every channel it calls ZERO or CONSTANT is exactly that in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.channels import CONSTANT, LIVE, ZERO, analyze
from sslcompress.surgery.export import export_onnx


def _all_values(proto: onnx.ModelProto, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every intermediate tensor, by exposing each node output as a graph output."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    known = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for out in node.output:
            if out and out not in known:
                m.graph.output.append(onnx.ValueInfoProto(name=out))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input": inputs}), strict=True))


def _check_against_ort(proto: onnx.ModelProto, shape: tuple[int, ...]) -> dict[str, int]:
    states = {v.name: ch for v, ch in analyze(ir.serde.deserialize_model(proto)).items()}
    x = np.random.default_rng(0).normal(size=(3, *shape[1:])).astype(np.float32) * 3
    values = _all_values(proto, x)
    counts = {"zero": 0, "constant": 0}
    for name, ch in states.items():
        if name not in values:
            continue
        t = values[name]
        for c in np.nonzero(ch.is_known)[0]:
            got = t[:, c]
            if ch.state[c] == ZERO:
                assert np.all(got == 0), (name, c)
                counts["zero"] += 1
            else:
                np.testing.assert_allclose(got, ch.value[c], rtol=1e-5, atol=1e-6, err_msg=f"{name}[{c}]")
                counts["constant"] += 1
    return counts


@torch.no_grad()
def test_lenet_zero_filters_and_constant_channels():
    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", 10, 1, (28, 28))).eval()
    model.conv1.weight[3:9] = 0
    model.conv1.bias[3:6] = 0  # 3..5 zero, 6..8 constant (bias only)
    model.conv1.bias[6:9] = 0.25
    model.fc1.weight[:40] = 0
    proto = export_onnx(model, (1, 1, 28, 28), dynamic_batch=True).model
    states = {v.name: ch for v, ch in analyze(ir.serde.deserialize_model(proto)).items()}
    conv1_out = next(n.outputs[0].name for n in ir.serde.deserialize_model(proto).graph if n.op_type == "Conv")
    ch = states[conv1_out]
    assert list(ch.state[3:6]) == [ZERO] * 3 and list(ch.state[6:9]) == [CONSTANT] * 3
    assert ch.state[0] == LIVE and ch.value[6] == pytest.approx(float(model.conv1.bias[6]))
    counts = _check_against_ort(proto, (1, 1, 28, 28))
    assert counts["zero"] >= 3 and counts["constant"] >= 3 + 40


@torch.no_grad()
def test_resnet20_branch_zero_and_bn_constants():
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    block = model.layer1[0]
    for p in (block.conv1.weight, block.bn1.weight, block.bn1.bias, block.conv2.weight, block.bn2.weight, block.bn2.bias):
        p.zero_()
    model.layer2[0].bn1.weight[:5] = 0  # gamma 0 and a shift: constant channels after BN and ReLU
    model.layer2[0].bn1.bias[:5] = 0.3
    proto = export_onnx(model, (1, 3, 32, 32), dynamic_batch=True).model
    counts = _check_against_ort(proto, (1, 3, 32, 32))
    assert counts["zero"] >= 32 and counts["constant"] >= 5


def test_unknown_op_is_a_wall():
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 2, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])
    w = onnx.numpy_helper.from_array(np.zeros((2, 2, 1, 1), np.float32), "w")
    nodes = [onnx.helper.make_node("Conv", ["input", "w"], ["c"]),
             onnx.helper.make_node("Softsign", ["c"], ["y"])]
    g = onnx.helper.make_graph(nodes, "g", [x], [y], [w])
    proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto = onnx.shape_inference.infer_shapes(proto)
    states = {v.name: ch for v, ch in analyze(ir.serde.deserialize_model(proto)).items()}
    assert list(states["c"].state) == [ZERO, ZERO]
    assert list(states["y"].state) == [LIVE, LIVE]  # Softsign has no handler: nothing is assumed


class _Tiny(nn.Module):
    """Conv-BN-ReLU, a residual Add, a concat and a classifier: the couplings in a few layers."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x):
        a = torch.relu(self.b1(self.c1(x)))
        b = torch.relu(self.b2(self.c2(a)) + a)
        c = torch.cat([self.c3(b), torch.nn.functional.max_pool2d(b, 2)], 1)
        return self.fc(torch.flatten(c, 1))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=8, deadline=None)
@given(st.lists(st.booleans(), min_size=6, max_size=6), st.lists(st.booleans(), min_size=6, max_size=6),
       st.lists(st.booleans(), min_size=6, max_size=6), st.integers(0, 1000))
@torch.no_grad()
def test_random_zero_masks_agree_with_ort(zero_filters, zero_gamma, zero_shift, seed):
    torch.manual_seed(seed)
    m = _Tiny().eval()
    for bn in (m.b1, m.b2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.uniform_(-0.5, 0.5)
    for i in range(6):
        if zero_filters[i]:
            m.c1.weight[i] = 0
            m.c1.bias[i] = 0
        if zero_gamma[i]:
            m.b2.weight[i] = 0
        if zero_shift[i]:
            m.b2.bias[i] = 0
    proto = export_onnx(m, (1, 3, 8, 8), dynamic_batch=True).model
    _check_against_ort(proto, (1, 3, 8, 8))
