"""What the report says of zeros it could not use: the walls with their reasons, and zeros kept."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sslcompress import compress


def _w(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _model(nodes, inits, x_shape, y_shape):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
                          [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_zero_filters_of_a_graph_output_are_kept_and_counted():
    w = _w(6, 3, 3, 3)
    w[[1, 4]] = 0
    res = compress(_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)], {"w": w},
                          (1, 3, 8, 8), (1, 6, 8, 8)))
    assert res.verification.passed
    assert res.report["zeros_kept"] == {"graph output": 2}
    assert res.report["totals"]["channels_removed"] == 0


def test_a_declining_rule_names_its_reason():
    # A channel shuffle: the Reshape splits the channel axis in two, which no channel can follow.
    w1 = _w(8, 3, 1, 1)
    w1[2] = 0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["t"], name="c1"),
             helper.make_node("Reshape", ["t", "split"], ["u"], name="shuffle_in"),
             helper.make_node("Transpose", ["u"], ["v"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["v", "merge"], ["s"], name="shuffle_out"),
             helper.make_node("Conv", ["s", "w2"], ["y"], name="c2")]
    inits = {"w1": w1, "w2": _w(4, 8, 1, 1, seed=1), "split": np.array([1, 2, 4, 4, 4], np.int64),
             "merge": np.array([1, 8, 4, 4], np.int64)}
    res = compress(_model(nodes, inits, (1, 3, 4, 4), (1, 4, 4, 4)))
    assert res.verification.passed and res.report["totals"]["channels_removed"] == 0
    reasons = " ".join(res.report["blocked_by"])
    assert "Reshape shuffle_in (it neither flattens (batch, features) nor keeps the channel axis)" in reasons
    assert res.report["zeros_kept"] and all("shuffle_in" in why for why in res.report["zeros_kept"])


def test_a_qoperator_model_says_its_quantized_layers_are_walls():
    w = np.random.default_rng(0).integers(-5, 5, size=(4, 3, 3, 3)).astype(np.int8)
    w[1] = 0
    inits = {"xs": np.array(0.05, np.float32), "xz": np.array(0, np.uint8), "w": w,
             "ws": np.array(0.02, np.float32), "wz": np.array(0, np.int8), "ys": np.array(0.1, np.float32),
             "yz": np.array(0, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
             helper.make_node("QLinearConv", ["q", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["qy"], pads=[1] * 4),
             helper.make_node("DequantizeLinear", ["qy", "ys", "yz"], ["y"])]
    res = compress(_model(nodes, inits, (1, 3, 6, 6), (1, 4, 6, 6)))
    assert res.verification.passed and res.report["totals"]["channels_removed"] == 0
    assert res.report["qoperator_layers"] == {"QLinearConv": 1}


def test_the_export_says_how_the_cut_stands_to_the_checkpoints_count():
    from sslcompress.console import count_agreement

    def line(after, counted, align=None):
        return count_agreement({"totals": {"macs_after": after}, "predicted_macs_after": counted, "align": align})

    assert line(21_680_000, 21_680_000) == "MACs after match the checkpoint's count of its removable groups (21.68M)"
    # Fewer is what the count does not model (a conv lowered to im2col over its nonzero columns, say).
    assert line(18_060_000, 18_100_000).startswith("MACs after (18.06M) are below the checkpoint's count")
    assert line(30_340, 20_227, align=8).endswith("--align kept channels it removes")
    assert line(30_340, 20_227).endswith("the surgery kept channels it removes (see blocked_by)")
