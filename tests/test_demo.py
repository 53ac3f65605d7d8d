"""`sslcompress demo` end to end, at its smoke-test size: every stage runs and every file lands."""

from __future__ import annotations

import json

import onnx
from click.testing import CliRunner

from sslcompress.cli import main


def test_demo_quick_runs_all_three_stages(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick", "-q"])
    assert res.exit_code == 0, res.output
    for name in ("pretrained.pt", "sparse.pt", "uncut.onnx", "compact.onnx", "surgery.json", "bench.json", "bench.md"):
        assert (out / name).is_file(), name
        assert str(out / name) in res.output
    surgery = json.loads((out / "surgery.json").read_text())
    assert surgery["verification"]["passed"]
    compact, uncut = onnx.load(str(out / "compact.onnx")), onnx.load(str(out / "uncut.onnx"))
    assert compact.ByteSize() < uncut.ByteSize()
    bench = json.loads((out / "bench.json").read_text())
    assert {v["name"] for v in bench["variants"]} == {"dense", "unstructured", "structured"}
    assert "1/3 finetune" in res.output and "2/3 export" in res.output and "3/3 bench" in res.output
