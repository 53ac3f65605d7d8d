"""benchmarks/latency_prediction.py: the provider it is asked for, refused in one line where this onnxruntime has
no CUDA EP, named in its results, which go to --out."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
from benchmark_script import benchmark_script


@pytest.fixture(scope="module")
def script():
    with benchmark_script("latency_prediction") as mod:
        yield mod


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime runs CUDA")
def test_cuda_without_its_provider_is_one_line_before_any_model(script, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(script, "run_model", lambda *a: built.append(a))
    with pytest.raises(SystemExit) as exc:
        script.main(["--provider", "cuda", "--out", str(tmp_path), "--table-dir", str(tmp_path / "t")])
    msg = str(exc.value.code)
    assert msg.startswith("error: --provider cuda needs onnxruntime-gpu") and "\n" not in msg
    assert built == [] and list(tmp_path.iterdir()) == []


def test_results_go_to_out_and_name_the_provider(script, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(script, "run_model", lambda name, args, cases, tables: seen.append((name, args.provider)))
    script.main(["--models", "resnet20", "--out", str(tmp_path), "--name", "lp", "--table-dir", str(tmp_path / "t")])
    assert seen == [("resnet20", "cpu")]
    doc = json.loads((tmp_path / "lp.json").read_text())
    assert doc["args"]["provider"] == "cpu" and "cuda_device" in doc["machine"]
    assert "CPU EP, 1 thread" in (tmp_path / "lp.md").read_text()
    # A CUDA run's page says which GPU and how the calls were timed, and how to run it again.
    doc["args"]["provider"], doc["machine"]["cuda_device"] = "cuda", "NVIDIA H200"
    md = script.render_markdown(doc)
    assert "CUDA EP on NVIDIA H200" in md and "--provider cuda`" in md and "CPU EP" not in md
