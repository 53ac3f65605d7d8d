"""benchmarks/bench_resnet.py: the provider it is asked for, in its rows and tables; CUDA refused in one line
where this onnxruntime has no CUDA EP."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch
from benchmark_script import benchmark_script

SMALL = ["--models", "resnet18", "--keep", "0.5", "--size", "32", "--batch", "1", "--threads", "1",
         "--repeat", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def script():
    with benchmark_script("bench_resnet") as mod:
        yield mod


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime runs CUDA")
def test_cuda_without_its_provider_is_one_line_before_any_model(script, tmp_path, capsys):
    assert script.main([*SMALL, "--provider", "cuda", "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --provider cuda needs onnxruntime-gpu") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_cpu_run_names_its_provider_and_host(script, tmp_path):
    assert script.main([*SMALL, "--provider", "cpu", "--out", str(tmp_path), "--work", str(tmp_path / "work"),
                        "--name", "small"]) == 0
    doc = json.loads((tmp_path / "small.json").read_text())
    (case,) = doc["cases"]
    assert {r["provider"] for r in case["rows"]} == {"cpu"}
    assert {r["variant"] for r in case["rows"]} == {"unstructured", "structured"}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    assert case["bench"]["env"]["cuda_device"] == gpu
    md = (tmp_path / "small.md").read_text()
    assert md.startswith("# Dense vs unstructured vs structured on ONNX Runtime (CPU)")
    assert "--provider cpu" in md and f"ORT {ort.__version__}" in md
    assert "| resnet18 | 50% |" in md and "| cpu | 1 | 1 |" in md


def test_half_times_both_models_in_float16(script, tmp_path):
    import onnx

    work = tmp_path / "work"
    assert script.main([*SMALL, "--half", "--out", str(tmp_path), "--work", str(work), "--name", "half"]) == 0
    for path in sorted(work.glob("*.onnx")):
        assert path.stem.endswith("_fp16")
        assert onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert len(list(work.glob("*.onnx"))) == 2
    doc = json.loads((tmp_path / "half.json").read_text())
    (case,) = doc["cases"]
    assert any("float16 inputs" in n for n in case["bench"]["notes"])
    assert (tmp_path / "half.md").read_text().startswith("# Dense vs unstructured vs structured on ONNX Runtime, "
                                                         "float16 (CPU)")
