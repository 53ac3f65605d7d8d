"""`sslcompress bench --int8`: dense-int8 and structured-int8 join the three variants, timed in the same rounds,
with the speed-up of structured-int8 over dense split into its structure and INT8 factors. No timing asserted."""

from __future__ import annotations

import json
import statistics

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

from sslcompress.bench.config import BenchConfig
from sslcompress.bench.int8 import COMPOUNDING_HEAD, compounding
from sslcompress.bench.report import render_markdown, timing_tables, variants_table
from sslcompress.bench.results import BenchResult
from sslcompress.bench.run import run_bench
from sslcompress.bench.variants import Variant, VariantSet
from sslcompress.cli import main
from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIVE = ["dense", "unstructured", "structured", "dense-int8", "structured-int8"]
QDQ = {"QuantizeLinear", "DequantizeLinear"}
FAST = ["--threads", "1", "--batch", "1", "--repeat", "2", "--warmup", "0", "-q"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A dense LeNet (pretrained.pt) and a copy whose conv1 keeps 6 of 20 filters (sparse.pt)."""
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
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(d / "pretrained.pt", Checkpoint("pretrained", spec, dense.state_dict()))
    save_checkpoint(d / "sparse.pt", Checkpoint("sparse", spec, sparse.state_dict()))
    return d


@pytest.fixture(scope="module")
def result(run_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    config = BenchConfig(target=str(run_dir), threads=(1,), batches=(1, 2), repeat=3, warmup=0, data="digits",
                         data_limit=48, memory=False, int8=True, calibration=16, models_dir=str(models))
    return run_bench(config)


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def _ops(path: str) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


def test_five_variants_with_their_numbers_and_speedups(result):
    assert [v.name for v in result.variants] == FIVE and result.variant_order() == FIVE
    v = {x.name: x for x in result.variants}
    for x in result.variants:
        assert x.macs > 0 and x.parameters > 0 and x.nonzero_weights > 0 and x.file_bytes > 0
        assert 0.0 <= x.accuracy <= 1.0 and x.accuracy_images == 48
    # INT8 keeps each model's layers (MACs) and shrinks its file; rounding may zero a few tiny weights.
    for base in ("dense", "structured"):
        q = v[f"{base}-int8"]
        assert q.macs == v[base].macs and q.file_bytes < v[base].file_bytes
        assert q.nonzero_weights <= v[base].nonzero_weights
        assert q.source.startswith(f"{base}, INT8") and "16 training images of digits" in q.source
    assert v["structured-int8"].macs < v["dense-int8"].macs
    for provider, threads, batch in result.settings():
        base = result.timing("dense", provider, threads, batch)
        for name in FIVE:
            t = result.timing(name, provider, threads, batch)
            assert len(t.samples_s) == 3 and t.speedup_ci[0] <= t.speedup <= t.speedup_ci[1]
            assert t.speedup == pytest.approx(statistics.median(base.samples_s) / t.median_s, rel=1e-12)


def test_the_tables_show_every_variant(result):
    rows = variants_table(result).rows
    assert [r[0] for r in rows] == FIVE
    assert all(r[-2].endswith("%") for r in rows)  # top-1 of each
    (latency,) = timing_tables(result)
    for batch in ("1", "2"):
        named = {r[1]: r for r in latency.rows if r[0] == batch}
        assert list(named) == FIVE and named["dense"][6] == "1.00x"
        assert all(named[n][6].endswith("]") and "x [" in named[n][6] for n in FIVE[1:])
    md = render_markdown(result)
    assert "| dense-int8 |" in md and "| structured-int8 |" in md and COMPOUNDING_HEAD in md


def test_the_int8_variants_are_qdq_models_of_their_base(result):
    for name in FIVE:
        ops = _ops(result.variant(name).path)
        assert (QDQ <= ops) == name.endswith("-int8"), (name, ops)
    # structured-int8 quantizes the compact model: conv1's int8 weight has its 6 kept filters, dense-int8's all 20
    for name, filters in (("structured-int8", 6), ("dense-int8", 20)):
        proto = onnx.load(result.variant(name).path)
        int8 = [list(t.dims) for t in proto.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 4]
        assert [filters, 1, 5, 5] in int8, (name, int8)


def test_structure_and_int8_factors_multiply_out(result):
    factors = compounding(result.timings)
    assert [(c.provider, c.threads, c.batch) for c in factors] == result.settings()
    note = next(n for n in result.notes if n.startswith(COMPOUNDING_HEAD))
    for c in factors:
        s, s8 = (result.timing(n, c.provider, c.threads, c.batch) for n in ("structured", "structured-int8"))
        assert c.structure == s.speedup and c.total == s8.speedup
        assert c.dense_int8 == result.timing("dense-int8", c.provider, c.threads, c.batch).speedup
        assert c.int8 == pytest.approx(statistics.median(s.samples_s) / statistics.median(s8.samples_s), rel=1e-12)
        assert c.structure * c.int8 == pytest.approx(c.total, rel=1e-12)
        assert f"batch {c.batch}: {c.total:.2f}x = {c.structure:.2f}x x {c.int8:.2f}x" in note
        assert f"(dense-int8 {c.dense_int8:.2f}x)" in note


def test_a_five_variant_result_round_trips(result):
    back = BenchResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result and back.config.int8 and back.config.calibration == 16
    assert [v["name"] for v in result.to_dict()["variants"]] == FIVE
    # Without --int8 the config keeps the keys it always had; a file without them reads back as no --int8.
    plain = BenchConfig(target="x").to_dict()
    assert "int8" not in plain and "calibration" not in plain
    assert BenchConfig.from_dict(plain) == BenchConfig(target="x")


def test_cli_int8_prints_the_five_way_table_and_the_factors(run_dir, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--int8", "--data", "digits", "--data-limit", "32",
                                    "--calibration", "8", "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "structured-int8" in text and "dense-int8" in text and COMPOUNDING_HEAD in text
    r = BenchResult.from_json(out.read_text())
    assert [v.name for v in r.variants] == FIVE and len(r.timings) == 5 and r.config.calibration == 8


def test_int8_without_data_is_one_line_and_writes_nothing(run_dir, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", str(run_dir), "--int8", "--out", str(out), *FAST])
    assert "--int8 needs --data" in _one_line_error(res)
    assert not out.exists()


def test_a_variant_set_lists_dense_first_and_names_once():
    dense = Variant("dense", onnx.ModelProto(), "d")
    other = Variant("x", onnx.ModelProto(), "x")
    assert VariantSet((dense,)).plus(other).names == ("dense", "x")
    for bad in ((other, dense), (dense, other, other)):
        with pytest.raises(ValueError, match="dense first"):
            VariantSet(bad)


def test_a_model_quantized_already_is_refused_by_name(result):
    paths = {n: result.variant(n).path for n in ("dense-int8", "unstructured", "structured")}
    res = CliRunner().invoke(main, ["bench", "--dense", paths["dense-int8"], "--unstructured", paths["unstructured"],
                                    "--structured", paths["structured"], "--int8", "--data", "digits", *FAST])
    line = _one_line_error(res)
    assert "--int8, the dense model" in line and "quantized already" in line
