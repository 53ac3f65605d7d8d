"""Column-sparse Convs lowered to im2col of the kept columns + MatMul: the same outputs in ORT."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sslcompress.errors import ConfigError
from sslcompress.runtime.providers import ProviderUnavailableError
from sslcompress.surgery import lowering
from sslcompress.surgery.export import export_onnx
from sslcompress.surgery.lowering import find_candidates, lower_sparse_columns, lower_sparse_columns_ir
from sslcompress.surgery.verify import compare


def _conv_model(keep: np.ndarray, *, c_out: int = 6, hw=(9, 11), stride=(1, 1), dilation=(1, 1),
                pads=(0, 0, 0, 0), bias: bool = True, group: int = 1, batch: int | str = 2, seed: int = 0,
                relu_after: bool = True) -> onnx.ModelProto:
    """One Conv whose weight columns (C, kh, kw) are zero where ``keep`` is False, then a Relu."""
    rng = np.random.default_rng(seed)
    c, kh, kw = keep.shape
    w = rng.standard_normal((c_out, c, kh, kw)).astype(np.float32) * keep
    inits = [numpy_helper.from_array(w, "W")]
    ins = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "B"))
        ins.append("B")
    conv_out = "t" if relu_after else "y"
    nodes = [helper.make_node("Conv", ins, [conv_out], name="conv", kernel_shape=[kh, kw], strides=list(stride),
                              dilations=list(dilation), pads=list(pads), group=group)]
    if relu_after:
        nodes.append(helper.make_node("Relu", ["t"], ["y"], name="relu"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c * group, *hw])
    out_hw = [(n + pads[i] + pads[i + 2] - dilation[i] * (k - 1) - 1) // stride[i] + 1
              for i, (n, k) in enumerate(zip(hw, (kh, kw)))]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c_out, *out_hw])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _random_keep(shape, sparsity: float, seed: int = 0) -> np.ndarray:
    keep = np.random.default_rng(seed).random(shape) >= sparsity
    keep.flat[0] = True
    keep.flat[-1] = False
    return keep


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _assert_lowered_and_exact(proto: onnx.ModelProto, res, batch: int = 2) -> None:
    ops = _ops(res.model)
    assert "Conv" not in ops and ops.count("MatMul") == 1, ops
    onnx.checker.check_model(res.model, full_check=True)
    check = compare(proto, res.model, batch=batch)
    assert check.passed, check


@pytest.mark.parametrize("kw", [
    {},
    {"stride": (2, 2), "pads": (1, 1, 1, 1)},
    {"stride": (2, 1), "pads": (0, 2, 1, 0), "dilation": (2, 1)},
    {"dilation": (2, 3), "pads": (2, 3, 2, 3), "bias": False},
    {"bias": False, "batch": "N"},
])
def test_on_lowers_random_zero_columns_exactly(kw):
    keep = _random_keep((5, 3, 3), 0.5)
    proto = _conv_model(keep, **kw)
    res = lower_sparse_columns(proto, "on")
    _assert_lowered_and_exact(proto, res, batch=3)
    (d,) = res.decisions
    assert d.name == "conv" and d.lowered and d.columns == (int(keep.sum()), 45)
    assert d.column_sparsity == pytest.approx(1 - keep.sum() / 45)
    assert d.macs[1] * 45 == d.macs[0] * int(keep.sum())
    assert ("Add" in _ops(res.model)) == kw.get("bias", True)
    assert res.model.graph.output[0].name == "y"


def test_an_offset_kept_for_some_channels_only():
    """Offsets with all, a range of, scattered or no channels: Slice, Slice with channels, Gather, nothing."""
    keep = np.zeros((6, 3, 3), bool)
    keep[:, 0, 0] = True  # all channels: a plain Slice
    keep[1:4, 1, 1] = True  # a channel range: sliced with the window
    keep[[0, 2, 5], 2, 2] = True  # scattered: Slice then Gather
    keep[4, 0, 2] = True  # one channel
    proto = _conv_model(keep, pads=(1, 1, 1, 1), stride=(2, 2))
    res = lower_sparse_columns(proto, "on")
    _assert_lowered_and_exact(proto, res)
    ops = _ops(res.model)
    assert ops.count("Slice") == 4 and ops.count("Gather") == 1 and ops.count("Pad") == 1
    assert all(n.name.startswith("conv") for n in res.model.graph.node if n.op_type != "Relu")
    w = next(i for i in res.model.graph.initializer if i.name == "conv.weight")
    assert list(w.dims) == [6, int(keep.sum())]


def test_a_torch_model_with_dynamic_batch():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, (3, 2), stride=2, dilation=(1, 2),
                                                                         bias=False)).eval()
    with torch.no_grad():
        m[0].weight[:, torch.from_numpy(_random_keep((4, 3, 3), 0.6, seed=1)) == 0] = 0
        m[2].weight[:, torch.from_numpy(_random_keep((8, 3, 2), 0.4, seed=2)) == 0] = 0
    proto = export_onnx(m, (1, 4, 12, 13), dynamic_batch=True).model
    res = lower_sparse_columns(proto, "on")
    assert "Conv" not in _ops(res.model) and _ops(res.model).count("MatMul") == 2
    assert len(res.decisions) == 2 and all(d.lowered for d in res.decisions)
    assert compare(proto, res.model, batch=3).passed
    x = np.random.default_rng(0).standard_normal((5, 4, 12, 13)).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    assert compare(proto, res.model, [x], n_random=0).passed
    from sslcompress.surgery.verify import ort_runner

    out = ort_runner(res.model)(x)[0]
    assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_off_changes_nothing():
    proto = _conv_model(_random_keep((5, 3, 3), 0.5))
    res = lower_sparse_columns(proto, "off")
    assert res.model.SerializeToString() == proto.SerializeToString() and res.decisions == ()


def test_convs_without_zero_columns_are_never_candidates():
    keep = np.ones((4, 3, 3), bool)
    dense = _conv_model(keep)
    w = numpy_helper.to_array(dense.graph.initializer[0]).copy()
    w[2] = 0  # a zero filter is the channel passes' business, not a zero column
    dense.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    depthwise = _conv_model(_random_keep((1, 3, 3), 0.5), c_out=4, group=4)
    auto_pad = _conv_model(_random_keep((4, 3, 3), 0.5))
    auto_pad.graph.node[0].attribute.remove(next(a for a in auto_pad.graph.node[0].attribute if a.name == "pads"))
    auto_pad.graph.node[0].attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    for proto in (dense, depthwise, auto_pad):
        assert find_candidates(proto) == []
        for mode in ("on", "auto", "predict"):
            res = lower_sparse_columns(proto, mode)
            assert res.model is proto and res.decisions == ()


def test_auto_times_candidates_and_decides():
    proto = _conv_model(_random_keep((8, 3, 3), 0.8), c_out=8, hw=(12, 12), pads=(1, 1, 1, 1))
    res = lower_sparse_columns(proto, "auto", per_conv_s=0.005)
    (d,) = res.decisions
    assert d.dense_ms > 0 and d.lowered_ms > 0 and "dense time" in d.reason
    assert ("MatMul" in _ops(res.model)) == d.lowered
    assert compare(proto, res.model).passed
    json.dumps(res.report())


def test_auto_leaves_mildly_sparse_convs_untimed():
    keep = np.ones((8, 3, 3), bool)
    keep[0, 1, 1] = False
    res = lower_sparse_columns(_conv_model(keep), "auto")
    (d,) = res.decisions
    assert not d.lowered and d.dense_ms is None and "not timed" in d.reason


def test_cuda_without_its_provider_and_bad_modes(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    proto = _conv_model(_random_keep((4, 3, 3), 0.5))
    with pytest.raises(ProviderUnavailableError, match=r"pip install sslcompress\[gpu\]"):
        lower_sparse_columns(proto, "auto", provider="cuda")
    with pytest.raises(ConfigError, match="off, on, predict, auto"):
        lower_sparse_columns(proto, "sometimes")
    with pytest.raises(ConfigError, match="cpu, cuda"):
        lower_sparse_columns(proto, "on", provider="tpu")


def test_compress_reports_lowering_and_verifies():
    from sslcompress.surgery.compress import compress

    proto = onnx.shape_inference.infer_shapes(_conv_model(_random_keep((5, 3, 3), 0.5), pads=(1, 1, 1, 1)))
    res = compress(proto, shape_lowering="on")
    assert res.verification.passed and "MatMul" in _ops(res.model)
    (d,) = res.report["shape_lowering"]["convs"]
    assert res.report["shape_lowering"]["mode"] == "on" and d["name"] == "conv" and d["lowered"]
    (row,) = res.report["layers"]
    assert row["op"] == "Conv" and row["macs_after"] == d["macs"][1] > 0
    assert res.report["totals"]["macs_after"] == d["macs"][1]
    assert res.report["shape_lowering"]["plan"] == [["t", True]]
    off = compress(proto, shape_lowering="off").report["shape_lowering"]
    assert off == {"mode": "off", "threshold": None, "plan": [], "convs": []}


def test_cli_surgery_shape_lowering_on(tmp_path):
    from sslcompress.cli import main

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_conv_model(_random_keep((5, 3, 3), 0.5), pads=(1, 1, 1, 1)), src)
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--shape-lowering", "on"])
    assert res.exit_code == 0, res.output
    assert "shape lowering (on): 1/1" in res.output and "verification: passed" in res.output
    assert "MatMul" in _ops(onnx.load(out))
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--shape-lowering", "off", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["shape_lowering"]["convs"] == []
    assert "Conv" in _ops(onnx.load(out))


@st.composite
def _conv_cases(draw):
    c = draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    hw = (draw(st.integers(dilation[0] * (kh - 1) + 1, 9)), draw(st.integers(dilation[1] * (kw - 1) + 1, 9)))
    flat = draw(st.lists(st.booleans(), min_size=c * kh * kw, max_size=c * kh * kw))
    keep = np.array(flat, bool).reshape(c, kh, kw)
    return keep, {"c_out": draw(st.integers(1, 4)), "hw": hw, "stride": stride, "dilation": dilation, "pads": pads,
                  "bias": draw(st.booleans()), "batch": draw(st.sampled_from([1, "N"])),
                  "relu_after": draw(st.booleans())}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_conv_cases())
def test_property_lowering_is_exact(case):
    keep, kw = case
    proto = _conv_model(keep, **kw)
    res = lower_sparse_columns(proto, "on")
    if keep.all() or not keep.any():
        assert res.model is proto and res.decisions == ()
        return
    _assert_lowered_and_exact(proto, res)


# ---------------------------------------------------------------- deterministic modes and plans
def _two_convs(sparse_a: float = 0.9, sparse_b: float = 0.5) -> onnx.ModelProto:
    """conv a (sparse_a zero columns) -> Relu -> conv b (sparse_b zero columns), static shapes."""
    rng = np.random.default_rng(3)
    wa = rng.standard_normal((8, 6, 3, 3)).astype(np.float32) * _random_keep((6, 3, 3), sparse_a, seed=4)
    wb = rng.standard_normal((5, 8, 3, 3)).astype(np.float32) * _random_keep((8, 3, 3), sparse_b, seed=5)
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "Wb"], ["y"], name="conv_b", kernel_shape=[3, 3])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8, 8])
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(wa, "Wa"),
                                                      numpy_helper.from_array(wb, "Wb")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_predict_is_the_default_and_lowers_exactly_the_candidates_over_the_threshold():
    proto = _two_convs()
    sparsity = {c.output: c.sparsity for c in find_candidates(proto)}
    assert sparsity["a"] >= 0.75 > sparsity["y"] >= 0.2
    res = lower_sparse_columns(proto)
    assert res.mode == "predict" and res.threshold == 0.75
    assert res.plan == (("a", True), ("y", False))
    assert [n.name for n in res.model.graph.node if n.op_type in ("Conv", "MatMul")] == ["conv_a", "conv_b"]
    assert _ops(res.model).count("MatMul") == 1 and _ops(res.model).count("Conv") == 1
    again = lower_sparse_columns(proto, "predict")
    assert again.model.SerializeToString() == res.model.SerializeToString()
    assert compare(proto, res.model).passed
    low = lower_sparse_columns(proto, "predict", threshold=0.2)
    assert low.plan == (("a", True), ("y", True)) and "Conv" not in _ops(low.model)
    high = lower_sparse_columns(proto, "predict", threshold=1.0)
    assert high.plan == (("a", False), ("y", False)) and high.model is proto
    report = res.report()
    assert report["plan"] == [["a", True], ["y", False]] and json.loads(json.dumps(report)) == report
    for bad in (0.0, 1.5, "high", True):
        with pytest.raises(ConfigError, match="threshold"):
            lower_sparse_columns(proto, "predict", threshold=bad)


def test_auto_plan_replayed_gives_the_same_model(monkeypatch):
    proto = _two_convs()
    # Decisions as a busy machine might make them: the sparser conv measured slower, the other faster.
    ratios = {"a": 1.1, "y": 0.5}

    def fake(cand, *a, **k):
        return lowering.CandidateTiming(1.0, ratios[cand.output], 5)

    monkeypatch.setattr(lowering, "time_candidate", fake)
    auto = lower_sparse_columns(proto, "auto")
    assert auto.plan == (("a", False), ("y", True))
    monkeypatch.setattr(lowering, "time_candidate", lambda *a, **k: pytest.fail("a plan is not timed"))
    report = json.loads(json.dumps(auto.report()))
    for plan in (report, report["plan"], dict(auto.plan), {"shape_lowering": report}):
        replay = lower_sparse_columns(proto, plan=plan)
        assert replay.mode == "plan" and replay.plan == auto.plan
        assert replay.model.SerializeToString() == auto.model.SerializeToString()
    # Given in place of the mode too: what compress passes on from the CLI's --lowering-plan.
    assert lower_sparse_columns(proto, report).model.SerializeToString() == auto.model.SerializeToString()
    assert compare(proto, auto.model).passed


def test_a_real_auto_plan_replays_to_the_same_bytes():
    proto = _two_convs()
    auto = lower_sparse_columns(proto, "auto", per_conv_s=0.002)
    timed = [d for d in auto.decisions if d.dense_ms is not None]
    assert timed and all(d.lowered_ms > 0 for d in timed)
    replay = lower_sparse_columns(proto, plan=auto.report())
    assert replay.plan == auto.plan
    assert replay.model.SerializeToString() == auto.model.SerializeToString()


def test_bad_plans_are_one_clear_config_error():
    proto = _two_convs()
    with pytest.raises(ConfigError, match="does not have"):
        lower_sparse_columns(proto, plan={"nowhere": True})
    dense = _conv_model(np.ones((4, 3, 3), bool))  # its conv output "t" has no zero columns
    with pytest.raises(ConfigError, match="no longer a candidate"):
        lower_sparse_columns(dense, plan={"t": True})
    with pytest.raises(ConfigError, match="not both"):
        lower_sparse_columns(proto, "auto", plan={"a": True})
    for bad in ({"a": "yes"}, [["a"]], 3, {"shape_lowering": {"mode": "auto"}}, [["a", True], ["a", False]]):
        with pytest.raises(ConfigError):
            lower_sparse_columns(proto, plan=bad)
    # A candidate the plan does not name stays dense.
    assert lower_sparse_columns(proto, plan={"a": True}).plan == (("a", True), ("y", False))


def test_read_plan(tmp_path):
    proto = _two_convs()
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"shape_lowering": lower_sparse_columns(proto, "on").report()}))
    assert lowering.read_plan(path) == {"a": True, "y": True}
    with pytest.raises(ConfigError, match="does not exist"):
        lowering.read_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON"):
        lowering.read_plan(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ConfigError, match="shape_lowering"):
        lowering.read_plan(tmp_path / "other.json")


# ---------------------------------------------------------------- on an onnx_ir model, in place
def test_ir_model_is_lowered_in_place():
    import onnx_ir as ir

    proto = _two_convs()
    model = ir.serde.deserialize_model(proto)
    res = lower_sparse_columns_ir(model, "on")
    assert res.model is model and res.plan == (("a", True), ("y", True))
    assert [n.op_type for n in model.graph].count("MatMul") == 2
    out = ir.serde.serialize_model(model)
    assert out.SerializeToString() == lower_sparse_columns(proto, "on").model.SerializeToString()
    assert compare(proto, out).passed


def test_ir_model_without_shapes_gets_them_inferred():
    import onnx_ir as ir

    proto = _two_convs()
    model = ir.serde.deserialize_model(proto)
    relu_out = next(n for n in model.graph if n.op_type == "Relu").outputs[0]
    relu_out.shape = None  # conv_b's input: its shape must be inferred
    assert [c.output for c in find_candidates(model)] == ["a", "y"]
    assert relu_out.shape is not None and list(relu_out.shape) == [1, 8, 10, 10]


def test_cli_replays_a_plan(tmp_path):
    from sslcompress.cli import main

    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_two_convs(), src)
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--report", str(rep)])
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())["shape_lowering"]
    assert report["mode"] == "predict" and report["plan"] == [["a", True], ["y", False]]
    first = out.read_bytes()
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--lowering-plan", str(rep), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["shape_lowering"]["plan"] == report["plan"] and out.read_bytes() == first
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--lowering-plan", str(rep),
                                    "--shape-lowering", "on"])
    assert res.exit_code == 2 and "not both" in res.output
    res = CliRunner().invoke(main, ["surgery", str(src), "-o", str(out), "--lowering-plan", str(tmp_path / "no")])
    assert res.exit_code == 2 and "does not exist" in res.output
