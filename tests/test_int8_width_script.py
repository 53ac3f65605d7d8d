"""benchmarks/int8_width.py: the chains it quantizes, ResNet-18's convs it weighs them by, and its smoke run."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from benchmark_script import benchmark_script


@pytest.fixture(scope="module")
def script():
    with benchmark_script("int8_width") as mod:
        yield mod


def test_the_grid_holds_every_plan_width_and_each_stage_whole(script):
    grid = script.grid()
    assert grid == {56: [16, 32, 48, 64], 28: [32, 64, 96, 128], 14: [64, 128, 192, 256], 7: [128, 256, 384, 512]}
    for widths in script.plans().values():
        for (size, _), w in zip(script.STAGES, widths):
            assert grid[size][0] <= w <= grid[size][-1]
    assert script.plans()["keep 0.5"] == (32, 64, 128, 256)


def test_the_int8_chain_is_integer_convs_close_to_the_float_one(script):
    size, width = 7, 16
    calibrated = script.calibration(width, size)
    quantized = onnx.load_from_string(script.int8_chain(width, size, calibrated))
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("Conv") == script.LAYERS and "QuantizeLinear" in ops and "DequantizeLinear" in ops
    fp32 = ort.InferenceSession(script.conv_chain(width, size), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    x = calibrated[:3]  # another batch than the calibration's: the batch stays free
    ref, got = (s.run(None, {"x": x})[0] for s in (fp32, int8))
    assert got.shape == ref.shape == (3, width, size, size)
    # INT8 is an approximation: close to the float chain relative to its range, not equal
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_the_resnet18_convs_are_the_built_in_model_s(script):
    from sslcompress.flops import count
    from sslcompress.models import ModelSpec, build_model

    model = build_model(ModelSpec("resnet18", 1000, 3, (224, 224))).eval()
    counted = count(model, (1, 3, 224, 224)).macs
    dense = script.plans()["dense"]
    blocks = sum(cin * cout * k * k * size * size for cin, cout, size, k in script.resnet18_convs(dense))
    stem, classifier = 64 * 3 * 49 * 112 * 112, 512 * 1000
    assert blocks + stem + classifier == counted
    assert len(script.resnet18_convs(dense)) == 19  # 16 in the blocks, 3 downsamples


def _rows(script, int8_gmacs):
    return [{"size": s, "batch": 1, "threads": 1,
             "cells": {str(w): {"fp32": {"gmacs": 50.0}, "int8": {"gmacs": int8_gmacs(w)}} for w in ws}}
            for s, ws in script.grid().items()]


def test_a_flat_int8_gain_compounds_whole_and_one_rising_with_width_does_not(script):
    flat = script.compounding(_rows(script, lambda w: 150.0), [1], [1])
    assert [c["plan"] for c in flat] == ["dense", "keep 0.7", "keep 0.5"]
    assert all(c["int8_factor"] == pytest.approx(3.0) and c["of_dense_factor"] == pytest.approx(1.0) for c in flat)
    assert flat[0]["mac_fraction"] == 1.0 and 0.2 < flat[2]["mac_fraction"] < 0.3 < flat[1]["mac_fraction"] < 0.6
    rising = script.compounding(_rows(script, lambda w: 100.0 + w / 4), [1], [1])
    shares = [c["of_dense_factor"] for c in rising]
    assert shares[0] == 1.0 and shares[2] < shares[1] < 1.0


def test_the_smoke_run_writes_a_row_per_size_and_no_plan_table(script, tmp_path):
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "int8_width.json").read_text())
    assert [r["size"] for r in doc["rows"]] == [14, 7]
    for row in doc["rows"]:
        assert len(row["cells"]) == 2
        for cell in row["cells"].values():
            assert cell["fp32"]["ms"] > 0 and cell["int8"]["ms"] > 0
            assert cell["int8_factor"] == pytest.approx(cell["fp32"]["ms"] / cell["int8"]["ms"])
    assert doc["compounding"] == []  # the plans' widths lie outside a partial grid
    md = (tmp_path / "int8_width.md").read_text()
    assert "| 14x14 | 1 | 1 | 64 |" in md and "What these factors allow" not in md


def test_bad_settings_are_refused_in_one_line(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--batch", "0"])
    assert exc.value.code == 2
    assert "--batch and --threads must be positive" in capsys.readouterr().err
