"""`sslcompress demo` end to end, at its smoke-test size: every stage runs and every file lands."""

from __future__ import annotations

import json

import onnx
from click.testing import CliRunner

from sslcompress.cli import main


def test_demo_quick_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick", "-q"])
    assert res.exit_code == 0, res.output
    for name in ("pretrained.pt", "sparse.pt", "unstructured.pt", "uncut.onnx", "compact.onnx", "surgery.json", "bench.json", "bench.md"):
        assert (out / name).is_file(), name
        assert str(out / name) in res.output
    surgery = json.loads((out / "surgery.json").read_text())
    assert surgery["verification"]["passed"]
    compact, uncut = onnx.load(str(out / "compact.onnx")), onnx.load(str(out / "uncut.onnx"))
    assert compact.ByteSize() < uncut.ByteSize()
    bench = json.loads((out / "bench.json").read_text())
    variants = {v["name"]: v for v in bench["variants"]}
    assert list(variants) == ["dense", "unstructured", "structured", "dense-int8", "structured-int8"]
    # The unstructured variant is the trained baseline, at exactly the compact model's nonzeros.
    assert "unstructured.pt" in variants["unstructured"]["source"]
    assert variants["unstructured"]["nonzero_weights"] == variants["structured"]["nonzero_weights"]
    # The INT8 variants: the dense and the compact model quantized, calibrated on 32 digits, scored like the rest.
    for base in ("dense", "structured"):
        q = variants[f"{base}-int8"]
        assert q["macs"] == variants[base]["macs"] and q["file_bytes"] < variants[base]["file_bytes"]
        assert "32 training images of digits" in q["source"] and q["accuracy"] is not None
    assert bench["config"]["int8"] and bench["config"]["calibration"] == 32
    assert "INT8 on top of structure:" in " ".join(res.output.split())
    for stage in ("1/4 finetune", "2/4 export", "3/4 unstructured", "4/4 bench"):
        assert stage in res.output


def test_demo_vit_quick_cuts_neurons_and_heads(tmp_path):
    """`demo --model vit`: the built-in ViT learns MLP neurons and attention heads to its MAC budget, and the
    dynamic-batch export (contrib Attention, tokens flattened into rows) is cut to the MACs the training
    counted."""
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--model", "vit", "--out", str(out), "--quick", "-q"])
    assert res.exit_code == 0, res.output
    assert "vit_tiny" in res.output and "neurons kept:" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["structures"] == ["neuron", "head"]
    surgery = json.loads((out / "surgery.json").read_text())
    assert surgery["verification"]["passed"]
    assert surgery["totals"]["macs"] == report["totals"]["macs"]
    assert surgery["totals"]["macs_after"] == report["totals"]["macs_after"] <= 0.4 * report["totals"]["macs"]
    bench = json.loads((out / "bench.json").read_text())
    variants = {v["name"]: v for v in bench["variants"]}
    assert variants["structured"]["macs"] == surgery["totals"]["macs_after"]
