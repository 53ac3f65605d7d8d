"""benchmarks/int8_stem_fold.py: each model quantized with and without the stem fold, all timed side by side."""

from __future__ import annotations

import json

import onnx
import pytest
from benchmark_script import benchmark_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    with benchmark_script("int8_stem_fold") as mod:
        yield mod


def test_a_run_times_six_models_and_only_the_folded_ones_hold_the_fold(script, tmp_path):
    args = ["--models", "resnet18", "--keep", "0.5", "--size", "32", "--batch", "1", "--repeat", "2",
            "--warmup", "1", "--calibration", "4", "--out", str(tmp_path), "--work", str(tmp_path / "work"),
            "--name", "small"]
    assert script.main(args) == 0
    doc = json.loads((tmp_path / "small.json").read_text())
    (case,) = doc["cases"]
    assert case["scope"] == "all" and case["align"] == 16 and case["macs_after"] < 0.35 * case["macs"]
    (row,) = case["rows"]
    assert set(row["ms"]) == {f"{k}:{v}" for k in ("dense", "structured") for v in script.VARIANTS}
    for kind in ("dense", "structured"):
        got = row[kind]
        assert got["fold_gain"] == pytest.approx(got["int8_fold"] / got["int8_plain"])
    md = (tmp_path / "small.md").read_text()
    assert f"| resnet18 | 50% | {case['macs_after'] / case['macs']:.1%} | 1 |" in md

    images = script.calibration_images("synthetic:3x32x32:10", (None, 3, 32, 32), 4, 0)
    pair = script.quantized_pair(tmp_path / "work" / "resnet18_0.5_structured.onnx", images)
    ops = {k: {n.op_type for n in onnx.load_from_string(b).graph.node} for k, b in pair.items()}
    assert "SpaceToDepth" in ops["int8_fold"]
    assert "SpaceToDepth" not in ops["int8_plain"] and "SpaceToDepth" not in ops["fp32"]
    assert "QuantizeLinear" in ops["int8_plain"] and "QuantizeLinear" not in ops["fp32"]
