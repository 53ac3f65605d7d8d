"""The runtime room: sessions from any model form, clear errors, I/O runner, the interleaved harness."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sslcompress import runtime
from sslcompress.errors import ConfigError, UnsupportedModelError
from sslcompress.runtime.binding import io_of, runner
from sslcompress.runtime.providers import ProviderUnavailableError, check_provider
from sslcompress.runtime.sessions import create_session, session_options
from sslcompress.runtime.timing import interleaved, rounds


def _model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _expected(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ np.arange(6, dtype=np.float32).reshape(3, 2), 0)


def test_create_session_from_bytes_path_and_proto(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    for source in (model, model.SerializeToString(), path, str(path)):
        for optimization in ("all", "basic", "disable"):
            sess = create_session(source, optimization=optimization)
            assert sess.get_providers() == ["CPUExecutionProvider"]
            np.testing.assert_allclose(sess.run(None, {"x": x})[0], _expected(x), rtol=1e-6)
    assert runtime.create_session is create_session  # the package-level name


def test_session_options():
    so = session_options(3, optimization="basic")
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError):  # ORT raises for an entry that was never set
        session_options(1, spinning_stop=False).get_session_config_entry("session.force_spinning_stop")
    for bad in ({"threads": 0}, {"threads": 1.5}, {"optimization": "max"}):
        with pytest.raises(ConfigError):
            create_session(_model(), **bad)


def test_models_ort_cannot_load_are_unsupported(tmp_path):
    with pytest.raises(UnsupportedModelError, match="ONNX Runtime cannot load the model"):
        create_session(b"garbage, not a protobuf")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01\x02")
    with pytest.raises(UnsupportedModelError):
        create_session(bad)
    unknown = _model()
    unknown.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(UnsupportedModelError):
        create_session(unknown)
    with pytest.raises(ConfigError, match="bytes, a path or an onnx.ModelProto"):
        create_session(42)


def test_providers(monkeypatch):
    assert check_provider("cpu") == "CPUExecutionProvider"
    with pytest.raises(ConfigError, match="cpu, cuda"):
        check_provider("tpu")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailableError, match=r"pip install sslcompress\[gpu\]"):
        create_session(_model(), provider="cuda")


def test_runner_runs_one_inference_per_call():
    sess = create_session(_model())
    io = io_of(sess)
    assert (io.input, io.output, io.shape) == ("x", "y", (None, 3))
    run = runner(sess, np.ones((2, 3), np.float32), "cpu")
    assert run() is None and run() is None  # outputs stay with ORT: a timing sample copies nothing back
    with pytest.raises(ConfigError, match="one input"):
        two = _model()
        two.graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1]))
        io_of(create_session(two))


def test_interleaved_rotates_and_rounds_stop():
    order: list[str] = []
    runs = {n: (lambda n=n: order.append(n)) for n in "ab"}
    raw = interleaved(runs, repeat=3, warmup=0, sample_time=1e-9)
    assert {n: len(s) for n, (_, s) in raw.items()} == {"a": 3, "b": 3}
    samplers = {n: (lambda n=n: order.append(n) or 1.0) for n in "xyz"}
    order.clear()
    out = rounds(samplers, min_rounds=2)
    assert out == {"x": (1.0, 1.0), "y": (1.0, 1.0), "z": (1.0, 1.0)} and order == list("xyzyzx")


def test_timing_imports_numpy_alone():
    import subprocess

    code = "import sys, sslcompress.runtime.timing; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
