"""End to end on vit_tiny: `sslcompress finetune -s neuron --target-flops` sparsifies the MLP hidden units of the
8x8 digits model, and `sslcompress export` cuts them from the ONNX model, verified against the uncut one, at
the MACs the training counted."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from sslcompress.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_vit_neurons_finetuned_to_a_budget_and_cut_by_the_export(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(main, ["finetune", "--model", "vit_tiny", "--data", "digits", "-s", "neuron",
                               "--target-flops", "0.6", "--pretrain-epochs", "1", "--sparsify-epochs", "1",
                               "--finetune-epochs", "1", "--limit-train", "96", "--limit-test", "32",
                               "--batch-size", "32", "--threads", "1", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert (out / "sparse.pt").is_file()

    compact, uncut, export_report = tmp_path / "vit.onnx", tmp_path / "uncut.onnx", tmp_path / "export.json"
    res = runner.invoke(main, ["export", str(out / "sparse.pt"), "--onnx", str(compact), "--uncut", str(uncut),
                               "--report", str(export_report)])
    assert res.exit_code == 0, res.output
    cut = json.loads(export_report.read_text())
    assert cut["verification"]["passed"]
    macs, macs_after = cut["totals"]["macs"], cut["totals"]["macs_after"]
    assert macs_after <= 0.6 * macs
    assert report["totals"]["macs"] == macs and report["totals"]["macs_after"] == macs_after
    assert cut["macs_after_matches_prediction"]

    # Hidden units are gone from the MLP weights, and the compact model computes what the uncut one does.
    shapes = [tuple(t.dims) for t in onnx.load(str(compact)).graph.initializer]
    assert any(len(s) == 2 and s[0] == 96 and s[1] < 384 for s in shapes)
    want, got = (_run(p) for p in (uncut, compact))
    assert np.allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


def _run(path):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, shape = sess.get_inputs()[0].name, sess.get_inputs()[0].shape
    x = np.random.default_rng(0).standard_normal((4, *shape[1:])).astype(np.float32)
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])

