"""Sizes convs and pools compute from a dynamic height and width get one name per computation, so a strided
block's zero or constant branch goes at dynamic sizes too, and the cut model still computes what the uncut one
did at any size."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from corpus import torch_models as T
from onnx import TensorProto, helper

from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.compress import compress
from sslcompress.surgery.prepare import InferShapesPass
from sslcompress.surgery.window_sizes import WindowSizesPass, window_size_name

pytestmark = pytest.mark.usefixtures("one_thread")


def test_names_say_what_the_size_is_computed_from():
    # ceil((size + c) / stride), c = pads - dilation * (kernel - 1): floor((size + c - 1) / stride) + 1 in whole
    # numbers, what ONNX computes for explicit pads.
    assert window_size_name("h", 0, 1) == "h"  # a 3x3 with padding 1, stride 1
    assert window_size_name("h", -2, 1) == "h-2"  # a 3x3 without padding
    assert window_size_name("h", 0, 2) == "ceil(h/2)"
    assert window_size_name("ceil(h/2)", -2, 2) == "ceil((ceil(h/2)-2)/2)"
    for size in range(1, 40):
        for k, s, p in ((3, 2, 1), (1, 2, 0), (3, 1, 0), (7, 2, 3), (3, 3, 0), (5, 2, 1)):
            c = 2 * p - (k - 1)
            assert (size + 2 * p - (k - 1) - 1) // s + 1 == -(-(size + c) // s)
    # Ceil mode: one more where the last step is short, less the last window where it starts in the end
    # padding; never so where the end padding plus the stride is at most the kernel.
    def ceil_mode(size: int, k: int, s: int, p: int) -> int:
        out = -(-(size + 2 * p - k) // s) + 1
        return out - 1 if (out - 1) * s >= size + p else out

    for size in range(2, 40):
        for k, s, p in ((2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 3, 0), (5, 2, 2), (3, 1, 1)):
            assert p + s <= k
            assert ceil_mode(size, k, s, p) == -(-(size + 2 * p - (k - 1) + s - 1) // s)
    # Past that bound the last window is dropped at some sizes only (3x3, stride 3, padding 1: at 2, 5, 8, ...).
    assert {size for size in range(2, 12) if ceil_mode(size, 3, 3, 1) != -(-(size + 2 - 2 + 2) // 3)} == {2, 5, 8, 11}


def _graph(nodes, inits, outputs) -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, "h", "w"])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                for o in outputs], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    InferShapesPass(clear=False)(model)
    return model


def test_equal_computations_from_one_size_get_one_name_and_others_keep_theirs():
    w3 = onnx.numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w3")
    w1 = onnx.numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w1")
    nodes = [helper.make_node("Conv", ["x", "w3"], ["branch"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w1"], ["shortcut"], strides=[2, 2]),
             helper.make_node("Conv", ["x", "w3"], ["same"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w3"], ["auto"], strides=[2, 2], auto_pad="SAME_UPPER"),
             helper.make_node("MaxPool", ["x"], ["ceil"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
             helper.make_node("AveragePool", ["x"], ["resnet_d"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             helper.make_node("MaxPool", ["x"], ["ceil_padded"], kernel_shape=[2, 2], strides=[2, 2],
                              pads=[1, 1, 1, 1], ceil_mode=1),
             helper.make_node("Conv", ["x", "w3"], ["valid"], strides=[2, 2], auto_pad="VALID")]
    model = _graph(nodes, [w3, w1], ["branch", "shortcut", "same", "auto", "ceil", "resnet_d", "ceil_padded",
                                     "valid"])
    values = {v.name: v for node in model.graph for v in node.outputs}
    invented = list(values["ceil_padded"].shape)[2:]
    assert WindowSizesPass()(model).modified
    shape = {name: [str(d) for d in values[name].shape] for name in values}
    # Four ways of writing one size: explicit padding 1, none at a 1x1, SAME padding, and a 2x2 pool of stride 2
    # in ceil mode (a ResNet-D shortcut's).
    assert shape["branch"] == shape["shortcut"] == shape["auto"] == shape["resnet_d"] == [
        "n", "4", "ceil(h/2)", "ceil(w/2)"]
    assert shape["same"] == ["n", "4", "h", "w"]
    assert shape["valid"] == ["n", "4", "ceil((h-2)/2)", "ceil((w-2)/2)"]
    # A 3x3 pool in ceil mode: one more than in floor mode wherever the last step is short.
    assert shape["ceil"] == ["n", "4", "ceil((h-1)/2)", "ceil((w-1)/2)"]
    # Padded at the end by 1 with a window of 2 and stride 2, the last window may start in the padding and be
    # dropped, at some sizes only: what inference named it stays.
    assert list(values["ceil_padded"].shape)[2:] == invented
    assert not WindowSizesPass()(model).modified  # nothing left to name
    # The names hold in ONNX Runtime: values of one name have one size at any input size.
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for h, w in ((7, 9), (8, 8), (3, 5), (16, 3), (5, 11), (13, 4)):
        got = dict(zip(names, sess.run(None, {"x": np.zeros((1, 4, h, w), np.float32)}), strict=True))
        by_name: dict[str, int] = {}
        for name in ("branch", "shortcut", "auto", "same", "valid", "ceil", "resnet_d"):
            for sym, size in zip(shape[name][2:], got[name].shape[2:], strict=True):
                assert by_name.setdefault(sym, size) == size, (sym, h, w)
        assert by_name["h"] == h and by_name["w"] == w


def test_a_size_the_exporter_named_stays():
    w = onnx.numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    model = _graph([helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2])], [w], ["y"])
    (y,) = model.graph.node(0).outputs
    y.shape = ir.Shape(["n", 4, "s0//2", 7])
    assert not WindowSizesPass()(model).modified
    assert [str(d) for d in y.shape] == ["n", "4", "s0//2", "7"]


def _shifted_batch_norms(m: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics and shifts that do something, so a branch whose first conv is zero is a nonzero
    constant."""
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m


def _cut_at_dynamic_sizes(proto: onnx.ModelProto):
    """The cut of a model exported at a dynamic (batch, height, width), verified at 32x32 and 27x21."""
    rng = np.random.default_rng(0)
    return compress(proto, inputs=[rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 32, 32), (1, 3, 27, 21))])


def _assert_same_outputs(proto: onnx.ModelProto, cut: onnx.ModelProto, shapes) -> None:
    """The cut model computes what the uncut one does at input sizes the verification did not see."""
    rng = np.random.default_rng(1)
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        outs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                for p in (proto, cut)]
        assert np.abs(outs[0] - outs[1]).max() <= 1e-5 * np.abs(outs[0]).max(), shape


@torch.no_grad()
def _resnet() -> torch.nn.Module:
    """ResNet-20 with the branch of a strided block all zero, and another strided block's first conv zero (its
    branch then adds a constant), BatchNorm shifts that make that constant nonzero."""
    torch.manual_seed(0)
    m = _shifted_batch_norms(build_model(ModelSpec("resnet20", 10, 3, (T.SIDE, T.SIDE))).eval())
    zero = m.get_submodule("layer2.0")
    for mod in (zero.conv1, zero.bn1, zero.conv2, zero.bn2):
        for p in mod.parameters():
            p.zero_()
    constant = m.get_submodule("layer3.0")
    for p in (constant.conv1.weight, constant.bn1.weight, constant.bn1.bias):
        p.zero_()
    return m


def test_strided_branches_go_at_a_dynamic_height_and_width():
    proto = T.legacy(_resnet(), dynamic=(0, 2, 3))
    res = _cut_at_dynamic_sizes(proto)
    assert res.verification.passed
    assert res.report["blocks_removed"] == ["/layer2/layer2.0/Add"]
    assert res.report["blocks_constant"] == ["/layer3/layer3.0/Add"]
    assert res.report["zero_branches_kept"] == {}
    convs = sum(1 for n in proto.graph.node if n.op_type == "Conv")
    assert sum(1 for n in res.model.graph.node if n.op_type == "Conv") == convs - 4
    _assert_same_outputs(proto, res.model, ((3, 3, 19, 33), (1, 3, 8, 9)))  # odd sizes too


@torch.no_grad()
def test_names_carry_through_the_batch_norms_a_foreign_export_kept():
    # The legacy exporter in PRESERVE mode keeps every BatchNormalization beside its conv, as other writers do:
    # the names reach each Add through them, and the strided block's zero branch goes at dynamic sizes too.
    import io

    m = _resnet()
    buf = io.BytesIO()
    with T._quiet():
        torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), buf, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 21
    res = _cut_at_dynamic_sizes(proto)
    assert res.verification.passed
    assert "/layer2/layer2.0/Add" in res.report["blocks_removed"]
    assert res.report["zero_branches_kept"] == {}
    _assert_same_outputs(proto, res.model, ((2, 3, 19, 33),))


class _ResNetD(torch.nn.Module):
    """A stem and one strided ResNet-D block: the shortcut averages 2x2 windows in ceil mode before its 1x1
    projection, where ResNet-B strides the 1x1."""

    def __init__(self):
        super().__init__()
        bn = torch.nn.BatchNorm2d
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), torch.nn.ReLU())
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, 2, 1, bias=False), bn(16), torch.nn.ReLU(),
                                          torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), bn(16))
        self.shortcut = torch.nn.Sequential(torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                            torch.nn.Conv2d(8, 16, 1, bias=False), bn(16))
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.branch(x) + self.shortcut(x))
        return self.head(x.mean((2, 3)))


@torch.no_grad()
def test_a_resnet_d_block_whose_shortcut_pools_in_ceil_mode_loses_its_zero_branch_at_dynamic_sizes():
    torch.manual_seed(0)
    m = _shifted_batch_norms(_ResNetD().eval())
    for p in m.branch.parameters():
        p.zero_()
    proto = T.legacy(m, dynamic=(0, 2, 3))
    res = _cut_at_dynamic_sizes(proto)
    assert res.verification.passed
    assert len(res.report["blocks_removed"]) == 1 and res.report["zero_branches_kept"] == {}
    assert sum(n.op_type == "Conv" for n in res.model.graph.node) == 2  # the stem and the projection
    # Odd sizes, where the pool's last window is short.
    _assert_same_outputs(proto, res.model, ((3, 3, 19, 33), (1, 3, 8, 9), (1, 3, 5, 2)))


@torch.no_grad()
def test_a_constant_stage_at_a_dynamic_size_keeps_what_needs_static_sizes():
    # A strided block zero whole, projection included: the stage after it reads only its BatchNorm shifts,
    # constants whose maps through padding need static sizes. The cut goes on without them, and says so.
    m = _resnet()
    for p in m.get_submodule("layer2.0").parameters():
        p.zero_()
    proto = T.legacy(m, dynamic=(0, 2, 3))
    res = _cut_at_dynamic_sizes(proto)
    assert res.verification.passed
    kept = res.report["constant_channels_kept"]
    assert kept and all("dynamic height or width" in why for why in kept.values())
    assert res.report["totals"]["macs_after"] < res.report["totals"]["macs"]


def test_the_cli_says_which_convs_keep_constant_channels(tmp_path):
    from click.testing import CliRunner

    from sslcompress.cli import main

    m = _resnet()
    with torch.no_grad():
        for p in m.get_submodule("layer2.0").parameters():
            p.zero_()
    src = tmp_path / "m.onnx"
    onnx.save(T.legacy(m, dynamic=(0, 2, 3)), src)
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(tmp_path / "c.onnx"), "--data",
                                    "synthetic:3x32x32:10", "--data-limit", "4"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert re.search(r"constant channels kept at /layer2/\S+/Conv: it reads constant channels through zero "
                     r"padding at a dynamic height or width", text), text
