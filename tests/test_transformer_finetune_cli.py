"""End to end on vit_tiny (and llama_vit_tiny): `sslcompress finetune -s neuron --target-flops` sparsifies the MLP hidden units (and
with `head` the attention heads) of the digits model, and `sslcompress export` cuts them from the ONNX model,
verified against the uncut one, at the MACs the training counted."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from sslcompress.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model, structures, target", [("vit_tiny", "neuron", 0.6), ("vit_tiny", "head", 0.8),
                                                       ("llama_vit_tiny", "neuron,head,depth", 0.6)])
def test_vit_finetuned_to_a_budget_and_cut_by_the_export(tmp_path, model, structures, target):
    # llama_vit_tiny: RMSNorm (exported as the ops it computes), SwiGLU MLPs, whose units are gate, up and down,
    # and grouped-query attention with rotary embeddings, whose groups are a key/value head and its query heads.
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(main, ["finetune", "--model", model, "--data", "digits", "-s", structures,
                               "--target-flops", str(target), "--pretrain-epochs", "1", "--sparsify-epochs", "1",
                               "--finetune-epochs", "1", "--limit-train", "96", "--limit-test", "32",
                               "--batch-size", "32", "--threads", "1", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert (out / "sparse.pt").is_file()

    # A dynamic batch changes the graph: onnxsim fuses the attention into ORT's contrib Attention and the
    # Linears run on tokens flattened into rows ((B * S, D) Reshapes around each Gemm).
    for flags in ([], ["--dynamic-batch"]):
        compact, uncut, export_report = tmp_path / "vit.onnx", tmp_path / "uncut.onnx", tmp_path / "export.json"
        res = runner.invoke(main, ["export", str(out / "sparse.pt"), "--onnx", str(compact), "--uncut", str(uncut),
                                   "--report", str(export_report), *flags])
        assert res.exit_code == 0, res.output
        cut = json.loads(export_report.read_text())
        assert cut["verification"]["passed"]
        macs, macs_after = cut["totals"]["macs"], cut["totals"]["macs_after"]
        assert macs_after <= target * report["totals"]["macs"]
        # The uncut export computes the dense count, or less where MLPs emptied whole share one zero
        # initializer and their gate and up products are computed once (check_export_counts, surgery/export.py).
        emptied = sum(lay["macs"] for lay in report["layers"] if lay["macs_after"] == 0)
        assert 0 <= report["totals"]["macs"] - macs <= emptied, flags
        assert report["totals"]["macs_after"] == macs_after, flags
        assert cut["macs_after_matches_prediction"]

        # The compact model holds fewer weights (the MLP's or the attention's) and computes what the uncut
        # one does.
        assert cut["totals"]["params_after"] < cut["totals"]["params"]
        want, got = (_run(p) for p in (uncut, compact))
        assert np.allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


def _run(path):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, shape = sess.get_inputs()[0].name, sess.get_inputs()[0].shape
    x = np.random.default_rng(0).standard_normal((4, *shape[1:])).astype(np.float32)
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])

