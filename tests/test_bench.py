"""`sslcompress bench`: the three variants, result fields, JSON, Markdown, plots, refusals. No timing asserted."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnx_edits import free_height_and_width

from sslcompress import runtime
from sslcompress.bench import layers as L
from sslcompress.bench.config import BenchConfig
from sslcompress.bench.report import render_markdown
from sslcompress.bench.results import BenchResult
from sslcompress.bench.run import run_bench
from sslcompress.bench.variants import build_variants, keep_largest, layer_nonzeros, magnitude_match
from sslcompress.cli import main
from sslcompress.errors import ConfigError
from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
from sslcompress.models import ModelSpec, build_model
from sslcompress.runtime.timing import MIN_ROUNDS, bootstrap_ratio, interleaved, timings

FAST = ["--threads", "1", "--batch", "1", "--repeat", "2", "--warmup", "0", "-q"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finetune-like run folder: a dense LeNet (pretrained.pt) and a copy with zero channels (sparse.pt)."""
    torch.manual_seed(0)
    spec = ModelSpec("lenet5", 10, 1, (28, 28))
    dense = build_model(spec)
    sparse = build_model(spec)
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        sparse.conv1.weight[6:] = 0
        sparse.conv1.bias[6:] = 0
        sparse.conv2.weight[30:] = 0
        sparse.conv2.bias[30:] = 0
        sparse.fc1.weight[200:] = 0
        sparse.fc1.bias[200:] = 0
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(d / "pretrained.pt", Checkpoint("pretrained", spec, dense.state_dict()))
    save_checkpoint(d / "sparse.pt", Checkpoint("sparse", spec, sparse.state_dict()))
    return d


@pytest.fixture(scope="module")
def result(run_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    config = BenchConfig(target=str(run_dir), threads=(1,), batches=(1, 2), repeat=4, warmup=1, data="digits",
                         data_limit=40, models_dir=str(models))
    return run_bench(config)


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


# ---------------------------------------------------------------- fields
def test_result_fields_are_present_and_consistent(result):
    assert [v.name for v in result.variants] == ["dense", "unstructured", "structured"]
    dense, unstr, struct = result.variants
    assert "pretrained.pt" in dense.source and "sparse.pt" in struct.source
    for v in result.variants:
        assert v.file_bytes > 0 and v.macs > 0 and v.parameters > 0 and v.nonzero_weights > 0
        assert v.input_shape[1:] == (1, 28, 28)
        assert v.memory is not None and v.memory.peak_bytes >= v.memory.baseline_bytes > 0
        assert v.memory.growth_bytes == v.memory.peak_bytes - v.memory.baseline_bytes
        assert 0.0 <= v.accuracy <= 1.0 and v.accuracy_images == 40
        assert v.path and onnx.load(v.path).graph.node
    assert unstr.macs == dense.macs > struct.macs  # dense kernels run every weight, zero or not
    assert struct.parameters < dense.parameters and struct.file_bytes < dense.file_bytes
    assert result.settings() == [("cpu", 1, 1), ("cpu", 1, 2)]
    for provider, threads, batch in result.settings():
        base = result.timing("dense", provider, threads, batch)
        assert base.speedup == 1.0 and base.speedup_ci == (1.0, 1.0)
        for name in ("dense", "unstructured", "structured"):
            t = result.timing(name, provider, threads, batch)
            assert len(t.samples_s) == 4 and all(s > 0 for s in t.samples_s) and t.calls_per_sample >= 1
            assert t.median_s == statistics.median(t.samples_s)
            assert t.q1_s <= t.median_s <= t.q3_s <= max(t.samples_s) and t.p90_s >= t.median_s
            assert t.iqr_s == pytest.approx(t.q3_s - t.q1_s)
            assert t.throughput == pytest.approx(batch / t.median_s)
            assert t.speedup == pytest.approx(statistics.median(base.samples_s) / statistics.median(t.samples_s),
                                              rel=1e-12)
            assert t.speedup_ci[0] <= t.speedup <= t.speedup_ci[1]
    assert any("dense kernels" in n for n in result.notes)
    assert any("session.force_spinning_stop=1" in n for n in result.notes)
    assert result.env["onnxruntime"] and result.env["cpus"] >= 1


def test_unstructured_has_the_structured_nonzero_count(result):
    dense, unstr, struct = result.variants
    assert unstr.nonzero_weights == struct.nonzero_weights < dense.nonzero_weights
    assert set(unstr.layer_nonzeros) == set(dense.layer_nonzeros)
    for name, n in unstr.layer_nonzeros.items():
        assert n == struct.layer_nonzeros.get(name, 0), name
    assert result.matching and all(m.kept == m.target for m in result.matching)
    assert result.unmatched == ()


def test_unstructured_keeps_the_largest_weights_and_leaves_biases(result):
    dense = onnx.load(result.variant("dense").path)
    unstr = onnx.load(result.variant("unstructured").path)
    d = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    u = {t.name: numpy_helper.to_array(t) for t in unstr.graph.initializer}
    conv1 = next(n for n in dense.graph.node if n.name == "/conv1/Conv")
    w, wu = d[conv1.input[1]], u[conv1.input[1]]
    kept = wu != 0
    assert np.array_equal(wu[kept], w[kept]) and np.abs(w[~kept]).max() <= np.abs(w[kept]).min()
    np.testing.assert_array_equal(u[conv1.input[2]], d[conv1.input[2]])


def _model(nodes, inits, out_shape):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_shape])
    g = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_layer_the_surgery_removed_keeps_no_weight():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    dense = _model([helper.make_node("MatMul", ["x", "A"], ["h"], name="fa"),
                    helper.make_node("MatMul", ["h", "B"], ["y"], name="fb")], {"A": a, "B": b}, 3)
    sa = a[:, :2].copy()
    sa[0, 0] = 0.0
    structured = _model([helper.make_node("MatMul", ["x", "A"], ["y"], name="fa")], {"A": sa}, 2)
    out, rows, unmatched = magnitude_match(dense, structured)
    counts = layer_nonzeros(out)
    assert counts == {"fa": 7, "fb": 0} and unmatched == ()
    assert [(r.name, r.target, r.kept) for r in rows] == [("fa", 7, 7), ("fb", 0, 0)]
    other = _model([helper.make_node("MatMul", ["x", "A"], ["y"], name="zz")], {"A": sa}, 2)
    with pytest.raises(ConfigError, match="no layer"):
        magnitude_match(dense, other)


def test_keep_largest():
    w = np.array([[3.0, -1.0], [-5.0, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(keep_largest(w, 2), [[3.0, 0.0], [-5.0, 0.0]])
    assert np.count_nonzero(keep_largest(w, 0)) == 0 and np.array_equal(keep_largest(w, 9), w)


# ---------------------------------------------------------------- statistics
def test_bootstrap_interval_holds_the_point_and_is_seeded():
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 7, 30):
        d, o = list(1 + rng.random(n)), list(0.5 + rng.random(n))
        lo, hi = bootstrap_ratio(d, o, seed=3)
        point = statistics.median(d) / statistics.median(o)
        assert lo <= point <= hi
        assert bootstrap_ratio(d, o, seed=3) == (lo, hi)


def test_interleaved_rotates_and_honours_min_time():
    order: list[str] = []
    runs = {n: (lambda n=n: order.append(n)) for n in "abc"}
    raw = interleaved(runs, repeat=3, warmup=0, sample_time=1e-9)
    assert {n: len(s) for n, (_, s) in raw.items()} == {"a": 3, "b": 3, "c": 3}
    timed = [x for x in order[9:]]  # 3 calibration calls each come first
    assert timed[:3] == ["a", "b", "c"] and timed[3:6] == ["b", "c", "a"] and timed[6:9] == ["c", "a", "b"]
    raw = interleaved(runs, repeat=None, min_time=1e-6, warmup=0, sample_time=1e-9)
    assert len(raw["a"][1]) >= MIN_ROUNDS
    t = timings({"dense": (1, (2.0, 4.0, 3.0)), "x": (1, (1.0, 1.0, 2.0))}, baseline="dense", provider="cpu",
                threads=1, batch=1)
    assert t[1].speedup == 3.0 and t[1].speedup_ci[0] <= 3.0 <= t[1].speedup_ci[1]
    with pytest.raises(ConfigError):
        interleaved(runs, repeat=2, min_time=1.0)


def test_session_settings():
    so = runtime.session_options(2, pin=True)
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    where = runtime.placement(2)
    if where is not None:  # two CPUs or more: the one worker on the second, ids 1-based for ORT
        assert so.get_session_config_entry("session.intra_op_thread_affinities") == str(where[1][0] + 1)
    assert runtime.placement(10_000) is None
    with pytest.raises(RuntimeError):  # ORT raises for an entry that was never set
        runtime.session_options(1, pin=True).get_session_config_entry("session.intra_op_thread_affinities")


# ---------------------------------------------------------------- JSON and Markdown
def test_json_round_trip(result):
    back = BenchResult.from_json(result.to_json())
    assert back == result
    assert json.loads(back.to_json()) == json.loads(result.to_json())


def test_markdown(result):
    md = render_markdown(result)
    assert md.startswith("# sslcompress bench: ")
    for part in ("## variants", "## latency: cpu, 1 thread(s)", "| unstructured |", "dense kernels", "## Notes",
                 "speed-up [95% CI]", "images/s", "MACs/image"):
        assert part in md, part


def test_env_names_the_cpu_and_its_extensions(result):
    # INT8 and float speed-ups depend on the CPU's extensions (VNNI above all): the record says which.
    from sslcompress.runtime.cpu import cpu_isa, cpu_model

    assert result.env["cpu"] == cpu_model()
    assert result.env["cpu_isa"] == list(cpu_isa())
    header = render_markdown(result).splitlines()[2]
    assert f"of {cpu_model()} (" in header
    old = BenchResult.from_json(result.to_json())
    for key in ("cpu", "cpu_isa"):
        old.env.pop(key)
    assert " of " not in render_markdown(old).splitlines()[2]  # results written before the field still render


def test_cli_json_out_and_markdown(run_dir, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    res = CliRunner().invoke(main, ["bench", str(run_dir), *FAST, "--json", "--out", str(out), "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.output)
    assert printed == json.loads(out.read_text())
    r = BenchResult.from_dict(printed)
    assert r.config.threads == (1,) and r.config.batches == (1,) and len(r.timings) == 3
    assert "dense kernels" in md.read_text()


def test_cli_table_says_unstructured_runs_dense_kernels(run_dir):
    res = CliRunner().invoke(main, ["bench", str(run_dir / "sparse.pt"), *FAST])
    assert res.exit_code == 0, res.output
    assert "with the same dense kernels" in " ".join(res.output.split())
    assert "latency: cpu, 1 thread(s)" in res.output and "structured" in res.output


# ---------------------------------------------------------------- sources and overrides
def test_a_checkpoint_alone_uses_its_uncut_export_as_dense(run_dir):
    v = build_variants(run_dir / "sparse.pt")
    assert "uncut" in v.dense.source and "surgery" in v.structured.source
    counts = layer_nonzeros(v.unstructured.model)
    assert counts == {n: layer_nonzeros(v.structured.model).get(n, 0) for n in counts}


def test_overrides(result, tmp_path):
    d, s, u = (result.variant(n).path for n in ("dense", "structured", "unstructured"))
    v = build_variants(None, dense=d, structured=s)
    assert v.dense.source == f"given: {d}" and v.structured.source == f"given: {s}"
    assert layer_nonzeros(v.unstructured.model) == result.variant("unstructured").layer_nonzeros
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", "--dense", d, "--structured", s, "--unstructured", u, *FAST,
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = BenchResult.from_json(out.read_text())
    assert [v.source for v in r.variants] == [f"given: {d}", f"given: {u}", f"given: {s}"]
    assert r.matching == ()


def test_an_onnx_target_with_zeros(run_dir, tmp_path):
    from sslcompress.surgery.export import save_onnx

    uncut = tmp_path / "uncut.onnx"  # a dense-shaped ONNX model with exact zeros, from anywhere
    save_onnx(build_variants(run_dir / "sparse.pt").dense.model, uncut)
    v = build_variants(uncut)
    assert v.dense.source == f"{uncut} uncut" and v.structured.source == f"surgery of {uncut}"
    assert sum(layer_nonzeros(v.unstructured.model).values()) == sum(layer_nonzeros(v.structured.model).values())


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("args, words", [
    (["/nonexistent/run"], "not found"),
    (["--dense", "/nonexistent/d.onnx", "--structured", "/nonexistent/s.onnx"], "not found"),
    (["--threads", "0"], "--threads"),
    (["--batch", "x"], "--batch"),
    (["--repeat", "3", "--min-time", "1"], "not both"),
    ([], "give a run folder"),
])
def test_bad_inputs_are_one_line(args, words):
    res = CliRunner().invoke(main, ["bench", *args])
    assert words in _one_line_error(res)


def test_not_onnx_and_empty_run_dir(run_dir, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 20)
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--structured", str(junk), *FAST])
    line = _one_line_error(res)
    assert "--structured" in line and "ONNX" in line
    res = CliRunner().invoke(main, ["bench", str(tmp_path), *FAST])
    assert "sparse.pt" in _one_line_error(res)
    res = CliRunner().invoke(main, ["bench", str(junk), *FAST])
    assert "ONNX" in _one_line_error(res)


def test_static_batch_override_refuses_another_batch(run_dir, tmp_path):
    from sslcompress.finetune.checkpoint import load_checkpoint
    from sslcompress.surgery.export import export_onnx, save_onnx

    ckpt = load_checkpoint(run_dir / "pretrained.pt")
    static = tmp_path / "static.onnx"
    save_onnx(export_onnx(ckpt.build(), (1, 1, 28, 28)).model, static)
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--dense", str(static), "--threads", "1", "--batch",
                                    "1,4", "--repeat", "2", "-q"])
    assert "exactly 1" in _one_line_error(res)


def test_cuda_request_without_onnxruntime_gpu(run_dir):
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--provider", "cpu,cuda", *FAST])
    line = _one_line_error(res)
    assert "pip install sslcompress[gpu]" in line and "onnxruntime-gpu" in line


def test_cuda_provider_listed_but_no_gpu(run_dir, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--provider", "cuda", *FAST])
    line = _one_line_error(res)
    assert "pip install sslcompress[gpu]" in line and "did not start" in line


def test_unknown_provider(run_dir):
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--provider", "tpu", *FAST])
    assert "tpu" in _one_line_error(res)


# ---------------------------------------------------------------- per-layer studies, plot
def test_layers_on_a_tiny_model(run_dir, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--layers", *FAST, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "per-layer GEMM study: cpu, 1 thread(s)" in res.output
    r = BenchResult.from_json(out.read_text())
    assert [x.name for x in r.layers] == ["/conv1/Conv", "/conv2/Conv"]
    c1, c2 = r.layers
    assert (c1.M, c1.K, c1.N) == (20, 25, 576) and c1.compact == (6, 25)
    assert (c2.M, c2.K, c2.N) == (50, 500, 64) and c2.compact == (30, 150)
    for x in r.layers:
        c = x.structured.get(L.COMPACT)
        assert x.unstructured.get(L.DENSE).M == x.M and (c.M, c.K) == x.compact
        assert x.unstructured.nnz == r.variant("structured").layer_nonzeros[x.name]
        for c in (L.CSR, L.COMPACT):
            assert x.speedup(c) > 0
        assert x.ideal == pytest.approx(x.M * x.K / (x.compact[0] * x.compact[1]))
    # more threads that made the dense GEMM much slower (a busy machine) earn a note
    from dataclasses import replace

    from sslcompress.bench.run import _thread_warnings

    slow = replace(c1.unstructured, timings=tuple(
        replace(t, samples_s=tuple(10 * v for v in t.samples_s)) if t.contender == L.DENSE else t
        for t in c1.unstructured.timings))
    assert _thread_warnings([c1]) == []
    (note,) = _thread_warnings([c1, replace(c1, threads=2, unstructured=slow)])
    assert "at 2 threads" in note and "10x slower" in note


def test_embed_keeps_the_compact_shape_where_a_kept_row_is_zero():
    from sslcompress.bench.modelstudy import embed

    wc = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    wc[1] = 0  # a filter the structured model still computes (kept by a residual coupling)
    wc[:, 2] = 0
    w = embed(wc, 5, 7)
    gemm = L.LayerGemm("x", 5, 7, 4, w)
    assert (len(gemm.kept_rows), len(gemm.kept_cols)) == (3, 4)
    assert not w[3:].any() and not w[:, 4:].any()
    t = L.study([gemm], (L.DENSE, L.COMPACT), repeat=1, warmup=0, sample_time=1e-4)[0]
    assert (t.get(L.COMPACT).M, t.get(L.COMPACT).K) == (3, 4)


@pytest.fixture()
def tiny_alexnet(monkeypatch):
    shapes = tuple(L.ConvShape.of(f"conv{i}", o, c, k, hw, pad=p) for i, (o, c, k, hw, p) in enumerate(
        [(8, 3, 3, 9, 1), (12, 8, 3, 5, 1), (16, 12, 3, 4, 1), (12, 16, 3, 4, 1), (12, 12, 3, 4, 1)], start=1))
    monkeypatch.setitem(L.ALEXNET_SHAPES, "torchvision", shapes)


def test_paper_table_alexnet(tiny_alexnet):
    res = CliRunner().invoke(main, ["bench", "--paper-table", "alexnet", "--threads", "1", "--repeat", "1",
                                    "--warmup", "0", "--json"])
    assert res.exit_code == 0, res.output
    r = BenchResult.from_json(res.output)
    assert r.variants == () and r.timings == () and r.paper is not None
    (run,) = r.paper.runs
    assert run.threads == 1 and [t.name for t in run.l1] == [p.layer for p in L.TABLE4]
    s = run.summary()
    assert s["paper_ssl"] == pytest.approx(L.paper_mean("cpu_ssl")) and s["ssl"] > 0 and s["l1_torch_csr"] > 0
    md = render_markdown(r)
    assert "Table 4 (alexnet" in md and "paper SSL x" in md
    res = CliRunner().invoke(main, ["bench", "--paper-table", "alexnet", "--threads", "1", "--repeat", "1",
                                    "--warmup", "0"])
    assert res.exit_code == 0 and "Table 4" in res.output


def test_plot(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--layers", *FAST, "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "b.png"
    res = CliRunner().invoke(main, ["bench", str(run_dir), *FAST, "--plot", str(png)])
    assert "pip install sslcompress[plot]" in _one_line_error(res)
    assert not png.exists()


# ---------------------------------------------------------------- edges found in review
def _as_constant_nodes(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _nonzeros_match(v) -> None:
    assert layer_nonzeros(v.unstructured.model) == layer_nonzeros(v.structured.model)


def test_weights_in_constant_nodes_and_shared_weights_are_matched_layer_by_layer(run_dir, tmp_path):
    from sslcompress.surgery.export import save_onnx

    base = build_variants(run_dir / "sparse.pt")
    d, s = tmp_path / "d.onnx", tmp_path / "s.onnx"
    save_onnx(_as_constant_nodes(base.dense.model), d)
    save_onnx(_as_constant_nodes(base.structured.model), s)
    v = build_variants(None, dense=d, structured=s)
    _nonzeros_match(v)
    assert sum(layer_nonzeros(v.structured.model).values()) > 0

    # fc2 and fc3 read one weight in the dense model; the structured one keeps them apart
    w = np.ones((8, 8), np.float32)
    ws = w.copy()
    ws[:, 4:] = 0
    def mlp(fc2_w, fc3_w):
        nodes = [helper.make_node("Gemm", ["x", "a"], ["h"], name="fc2"), helper.make_node("Gemm", ["h", "b"], ["y"], name="fc3")]
        inits = [numpy_helper.from_array(fc2_w, "a")] + ([numpy_helper.from_array(fc3_w, "b")] if fc3_w is not None else [])
        if fc3_w is None:
            nodes[1].input[1] = "a"
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m
    save_onnx(mlp(w, None), d)
    save_onnx(mlp(ws, w), s)
    v = build_variants(None, dense=d, structured=s)
    _nonzeros_match(v)


def test_variants_must_compute_the_same_outputs_from_float_images(result, tmp_path):
    from sslcompress.surgery.export import save_onnx

    s = onnx.load(result.variant("structured").path)
    s.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    bad = tmp_path / "s5.onnx"
    onnx.save(s, str(bad))
    res = CliRunner().invoke(main, ["bench", "--dense", result.variant("dense").path, "--structured", str(bad), *FAST])
    assert "different outputs" in _one_line_error(res)
    d = onnx.load(result.variant("dense").path)
    d.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    save_onnx(d, tmp_path / "d64.onnx")
    res = CliRunner().invoke(main, ["bench", "--dense", str(tmp_path / "d64.onnx"), "--structured",
                                    result.variant("structured").path, *FAST])
    assert "not float32 or float16" in _one_line_error(res)


def test_a_model_without_zeros_says_so(run_dir, tmp_path):
    r = run_bench(BenchConfig(target=str(run_dir / "pretrained.pt"), threads=(1,), batches=(1,), repeat=2, warmup=0,
                              memory=False))
    assert "no smaller than the dense one" in r.notes[0]


def test_oversubscribed_threads_are_not_called_pinned(result):
    from sslcompress.bench import run as run_mod

    many = len(runtime.usable_cpus()) + 1
    notes = run_mod._notes(BenchConfig(target="x", threads=(many,)), build_variants(None,
                           dense=result.variant("dense").path, structured=result.variant("structured").path),
                           {v.name: v for v in result.variants})
    assert "oversubscribed" in notes[1] and "Placement" not in notes[1]


def test_static_batches_score_the_same_images():
    from sslcompress.bench.accuracy import TestImages, common_images

    images = TestImages("t", np.zeros((10, 1, 2, 2), np.float32), np.zeros(10, np.int64))
    assert len(common_images(images, [None, 4, 2]).x) == 8
    assert len(common_images(images, [None, None]).x) == 10


def test_a_failed_run_writes_no_models(run_dir, tmp_path):
    models = tmp_path / "models"
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--data", "synthetic:3x9x9:4", "--models-dir",
                                    str(models), *FAST])
    _one_line_error(res)
    assert not models.exists() or not any(models.iterdir())


def _half(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model in float16, as a user's fp16 export would be: weights, constants, input and output."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for i, t in enumerate(out.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                                                      t.name))
    for node in out.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
    for v in (*out.graph.input, *out.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del out.graph.value_info[:]
    onnx.checker.check_model(out)
    return out


def test_float16_models_are_timed_and_scored_in_half_precision(result, tmp_path):
    paths = {}
    for name in ("dense", "structured"):
        paths[name] = tmp_path / f"{name}16.onnx"
        onnx.save(_half(onnx.load(result.variant(name).path)), str(paths[name]))
    half = run_bench(BenchConfig(target=None, dense=str(paths["dense"]), structured=str(paths["structured"]),
                                 threads=(1,), batches=(1, 2), repeat=2, warmup=0, data="digits", data_limit=40,
                                 memory=False))
    assert {(t.variant, t.batch) for t in half.timings} >= {("structured", 1), ("structured", 2)}
    for name in ("dense", "unstructured", "structured"):  # the unstructured zeros are placed in float16 too
        # The same test images rounded to half precision: at most one of 40 scored otherwise.
        assert abs(half.variant(name).accuracy - result.variant(name).accuracy) <= 1 / 40, name
    assert any("float16 inputs" in n for n in half.notes)
    assert not any("float16" in n for n in result.notes)
    res = CliRunner().invoke(main, ["bench", "--dense", result.variant("dense").path, "--structured",
                                    str(paths["structured"]), *FAST])
    assert "inputs of different types: dense float32, structured float16" in _one_line_error(res)


def test_a_dynamic_size_model_is_benched_at_the_input_shape_given(result, tmp_path):
    dynamic = tmp_path / "dyn.onnx"  # the sparse model with its zeros, uncut, as a user's dynamic-size export
    onnx.save(free_height_and_width(build_variants(Path(result.config.target) / "sparse.pt").dense.model), str(dynamic))
    res = CliRunner().invoke(main, ["bench", str(dynamic), *FAST])
    assert "dynamic size (?x1x?x?); give --input-shape" in _one_line_error(res)
    for bad, words in (("3,28,28", "does not fit input"), ("28,28", "gives 2 sizes"), ("1,0,28", "positive")):
        res = CliRunner().invoke(main, ["bench", str(dynamic), "--input-shape", bad, *FAST])
        assert words in _one_line_error(res), bad
    report = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", str(dynamic), "--input-shape", "1x28x28", "--data", "digits",
                                    "--data-limit", "40", "--out", str(report), *FAST])
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert doc["config"]["input_size"] == [1, 28, 28]
    by_name = {v["name"]: v for v in doc["variants"]}
    for name in ("dense", "structured"):  # the same models as the static export, at its size
        assert by_name[name]["input_shape"] == [None, 1, 28, 28]
        assert by_name[name]["macs"] == result.variant(name).macs
    assert by_name["structured"]["accuracy"] == by_name["dense"]["accuracy"] == result.variant("structured").accuracy
    # A checkpoint is exported at the size given; one its model cannot take is one line.
    res = CliRunner().invoke(main, ["bench", str(result.config.target), "--input-shape", "1,32,32", *FAST])
    assert "cannot run at --input-shape 1x32x32" in _one_line_error(res)
    # Models given as --dense and --structured are refused in the same words, naming which.
    res = CliRunner().invoke(main, ["bench", "--dense", str(dynamic), "--structured", str(dynamic), *FAST])
    assert "the dense model takes inputs of a dynamic size (?x1x?x?); give --input-shape" in _one_line_error(res)


def _text_model(path, hidden_zero: bool = True, seq: int | str = 16) -> None:
    """A small text model of two inputs (token ids and a float mask), its MLP's second half of hidden neurons
    exactly zero: what a user brings from a transformer export, not an image model."""
    rng = np.random.default_rng(0)
    vocab, d, h = 32, 24, 48
    w1, b1 = rng.standard_normal((d, h)).astype(np.float32), rng.standard_normal(h).astype(np.float32)
    if hidden_zero:
        w1[:, h // 2:], b1[h // 2:] = 0, 0
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("emb", rng.standard_normal((vocab, d)).astype(np.float32)), ("w1", w1), ("b1", b1),
        ("w2", rng.standard_normal((h, d)).astype(np.float32)), ("wo", rng.standard_normal((d, 5)).astype(np.float32)),
        ("seq_axis", np.array([1], np.int64)), ("last_axis", np.array([2], np.int64)))]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"], axis=0),
             helper.make_node("Unsqueeze", ["attention_mask", "last_axis"], ["m"]),
             helper.make_node("Mul", ["e", "m"], ["x"]),
             helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["hr"]),
             helper.make_node("MatMul", ["hr", "w2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["x", "y0"], ["y"]),
             helper.make_node("ReduceMean", ["y", "seq_axis"], ["p"], keepdims=0),
             helper.make_node("MatMul", ["p", "wo"], ["logits"], name="head")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", seq])]
    graph = helper.make_graph(nodes, "text", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                    ["batch", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_a_model_of_several_inputs_is_fed_every_input(tmp_path):
    """Token ids and a mask: each fed a seeded random value in its declared type, the cut timed and measured like an
    image model's; what needs one image input (--data, --int8) says so in one line."""
    src = tmp_path / "text.onnx"
    _text_model(src)
    r = run_bench(BenchConfig(target=str(src), threads=(1,), batches=(1, 4), repeat=2, warmup=0, layers=True))
    assert r.layers == () and any("this model has none" in n for n in r.notes)  # no conv to study, and it says so
    dense, _, structured = r.variants
    assert structured.macs < dense.macs and structured.memory is not None and dense.memory.growth_bytes >= 0
    assert {(t.variant, t.batch) for t in r.timings} == {(v, b) for v in ("dense", "unstructured", "structured")
                                                         for b in (1, 4)}
    assert any(n.startswith("Inputs: 'input_ids' (int64, ?x16), 'attention_mask' (float32, ?x16)") for n in r.notes)
    md = render_markdown(r)  # a row of a batch is a sample here, not an image
    assert "samples/s" in md and "MACs/sample" in md and "images/s" not in md
    for extra, words in ((["--data", "digits"], "--data scores models that take one image input"),
                         (["--int8", "--data", "digits"], "--int8 quantizes models that take one image input")):
        res = CliRunner().invoke(main, ["bench", str(src), *extra, *FAST])
        assert words in _one_line_error(res)
    # A sequence length left dynamic needs its size: one line asking for --dim, then --dim gives it.
    free = tmp_path / "free.onnx"
    _text_model(free, seq="seq")
    res = CliRunner().invoke(main, ["bench", str(free), *FAST])
    line = _one_line_error(res)
    assert "dynamic dimension 1 ('seq')" in line and "--dim NAME=SIZE" in line
    res = CliRunner().invoke(main, ["bench", str(free), "--dim", "sek=16", *FAST])
    assert "--dim sek: no input has a dimension of that name" in _one_line_error(res)
    report = tmp_path / "free.json"
    res = CliRunner().invoke(main, ["bench", str(free), "--dim", "seq=16", "--out", str(report), *FAST])
    assert res.exit_code == 0, res.output
    back = BenchResult.from_json(report.read_text())
    assert back.config.dims == (("seq", 16),) and back.variant("structured").macs == structured.macs
    # The surgery verifies it at that size and keeps the sequence dynamic in the compact model.
    cut = tmp_path / "free_cut.onnx"
    res = CliRunner().invoke(main, ["surgery", str(free), "-o", str(cut), "--dim", "seq=16"])
    assert res.exit_code == 0, res.output
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in onnx.load(cut).graph.input] == \
        [["batch", "seq"], ["batch", "seq"]]


def test_the_feed_reaches_every_input_on_every_provider_path():
    from sslcompress.runtime.binding import runner

    sess = ort.InferenceSession(_add_model().SerializeToString(), providers=["CPUExecutionProvider"])
    runner(sess, {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)}, "cpu")()
    with pytest.raises(ConfigError, match="the feed gives a; the model takes a, b"):
        runner(sess, {"a": np.ones((2, 3), np.float32)}, "cpu")


def _add_model() -> onnx.ModelProto:
    a, b = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 3]) for n in "ab")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    return helper.make_model(helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_more_variants_are_timed_and_scored_beside_the_others(result, tmp_path):
    """--variant NAME=ONNX: another tool's model (here the structured one again) in the same interleaved rounds,
    scored, listed, written and read back like the built ones; one that does not fit is one line."""
    other, models, report, md = (tmp_path / n for n in ("other.onnx", "models", "r.json", "r.md"))
    onnx.save(onnx.load(result.variant("structured").path), str(other))
    res = CliRunner().invoke(main, ["bench", str(result.config.target), "--variant", f"tp-50={other}",
                                    "--data", "digits", "--data-limit", "40", "--models-dir", str(models),
                                    "--out", str(report), "--markdown", str(md), *FAST])
    assert res.exit_code == 0, res.output
    back = BenchResult.from_json(report.read_text())
    assert back.config.extra == (("tp-50", str(other)),)
    added = back.variant("tp-50")
    assert added.source == f"given: {other}" and added.macs == back.variant("structured").macs
    assert added.accuracy == back.variant("structured").accuracy  # the same model, the same images
    assert {t.variant for t in back.timings} >= {"dense", "structured", "tp-50"}
    assert (models / "tp-50.onnx").is_file() and "tp-50" in md.read_text()
    renamed = onnx.load(result.variant("structured").path)  # an image model's input may have any name
    old, renamed.graph.input[0].name = renamed.graph.input[0].name, "images"
    for node in renamed.graph.node:
        node.input[:] = ["images" if i == old else i for i in node.input]
    onnx.save(renamed, str(tmp_path / "renamed.onnx"))
    res = CliRunner().invoke(main, ["bench", str(result.config.target), "--variant", f"r={tmp_path / 'renamed.onnx'}",
                                    *FAST])
    assert res.exit_code == 0, res.output
    half = tmp_path / "half.onnx"
    onnx.save(_half(onnx.load(result.variant("structured").path)), str(half))
    for extra, words in (([f"dense={other}"], "other than dense"), ([f"a={other}", f"a={other}"], "must differ"),
                         (["noequals"], "NAME=MODEL.onnx"), ([f"x={tmp_path / 'none.onnx'}"], "not found"),
                         ([f"x={half}"], "inputs of different types")):
        args = [a for e in extra for a in ("--variant", e)]
        res = CliRunner().invoke(main, ["bench", str(result.config.target), *args, *FAST])
        assert words in _one_line_error(res), (extra, res.output)


def test_added_variants_wear_colours_of_their_own():
    from sslcompress.bench.plot import COLORS, variant_colors

    names = ["dense", "unstructured", "structured", "tp-50", "nni", "dense-int8"]
    colors = variant_colors(names)
    assert [colors[n] for n in ("dense", "structured", "dense-int8")] == [COLORS[n] for n in ("dense", "structured",
                                                                                            "dense-int8")]
    assert len(set(colors.values())) == len(names)  # no added model drawn in a built one's colour


def test_the_cuda_plan_runs_with_the_cpu_standing_in(run_dir, monkeypatch):
    """The bench's CUDA branches (its providers checked and probed, one thread count, no pinning, rows named cuda),
    run with the CPU provider in CUDA's place: only the sessions' provider and the runner's binding differ."""
    import sslcompress.bench.run as run_mod
    import sslcompress.runtime.binding as binding
    import sslcompress.runtime.sessions as sessions

    real_check, real_runner = sessions.check_provider, binding.runner
    asked: list[str] = []

    def check(provider: str) -> str:
        asked.append(provider)
        return real_check("cpu" if provider == "cuda" else provider)

    monkeypatch.setattr(sessions, "check_provider", check)
    monkeypatch.setattr(run_mod, "check_provider", check)
    monkeypatch.setattr(run_mod, "probe_cuda", lambda: asked.append("probe"))
    monkeypatch.setattr(binding, "runner", lambda s, x, p: real_runner(s, x, "cpu" if p == "cuda" else p))
    threads = (1, 2) if len(runtime.usable_cpus()) >= 2 else (1,)
    r = run_bench(BenchConfig(target=str(run_dir), providers=("cpu", "cuda"), threads=threads, batches=(1, 2),
                              repeat=2, warmup=0, memory=False))
    assert "probe" in asked and "cuda" in asked
    settings = {(t.provider, t.threads, t.batch) for t in r.timings}
    # The CPU at every thread count; CUDA once, at the largest (CPU threads only launch its work).
    assert settings == {("cpu", t, b) for t in threads for b in (1, 2)} | {("cuda", max(threads), b) for b in (1, 2)}
    assert {t.variant for t in r.timings if t.provider == "cuda"} == {"dense", "unstructured", "structured"}
