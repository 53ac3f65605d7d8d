"""finetune fine-tunes the thinned model: the checkpoint stores it and its plan, rebuilds it both ways with the
same outputs, exports and cuts as before, and a resumed thinned fine-tuning ends where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from sslcompress.cli import main
from sslcompress.config import FinetuneConfig, RunOptions, TrainOptions
from sslcompress.finetune import pipeline
from sslcompress.finetune.checkpoint import load_checkpoint
from sslcompress.finetune.pipeline import run_finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, **kw) -> FinetuneConfig:
    return FinetuneConfig(run=RunOptions(out=str(out), limit_train=256, limit_test=96, threads=1),
                          pretrain=TrainOptions(epochs=2, batch_size=32, lr=0.05),
                          sparsify=TrainOptions(epochs=2, batch_size=32, lr=0.02, weight_decay=0.0,
                                                schedule="constant"),
                          finetune=TrainOptions(epochs=2, batch_size=32, lr=0.01), target_flops=0.3, **kw)


@pytest.fixture(scope="module")
def thinned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("thin")
    return out, run_finetune(_cfg(out))


def test_checkpoint_holds_the_thinned_model_and_its_plan(thinned_run):
    out, result = thinned_run
    ckpt = load_checkpoint(out / "sparse.pt")
    assert ckpt.thin and result.report["thinned"]["applied"]
    small, full = ckpt.build(thinned=True), ckpt.build()
    n_small = sum(p.numel() for p in small.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    assert n_small == result.report["thinned"]["params_after"] < n_full == result.report["thinned"]["params_before"]
    x = torch.randn(4, *ckpt.model.input_shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(x), small(x)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    # Masks are the thinned model's, and hold its zeros.
    params = dict(small.named_parameters())
    assert all(tuple(m.shape) == tuple(params[n].shape) for n, m in ckpt.masks.items())
    assert all(bool((params[n][~m.bool()] == 0).all()) for n, m in ckpt.masks.items())


def test_the_report_counts_the_model_in_its_own_architecture(thinned_run):
    out, result = thinned_run
    totals = result.report["totals"]
    assert totals["macs_after"] / totals["macs"] <= 0.3 + 0.01
    full = load_checkpoint(out / "sparse.pt").build()
    from sslcompress.flops import count

    counted = count(full, (1, 1, 28, 28))
    assert (counted.macs, counted.macs_after) == (totals["macs"], totals["macs_after"])


def test_export_of_a_thinned_checkpoint_cuts_and_verifies(thinned_run, tmp_path):
    out, result = thinned_run
    res = CliRunner().invoke(main, ["export", str(out / "sparse.pt"), "--onnx", str(tmp_path / "c.onnx"),
                                    "--report", str(tmp_path / "r.json"), "--json"])
    assert res.exit_code == 0, res.output
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["passed"]
    assert report["totals"]["macs_after"] <= result.report["totals"]["macs_after"]


def test_no_thin_fine_tunes_the_full_model_to_the_same_function(tmp_path):
    # Without pace: lambda alone and one ranking at the end, so both runs zero the same groups. (With pace the
    # ranking runs at every check, and a near tie between two groups' norms may go either way with the sums of
    # a thinner model.)
    # Without the floor under the widths (--min-keep 0) as well: its choice of the strongest channels at every
    # step is one more ranking the two sums may tip apart.
    thin_result = run_finetune(_cfg(tmp_path / "thin", pace=False, min_keep=0.0))
    full = run_finetune(_cfg(tmp_path / "full", thin=False, pace=False, min_keep=0.0))
    ckpt = load_checkpoint(tmp_path / "full" / "sparse.pt")
    assert not ckpt.thin and full.report.get("thinned") is None
    assert full.report["totals"] == thin_result.report["totals"]
    # The same training on fewer channels: the same accuracy up to float rounding in the sums.
    assert abs(full.report["accuracy"]["after_finetune"] - thin_result.report["accuracy"]["after_finetune"]) <= 0.03


def test_resumed_thinned_fine_tuning_ends_where_the_whole_run_does(thinned_run, tmp_path, monkeypatch):
    out, _ = thinned_run
    real = pipeline.train_epoch

    def interrupted(*args, **kw):
        if kw["phase"] == "finetune" and kw["epoch"] == 1:
            raise KeyboardInterrupt
        return real(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_finetune(_cfg(tmp_path / "cut"))
    state = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert state["phase"] == "finetune" and state["thin"]
    run_finetune(_cfg(tmp_path / "cut", resume=True))
    a = load_checkpoint(out / "sparse.pt").state_dict
    b = load_checkpoint(tmp_path / "cut" / "sparse.pt").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_report_sets_one_shot_pruning_of_the_same_budget_beside_sparsify(thinned_run):
    _, result = thinned_run
    accuracy = result.report["accuracy"]
    assert 0.0 <= accuracy["one_shot_same_budget"] <= 1.0
    assert list(accuracy) == ["before", "one_shot_same_budget", "after_sparsify", "after_finetune"]
