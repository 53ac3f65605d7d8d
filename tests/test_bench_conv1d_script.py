"""benchmarks/bench_conv1d.py: its models cut and verified, timed in bench_resnet's rows; a model it does not
have refused in one line."""

from __future__ import annotations

import json

import pytest
from benchmark_script import benchmark_script

SMALL = ["--keep", "0.5", "--length", "1024", "--batch", "1", "--threads", "1", "--repeat", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def script():
    with benchmark_script("bench_conv1d") as mod:
        yield mod


def test_both_models_are_cut_and_timed(script, tmp_path):
    assert script.main([*SMALL, "--out", str(tmp_path), "--work", str(tmp_path / "work"), "--name", "small"]) == 0
    doc = json.loads((tmp_path / "small.json").read_text())
    assert [c["model"] for c in doc["cases"]] == ["m5", "tcn"]
    for case in doc["cases"]:
        assert {r["variant"] for r in case["rows"]} == {"unstructured", "structured"}
        assert case["channels_zeroed"] == case["channels_total"] // 2
        # Half of every zeroed conv's outputs: M5 loses half of each layer's inputs too (about a quarter of the
        # MACs left), the TCN half of each block's inner channels (its blocks' MACs, nearly all of them).
        assert case["mac_reduction"] > (3.0 if case["model"] == "m5" else 1.9)
    md = (tmp_path / "small.md").read_text()
    assert md.startswith("# Conv1d models: dense vs unstructured vs structured on ONNX Runtime (CPU)")
    assert "| m5 | 50% |" in md and "| tcn | 50% |" in md


def test_an_unknown_model_is_one_line(script, tmp_path, capsys):
    assert script.main([*SMALL, "--models", "m5,wavenet", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --models takes m5, tcn, not wavenet"
    assert list(tmp_path.iterdir()) == []
