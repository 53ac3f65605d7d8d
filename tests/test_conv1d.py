"""Conv1d layers: read by the analysis as convs of one row, with filter, channel, kernel-column and depth groups;
counted as the export cuts them (taps included); thinned; timed in the latency table as 1-D Convs; and a 1-D
Conv's zero outer taps shrunk in any ONNX model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conv1d_nets import ROWS, ConformerConvNet, SequenceNet, with_statistics
from counted_cut import assert_cut_as_counted, assert_thinned_exactly, exported
from onnx import TensorProto, helper, numpy_helper
from untraceable import untraceable
from zeroing import zero_groups

from sslcompress.cli import main
from sslcompress.errors import UnsupportedModelError
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze
from sslcompress.latency.ops import op_model
from sslcompress.latency.signature import blocked, signatures_of
from sslcompress.surgery.export import export_onnx
from sslcompress.surgery.kernels import shrink_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 1, 8, 12)


def _net(cls=SequenceNet) -> torch.nn.Module:
    torch.manual_seed(0)
    return with_statistics(cls())


@pytest.mark.parametrize("traced", ["fx", "torch.export"])
def test_conv1d_layers_are_read_as_convs_of_one_row(traced):
    model = _net(SequenceNet if traced == "fx" else untraceable(SequenceNet))
    st = analyze(model, SHAPE)
    assert set(st.layers) == {"stem.0", "seq.0", "block.0", "block.3", "down.0", "head"}
    seq, dilated, down = st.layers["seq.0"], st.layers["block.0"], st.layers["down.0"]
    assert seq.one_dimensional and not st.layers["stem.0"].one_dimensional
    assert (seq.kernel, seq.padding, seq.in_hw, seq.out_hw) == ((1, 3), (0, 1), (1, 12), (1, 12))
    assert (dilated.kernel, dilated.dilation, dilated.padding) == ((1, 5), (1, 2), (0, 4))
    assert (down.stride, down.out_hw, down.macs) == ((1, 2), (1, 6), 20 * 16 * 3 * 6)
    # The stem's channel c is features c*ROWS ... c*ROWS + ROWS - 1 of the sequence: one id each.
    stem_roots = [st.root(i) for i in st.layers["stem.0"].out_ids]
    assert [st.root(i) for i in seq.in_ids] == [r for r in stem_roots for _ in range(ROWS)]
    assert not any(st.pin_reason(i) for i in seq.in_ids)
    assert [b.modules for b in st.branches] == [["block.0", "block.1", "block.3", "block.4"]]


def test_conv1d_groups_are_filters_channels_and_taps():
    model = _net()
    groups = build_groups(model, SHAPE)
    names = [g.name for g in groups]
    assert [n for n in names if n.startswith("kernel_col seq.0")] == [f"kernel_col seq.0[:, :, {k}]" for k in range(3)]
    assert sum(n.startswith("kernel_col block.0") for n in names) == 5
    # No kernel rows and no shape columns of a Conv1d: the export lowers only 2-D convs to their kept columns.
    assert not [n for n in names if n.startswith(("kernel_row", "shape")) and "stem.0" not in n]
    channel = next(g for g in groups if g.name.startswith("channel seq.0"))
    assert channel.slices[0].index == tuple(range(ROWS))  # a stem channel's ROWS features, read together
    assert sum(g.kind == "depth" for g in groups) == 1


@pytest.mark.parametrize("case", ["legacy", "legacy-dynamic-batch", "dynamo", "torch.export-analysis"])
def test_zero_filters_channels_and_taps_are_cut_as_counted(case):
    model = _net(untraceable(SequenceNet) if case == "torch.export-analysis" else SequenceNet)
    groups = {g.name: g for g in build_groups(model, SHAPE)}
    chosen = ["filter stem.0[1] +1 coupled", "filter stem.0[6] +1 coupled", "channel block.3[:, 2]",
              "kernel_col block.0[:, :, 0]", "kernel_col block.0[:, :, 4]", "kernel_col seq.0[:, :, 0]",
              "kernel_col down.0[:, :, 2]"]
    chosen.append(next(n for n in groups if n.startswith("filter seq.0[3]")))  # coupled across the residual sum
    zero_groups(model, [groups[n] for n in chosen])
    if case == "legacy-dynamic-batch":
        proto = export_onnx(model, SHAPE, dynamic_batch=True).model
    else:
        proto = exported(model, SHAPE, "dynamo" if case == "dynamo" else "legacy")
    result, counted = assert_cut_as_counted(model, SHAPE, proto)
    shrunk = sorted(tuple(map(tuple, v)) for v in result.report["kernels_shrunk"].values())
    assert shrunk == [((1, 3), (1, 2)), ((1, 3), (1, 2)), ((1, 5), (1, 3))]
    assert counted.layer("seq.0").channels == (6 * ROWS, 8 * ROWS)
    assert counted.layer("block.0").kernel_after == (1, 3)


def test_conv1d_model_thins_exactly():
    model = _net()
    groups = {g.name: g for g in build_groups(model, SHAPE, ("filter", "channel"))}
    chosen = ["filter stem.0[2] +1 coupled", "channel block.3[:, 5]", "channel block.3[:, 7]"]
    chosen += [n for n in groups if n.startswith(("filter seq.0[4]", "filter down.0[1]"))]
    zero_groups(model, [groups[n] for n in chosen])
    assert_thinned_exactly(model, SHAPE)
    assert (model.seq[0].in_channels, model.block[0].out_channels, model.down[0].out_channels) == (7 * ROWS, 10, 19)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_conformer_convolution_modules_are_cut_as_counted(exporter):
    # GLU over a pointwise Conv1d's channels: unit c is its outputs c and d + c, carried on by the depthwise
    # Conv1d and its BatchNorm, read by the last pointwise Conv1d. The (batch, time, features) stream is pinned
    # by the LayerNorms; each module is a depth group.
    shape = (1, 1, 8, 8)
    model = _net(ConformerConvNet)
    groups = build_groups(model, shape)
    units = [g for g in groups if g.kind == "filter" and g.removable]
    assert [g.name for g in units[:2]] == ["filter blocks.0.pw1[0] +2 coupled", "filter blocks.0.pw1[1] +2 coupled"]
    assert {s.param: s.index for s in units[3].slices if s.param.endswith("weight")} == {
        "blocks.0.pw1.weight": (3, 19), "blocks.0.dw.weight": (3,), "blocks.0.bn.weight": (3,)}
    assert len(units) == 32 and sum(g.kind == "depth" for g in groups) == 2
    zero_groups(model, units[2:6] + units[20:22])
    assert_cut_as_counted(model, shape, exported(model, shape, exporter))
    zero_groups(model, [g for g in groups if g.kind == "depth"][1:])
    assert_cut_as_counted(model, shape, exported(model, shape, exporter))


def test_conformer_convolution_modules_thin_exactly():
    shape = (1, 1, 8, 8)
    model = _net(ConformerConvNet)
    units = [g for g in build_groups(model, shape, ("filter",)) if g.removable]
    zero_groups(model, units[2:6] + units[20:22])
    assert_thinned_exactly(model, shape)
    block = model.blocks[0]
    assert (block.pw1.out_channels, block.dw.groups, block.bn.num_features, block.pw2.in_channels) == (24, 12, 12, 12)


def test_conv1d_latency_entries_are_one_dimensional_convs():
    st = analyze(_net(), SHAPE)
    (sig,) = signatures_of(st.layers["block.0"])
    assert sig.dims == 1 and sig.ident() == "conv1d o12 i16 k5 s1 p4 d2 g1 l12"
    assert signatures_of(st.layers["stem.0"])[0].dims == 2
    # ORT's blocked layout takes 2-D convs only, so no width of a Conv1d is read as a blocked one.
    assert not blocked(sig, 16, 16, 8)
    (down,) = signatures_of(st.layers["down.0"])
    proto, x_shape = op_model(down, 8, 16, batch=2)
    assert x_shape == (2, 8, 12)
    assert list(numpy_helper.to_array(proto.graph.initializer[0]).shape) == [16, 8, 3]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.zeros(x_shape, np.float32)})
    assert y.shape == (2, 16, st.layers["down.0"].out_hw[1])


def _conv1d_model(w: np.ndarray, pads: list[int], stride: int, dilation: int, length: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[1], length])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[w.shape[2]], pads=pads, strides=[stride],
                            dilations=[dilation])
    b = np.linspace(-1, 1, w.shape[0]).astype(np.float32)
    graph = helper.make_graph([node], "conv1d", [x], [y], [numpy_helper.from_array(w, "w"),
                                                             numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pads,stride,dilation,kept", [
    ([4, 4], 1, 2, (1, 4)),  # padding given back on both sides
    ([0, 0], 2, 1, (1, 3)),  # no padding: the input is cropped
    ([1, 3], 1, 1, (2, 5)),  # unequal padding, partly cropped
])
def test_zero_outer_taps_of_a_foreign_1d_conv_are_shrunk_exactly(pads, stride, dilation, kept):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 6)).astype(np.float32)
    w[:, :, :kept[0]] = 0
    w[:, :, kept[1]:] = 0
    proto = _conv1d_model(w, pads, stride, dilation, length=23)
    model = ir.serde.deserialize_model(proto)
    result = shrink_kernels(model)
    assert list(result.shrunk.values()) == [((1, 6), (1, kept[1] - kept[0]))]
    cut = ir.serde.serialize_model(model)
    x = rng.standard_normal((1, 3, 23)).astype(np.float32)
    want, got = (ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                 for p in (proto, cut))
    assert want.shape == got.shape
    assert np.abs(want - got).max() <= 1e-5 * np.abs(want).max()


def test_finetune_and_export_a_conv1d_model_from_a_file(tmp_path):
    model = f"{__import__('conv1d_nets').__file__}:SequenceNet"
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["finetune", "--model", model, "--data", "digits", "-s", "filter,channel,kernel_col",
                                    "--target-flops", "0.7", "--pretrain-epochs", "1", "--sparsify-epochs", "1",
                                    "--finetune-epochs", "1", "--limit-train", "128", "--limit-test", "32",
                                    "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    onnx_path = tmp_path / "seq.onnx"
    res = CliRunner().invoke(main, ["export", str(out / "sparse.pt"), "--onnx", str(onnx_path)])
    assert res.exit_code == 0, res.output
    assert "verification: passed" in res.output
    assert "MACs after match the checkpoint's count" in res.output


def test_a_model_the_exporter_refuses_gets_one_short_line():
    class OpenEndedPool(torch.nn.Module):  # adaptive pooling with an open size: no ONNX form at a dynamic batch
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), (2, None)).flatten(1)

    with pytest.raises(UnsupportedModelError) as err:
        export_onnx(OpenEndedPool().eval(), (1, 1, 8, 8), dynamic_batch=True)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300
    assert str(err.value).startswith("torch.onnx.export failed for OpenEndedPool at opset 17: ")
