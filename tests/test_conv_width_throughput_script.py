"""benchmarks/conv_width_throughput.py: the conv chains it times and the files its smoke run writes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from benchmark_script import benchmark_script


@pytest.fixture(scope="module")
def script():
    with benchmark_script("conv_width_throughput") as mod:
        yield mod


def test_a_chain_is_six_same_width_convs_and_its_macs_are_theirs(script):
    model = onnx.load_from_string(script.conv_chain(8, 16))
    onnx.checker.check_model(model, full_check=True)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert len(convs) == script.LAYERS
    assert all(weights[n.input[1]].shape == (8, 8, 3, 3) for n in convs)
    # Padding 1 keeps the 16x16 map, so each conv costs its weights' size per output pixel.
    assert script.chain_macs(8, 16, 2) == sum(weights[n.input[1]].size for n in convs) * 16 * 16 * 2
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((2, 8, 16, 16), np.float32)})[0]
    assert y.shape == (2, 8, 16, 16) and np.isfinite(y).all() and (y >= 0).all()


def test_the_smoke_run_writes_a_row_per_feature_map_size(script, tmp_path, capsys):
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "conv_width_throughput.json").read_text())
    assert [r["size"] for r in doc["rows"]] == list(script.SIZES)
    for row in doc["rows"]:
        assert set(row["cells"]) == {"8", "16"}
        assert max(c["of_best"] for c in row["cells"].values()) == 1.0
        assert all(c["gmacs"] > 0 and len(c["samples_ms"]) == 3 for c in row["cells"].values())
    md = (tmp_path / "conv_width_throughput.md").read_text()
    assert "| 32x32 | 1 | 1 |" in md and "W = 16" in md


def test_bad_widths_are_refused_in_one_line(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--widths", "0,8"])
    assert exc.value.code == 2
    assert "--widths, --batch and --threads must be positive" in capsys.readouterr().err


def test_the_resnet20_convs_are_the_built_in_models(script):
    from sslcompress.flops import count
    from sslcompress.models import ModelSpec, build_model

    model = build_model(ModelSpec("resnet20", 10, 3, (32, 32))).eval()
    counted = count(model, (1, 3, 32, 32)).macs
    stages = sum(cin * cout * k * k * size * size for cin, cout, size, k in script.resnet20_convs(script.RESNET20_DENSE))
    stem, classifier = 16 * 3 * 9 * 32 * 32, 64 * 10
    assert stages + stem + classifier == counted
    assert len(script.resnet20_convs(script.RESNET20_DENSE)) == 20  # 18 in the blocks, 2 downsamples


def _rows(gmacs_of_width):
    return [{"size": s, "batch": 1, "threads": 1,
             "cells": {str(w): {"gmacs": gmacs_of_width(w)} for w in (8, 16, 32, 64)}} for s in (32, 16, 8)]


def test_the_limit_is_whole_where_every_width_runs_alike_and_falls_where_narrow_ones_run_slower(script):
    flat = _rows(lambda w: 30.0)
    rising = _rows(lambda w: 30.0 * min(1.0, w / 32))
    for widths in script.RESNET20_PLANS.values():
        frac, limit = script.limit_from_throughput(flat, widths, 1, 1)
        assert 0 < frac < 1 and limit == pytest.approx(1.0)
        assert script.limit_from_throughput(rising, widths, 1, 1)[1] < 0.95
    assert script.limit_from_throughput(rising, script.RESNET20_DENSE, 1, 1) == pytest.approx((1.0, 1.0))
