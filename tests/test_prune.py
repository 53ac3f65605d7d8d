"""Deleting dead channels from ONNX graphs: smaller tensors, the same outputs in ORT."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

from sslcompress.flops import count
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.export import export_onnx
from sslcompress.surgery.prepare import InferShapesPass
from sslcompress.surgery.prune import prune_dead_channels
from sslcompress.surgery.verify import verify_or_raise


def _onnx_macs(proto: onnx.ModelProto) -> int:
    """Conv and Gemm MACs per sample, read from the graph's own shapes: an independent count."""
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(proto.graph.value_info) + list(proto.graph.output)}
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    total = 0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            out = shapes[node.output[0]]
            w = inits[node.input[1]]
            total += int(np.prod(w)) * out[2] * out[3]
        elif node.op_type == "Gemm":
            total += int(np.prod(inits[node.input[1]]))
    return total


@dataclass(frozen=True)
class _Pruned:
    model: onnx.ModelProto
    channels_removed: int
    tensors_changed: int


def _run_pass(fn, proto: onnx.ModelProto):
    """One surgery pass on a copy of ``proto``: (the model it leaves, its result)."""
    model = ir.serde.deserialize_model(proto)
    res = fn(model)
    InferShapesPass()(model)
    return ir.serde.serialize_model(model), res


def _prune(proto: onnx.ModelProto) -> _Pruned:
    """The prune pass alone on a copy of ``proto``, shapes inferred afresh."""
    model = ir.serde.deserialize_model(proto)
    res = prune_dead_channels(model)
    InferShapesPass()(model)
    return _Pruned(ir.serde.serialize_model(model), res.channels_removed, res.tensors_changed)


def _prune_and_check(model: nn.Module, shape):
    proto = export_onnx(model, shape, dynamic_batch=True).model
    res = _prune(proto)
    verify_or_raise(proto, res.model)
    onnx.checker.check_model(res.model, full_check=True)
    return proto, res


@torch.no_grad()
def test_lenet_dead_filters_are_deleted_and_macs_match_the_torch_count():
    torch.manual_seed(0)
    m = build_model(ModelSpec("lenet5", 10, 1, (28, 28))).eval()
    m.conv1.weight[5:] = 0
    m.conv1.bias[5:] = 0
    m.conv2.weight[20:] = 0
    m.conv2.bias[20:] = 0
    m.fc1.weight[100:] = 0
    m.fc1.bias[100:] = 0
    proto, res = _prune_and_check(m, (1, 1, 28, 28))
    dims = {i.name: list(i.dims) for i in res.model.graph.initializer}
    assert dims["conv1.weight"] == [5, 1, 5, 5] and dims["conv2.weight"] == [20, 5, 5, 5]
    assert dims["fc1.weight"] == [100, 20 * 16] and dims["fc2.weight"] == [10, 100]
    assert res.channels_removed == 15 + 30 + 400
    assert _onnx_macs(res.model) == count(m, (1, 1, 28, 28)).macs_after


@torch.no_grad()
def test_resnet20_block_internal_channels_and_shared_initializers():
    torch.manual_seed(0)
    m = build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.bias.uniform_(-0.2, 0.2)
    for stage in (m.layer1, m.layer2, m.layer3):
        for blk in stage:
            k = blk.conv1.out_channels // 2
            blk.conv1.weight[k:] = 0
            blk.bn1.weight[k:] = 0
            blk.bn1.bias[k:] = 0
    proto, res = _prune_and_check(m, (1, 3, 32, 32))
    assert res.channels_removed == 3 * (8 + 16 + 32)
    assert _onnx_macs(res.model) == count(m, (1, 3, 32, 32)).macs_after
    # Every initializer is used, and none was changed for a node that still needs the original.
    used = {i for n in res.model.graph.node for i in n.input}
    assert all(i.name in used for i in res.model.graph.initializer)


@torch.no_grad()
def test_trunk_channel_dies_only_when_zero_in_every_summand():
    torch.manual_seed(0)
    m = build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()
    # Channel 3 of stage 1's trunk: zero in the stem but not in the blocks' last BN -> stays.
    m.conv1.weight[3] = 0
    m.bn1.weight[3] = 0
    m.bn1.bias[3] = 0
    proto, res = _prune_and_check(m, (1, 3, 32, 32))
    assert res.channels_removed == 0
    # Zero in every summand -> deleted everywhere.
    for blk in m.layer1:
        blk.bn2.weight[3] = 0
        blk.bn2.bias[3] = 0
    proto, res = _prune_and_check(m, (1, 3, 32, 32))
    assert res.channels_removed == 1


def test_no_zeros_no_change():
    torch.manual_seed(0)
    m = build_model(ModelSpec("lenet5", 10, 1, (28, 28))).eval()
    proto, res = _prune_and_check(m, (1, 1, 28, 28))
    assert res.channels_removed == 0 and res.tensors_changed == 0
    before = {i.name: list(i.dims) for i in proto.graph.initializer}
    assert {i.name: list(i.dims) for i in res.model.graph.initializer} == before


@pytest.mark.parametrize("seed", [0, 1, 2])
@torch.no_grad()
def test_random_filter_masks_on_a_small_residual_net(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    m = build_model(ModelSpec("resnet20", 10, 3, (16, 16))).eval()
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d) and mod.out_channels > 1:
            dead = torch.from_numpy(rng.random(mod.out_channels) < 0.4)
            mod.weight[dead] = 0
        if isinstance(mod, nn.BatchNorm2d):
            dead = torch.from_numpy(rng.random(mod.num_features) < 0.3)
            mod.weight[dead] = 0
            mod.bias[dead] = 0
            mod.running_mean.uniform_(-0.3, 0.3)
    proto, res = _prune_and_check(m, (1, 3, 16, 16))
    assert res.channels_removed > 0


@torch.no_grad()
def test_zero_residual_branches_are_deleted_whole():
    from sslcompress.surgery.compress import compress

    torch.manual_seed(0)
    m = build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()
    for blk in (m.layer1[1], m.layer2[2]):
        for p in blk.parameters():
            p.zero_()
    m.layer3[1].conv1.weight[:10] = 0  # and some dead channels elsewhere
    m.layer3[1].bn1.weight[:10] = 0
    m.layer3[1].bn1.bias[:10] = 0
    proto = export_onnx(m, (1, 3, 32, 32), dynamic_batch=True).model
    res = compress(proto)
    assert res.verification.passed
    assert len(res.report["blocks_removed"]) == 2
    convs = sum(1 for n in res.model.graph.node if n.op_type == "Conv")
    assert convs == sum(1 for n in proto.graph.node if n.op_type == "Conv") - 4
    assert res.report["totals"]["channels_removed"] == 10
    assert res.report["totals"]["macs_after"] == count(m, (1, 3, 32, 32)).macs_after


@torch.no_grad()
def test_a_branch_whose_first_layer_is_all_zero_becomes_its_constant():
    # Its second conv reads only zeros and writes its folded BatchNorm shift: a constant per channel, not
    # zero, so the branch cannot go; the Add takes that constant instead, and both convs go.
    from sslcompress.surgery.compress import compress

    torch.manual_seed(0)
    m = build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.bias.uniform_(-0.5, 0.5)
    for blk in (m.layer1[1], m.layer3[0]):  # layer3[0] has a projection shortcut beside its branch
        blk.conv1.weight.zero_()
        blk.bn1.weight.zero_()
        blk.bn1.bias.zero_()
    proto = export_onnx(m, (1, 3, 32, 32), dynamic_batch=True).model
    res = compress(proto)
    assert res.verification.passed
    assert len(res.report["blocks_constant"]) == 2 and not res.report["blocks_removed"]
    convs = sum(1 for n in res.model.graph.node if n.op_type == "Conv")
    assert convs == sum(1 for n in proto.graph.node if n.op_type == "Conv") - 4
    # Each Add became a normalisation by exactly 1 (float32 NCHW: ORT's blocked layout carries it) whose shift is
    # the branch's constant: the shift of its second BatchNorm, folded.
    graph = ir.serde.deserialize_model(res.model).graph
    by_name = {n.name: n for n in graph}
    norms = [by_name[f"{add}.constant_branch"] for add in res.report["blocks_constant"]]
    for norm, blk in zip(norms, (m.layer1[1], m.layer3[0]), strict=True):
        assert norm.op_type == "BatchNormalization"
        const = norm.inputs[2].const_value.numpy()
        bn = blk.bn2
        shift = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).numpy()
        assert const.shape == (bn.num_features,) and const.dtype == np.float32
        np.testing.assert_allclose(const.ravel(), shift, rtol=1e-6, atol=1e-7)
    # The training's count follows: the branches go from it too.
    assert res.report["totals"]["macs_after"] == count(m, (1, 3, 32, 32)).macs_after


def test_an_add_of_a_constant_and_a_zero_operand_drops_the_zero_branch():
    # Both operands are constant per channel; the zero one's branch goes whole and the sum is the other
    # operand. Taking the constant side first would write a constant and leave the zero conv standing.
    from onnx import TensorProto, helper

    from sslcompress.surgery.depth import remove_zero_branches

    rng = np.random.default_rng(0)
    c = 4
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in (
        ("wa", np.zeros((c, c, 1, 1), np.float32)), ("ba", rng.normal(size=c).astype(np.float32)),
        ("wz", np.zeros((c, c, 1, 1), np.float32)), ("bz", np.zeros(c, np.float32)),
        ("wc", rng.normal(size=(2, c, 3, 3)).astype(np.float32)))]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "wz", "bz"], ["z"], name="conv_zero"),
             helper.make_node("Add", ["a", "z"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "wc"], ["y"], name="conv_c", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], inits)
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    cut, res = _run_pass(remove_zero_branches, proto)
    assert res.branches_removed == ("add",) and res.branches_constant == ()
    assert sorted(n.name for n in cut.graph.node) == ["conv_a", "conv_c"]
    verify_or_raise(proto, cut)


def test_instance_norm_channels_are_read_per_channel():
    # InstanceNormalization normalises each channel over its own positions: a zero filter before it leaves a
    # channel that writes the shift (zero, then it goes), a zero scale a channel that writes its shift (a
    # constant, folded into the 1x1 conv after it), and the others keep their values.
    from onnx import TensorProto, helper, numpy_helper

    from sslcompress.surgery.compress import compress

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    w1[[0, 1]] = 0  # channels 0 and 1 read only zeros
    scale = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    scale[2] = 0  # channel 2 writes its shift, whatever it reads
    shift = rng.normal(size=6).astype(np.float32)
    shift[0] = 0  # channel 0: zero; channel 1: its shift
    w2 = rng.normal(size=(4, 6, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("s", scale), ("b", shift), ("w2", w2))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("InstanceNormalization", ["c", "s", "b"], ["n"], epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    res = compress(proto)
    assert res.verification.passed and res.verification.max_abs <= 1e-6 * res.verification.max_ref + 1e-7
    assert res.report["totals"]["channels_removed"] == 3
    weights = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    norm = next(n for n in res.model.graph.node if n.op_type == "InstanceNormalization")
    assert weights[norm.input[1]].shape == (3,)
    np.testing.assert_array_equal(weights[norm.input[1]], scale[3:])
    assert res.report["constant_channels_folded"] == 2


@torch.no_grad()
def test_zero_outer_kernel_rows_and_columns_shrink_the_kernel():
    from sslcompress.surgery.compress import compress

    torch.manual_seed(0)
    m = build_model(ModelSpec("lenet5", 10, 1, (28, 28))).eval()
    m.conv2.weight[:, :, 0, :] = 0  # no padding to give back: the input is cropped instead
    m.conv2.weight[:, :, :, 3:] = 0
    m.conv1.weight[:, :, 4, :] = 0
    proto = export_onnx(m, (1, 1, 28, 28), dynamic_batch=True).model
    res = compress(proto)
    assert res.verification.passed and res.verification.max_abs <= 1e-6 * res.verification.max_ref + 1e-7
    assert res.report["kernels_shrunk"] == {"/conv1/Conv": [[5, 5], [4, 5]], "/conv2/Conv": [[5, 5], [4, 3]]}
    assert sum(1 for n in res.model.graph.node if n.op_type == "Slice") == 2
    assert res.report["totals"]["macs_after"] == count(m, (1, 1, 28, 28)).macs_after


@torch.no_grad()
def test_kernel_shrink_with_padding_and_stride():
    from sslcompress.surgery.kernels import shrink_kernels

    torch.manual_seed(0)
    m = build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()
    m.layer1[0].conv1.weight[:, :, 0:2, :] = 0  # one row from the padding, one cropped
    m.layer2[0].conv1.weight[:, :, 2, :] = 0  # stride 2
    m.layer2[0].conv1.weight[:, :, :, 0] = 0
    proto = export_onnx(m, (1, 3, 32, 32), dynamic_batch=True).model
    shrunk, res = _run_pass(shrink_kernels, proto)
    verify_or_raise(proto, shrunk)
    onnx.checker.check_model(shrunk, full_check=True)
    assert res.shrunk == {"/layer1/layer1.0/conv1/Conv": ((3, 3), (1, 3)),
                          "/layer2/layer2.0/conv1/Conv": ((3, 3), (2, 2))}


@torch.no_grad()
def test_constant_channels_fold_into_unpadded_consumers_and_go():
    from sslcompress.surgery.compress import compress

    torch.manual_seed(0)
    m = build_model(ModelSpec("lenet5", 10, 1, (28, 28))).eval()
    m.conv1.weight[10:] = 0
    m.conv1.bias[10:] = torch.linspace(0.1, 1.0, 10)  # constant channels, read by unpadded conv2
    m.fc1.weight[300:] = 0
    m.fc1.bias[300:] = 0.5  # constant units: ReLU(0.5), folded into fc2's bias
    proto = export_onnx(m, (1, 1, 28, 28), dynamic_batch=True).model
    res = compress(proto)
    assert res.verification.passed
    dims = {i.name: list(i.dims) for i in res.model.graph.initializer}
    assert dims["conv1.weight"] == [10, 1, 5, 5] and dims["conv2.weight"] == [50, 10, 5, 5]
    assert dims["fc1.weight"] == [300, 800] and dims["fc2.weight"] == [10, 300]
    assert res.report["constant_channels_folded"] == 10 + 200


def test_padded_consumers_get_a_constant_map():
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.fold import fold_constant_channels

    torch.manual_seed(0)
    m = build_model(ModelSpec("resnet20", 10, 3, (16, 16))).eval()
    with torch.no_grad():
        m.layer1[0].bn1.weight[:4] = 0
        m.layer1[0].bn1.bias[:4] = 0.7  # constant after ReLU, but conv2 pads with zeros
    proto = export_onnx(m, (1, 3, 16, 16), dynamic_batch=True).model
    folded, fold = _run_pass(fold_constant_channels, proto)
    assert fold.channels_folded == 4 and len(fold.bias_maps) == 1
    verify_or_raise(proto, folded)
    res = compress(proto, shape_lowering="off")
    assert res.verification.passed and res.report["constant_maps_added"]
    conv2 = {lay["name"]: lay for lay in res.report["layers"]}
    shapes = [lay["weight_after"] for lay in res.report["layers"] if lay["weight"][:2] == [16, 16]]
    assert [16, 12, 3, 3] in shapes and [12, 16, 3, 3] in shapes, conv2.keys()


def test_constant_channels_through_padding_stay_at_dynamic_spatial_shapes():
    # Their constant map needs static sizes: the conv keeps reading them, and the result says why.
    from onnx import TensorProto, helper, numpy_helper

    from sslcompress.surgery.fold import fold_constant_channels

    w1 = np.ones((4, 3, 1, 1), np.float32)
    w1[0] = 0
    b1 = np.array([0.5, 0, 0, 0], np.float32)
    w2 = np.ones((2, 4, 3, 3), np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["t"], name="a"),
             helper.make_node("Conv", ["t", "w2"], ["y"], pads=[1, 1, 1, 1], name="b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "h", "w"])], inits)
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    model = ir.serde.deserialize_model(proto)
    res = fold_constant_channels(model)
    assert res.channels_folded == 0 and res.bias_maps == ()
    assert list(res.kept) == ["b"] and "dynamic height or width" in res.kept["b"]
    after = ir.serde.serialize_model(model).graph
    assert [n.op_type for n in after.node] == ["Conv", "Conv"]  # nothing written
    for name, array in (("w1", w1), ("b1", b1), ("w2", w2)):
        (init,) = [i for i in after.initializer if i.name == name]
        np.testing.assert_array_equal(numpy_helper.to_array(init), array)


def test_a_foreign_model_written_with_onnx_helper():
    """Not from torch: initializer names, node names and layout are the writer's own."""
    from onnx import TensorProto, helper, numpy_helper

    from sslcompress.surgery.compress import compress

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    w1[[1, 4, 6]] = 0
    b1 = rng.normal(size=8).astype(np.float32)
    b1[[1, 4, 6]] = 0
    w2 = rng.normal(size=(6, 8, 1, 1)).astype(np.float32)
    wf = rng.normal(size=(6, 5)).astype(np.float32)  # Gemm without transB: (in, out)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "A"), (b1, "B"), (w2, "C"), (wf, "D"))]
    nodes = [
        helper.make_node("Conv", ["x", "A", "B"], ["t1"], pads=[1, 1, 1, 1], name="first"),
        helper.make_node("LeakyRelu", ["t1"], ["t2"], alpha=0.1),
        helper.make_node("Conv", ["t2", "C"], ["t3"], name="second"),
        helper.make_node("GlobalAveragePool", ["t3"], ["t4"]),
        helper.make_node("Flatten", ["t4"], ["t5"], axis=1),
        helper.make_node("Gemm", ["t5", "D"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    res = compress(proto)
    assert res.verification.passed
    dims = {i.name: list(i.dims) for i in res.model.graph.initializer}
    assert dims["A"] == [5, 3, 3, 3] and dims["B"] == [5] and dims["C"] == [6, 5, 1, 1] and dims["D"] == [6, 5]
