"""Thinning during sparsify: composed plans equal the thinnings one after another, a run that thins as
channels die ends with a checkpoint, counts and export as exact as before, and resumes bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from sslcompress.cli import main
from sslcompress.config import FinetuneConfig, RunOptions, TrainOptions
from sslcompress.finetune import pipeline
from sslcompress.finetune.checkpoint import expand_tensors, load_checkpoint
from sslcompress.finetune.counting import count
from sslcompress.finetune.progressive import compose, mac_saving
from sslcompress.finetune.structure import analyze
from sslcompress.finetune.thin import apply_plan, plan_thinning, thin
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, **kw) -> FinetuneConfig:
    return FinetuneConfig(run=RunOptions(out=str(out), limit_train=512, limit_test=96, threads=1),
                          pretrain=TrainOptions(epochs=2, batch_size=32, lr=0.05),
                          sparsify=TrainOptions(epochs=3, batch_size=32, lr=0.02, weight_decay=0.0,
                                                schedule="constant"),
                          finetune=TrainOptions(epochs=1, batch_size=32, lr=0.01), target_flops=0.3,
                          budget_every=4, **kw)


@pytest.fixture(scope="module")
def progressive_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("progressive")
    messages = []

    def on_event(e):
        if e.phase == "info":
            messages.append(e.message)

    return out, pipeline.run_finetune(_cfg(out), on_event=on_event), messages


def _lenet():
    spec = ModelSpec("lenet5", 10, 1, (28, 28))
    torch.manual_seed(0)
    return spec, build_model(spec)


def test_a_composed_plan_cuts_what_two_thinnings_cut():
    spec, model = _lenet()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.conv1.weight[[1, 4, 7]] = 0
        model.conv1.bias[[1, 4, 7]] = 0
    first = thin(model, spec.input_shape)
    assert first.applied
    with torch.no_grad():  # then fc1 rows and conv2 filters of the thinned model die
        model.fc1.weight[[0, 3, 9]] = 0
        model.fc1.bias[[0, 3, 9]] = 0
        model.conv2.weight[[2, 5]] = 0
        model.conv2.bias[[2, 5]] = 0
    zeroed = {k: v.clone() for k, v in model.state_dict().items()}
    second = thin(model, spec.input_shape)
    assert second.applied
    both = compose(first.plan, second.plan)
    # The original model with the same zeros (thinned ones at full shape), cut once by the composed plan.
    _, fresh = _lenet()
    fresh.load_state_dict(expand_tensors(zeroed, first.plan))
    for name in ("conv1.weight", "conv1.bias"):
        assert torch.equal(dict(fresh.state_dict())[name][[0, 2]], original[name][[0, 2]])
    apply_plan(fresh, both)
    a, b = fresh.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert both.widths["conv1"][:2] == (20, 17) and both.widths["fc1"][:2] == (500, 497)
    assert both.shapes["conv2.weight"] == (50, 20, 5, 5)


def test_the_saving_estimate_is_the_share_of_layer_macs_a_plan_removes():
    spec, model = _lenet()
    with torch.no_grad():
        model.conv2.weight[:25] = 0
        model.conv2.bias[:25] = 0
    st = analyze(model, spec.input_shape)
    plan = plan_thinning(model, spec.input_shape, st)
    before = count(model, spec.input_shape)
    thin(model, spec.input_shape)
    after = count(model, spec.input_shape)
    assert mac_saving(st, plan) == pytest.approx(1 - after.macs / before.macs, rel=1e-6)


def test_sparsify_thins_the_model_as_channels_die(progressive_run):
    _, result, messages = progressive_run
    thinned = result.report["thinned"]
    assert thinned["applied"] and thinned["during_sparsify"] >= 2
    assert sum(m.startswith("sparsify thinned the model") for m in messages) == thinned["during_sparsify"]
    # The budget still lands (fractions of the dense model, whatever the model's width at the time).
    assert result.report["budget"]["macs"]["reached"] == pytest.approx(0.3, abs=0.01)
    assert result.report["budget"]["macs"]["reached"] <= 0.3


def test_the_checkpoint_of_a_progressive_run_rebuilds_counts_and_exports_exactly(progressive_run, tmp_path):
    out, result, _ = progressive_run
    ckpt = load_checkpoint(out / "sparse.pt")
    small, full = ckpt.build(thinned=True), ckpt.build()
    assert sum(p.numel() for p in small.parameters()) == result.report["thinned"]["params_after"]
    assert sum(p.numel() for p in full.parameters()) == result.report["thinned"]["params_before"]
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(x), small(x)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    counted = count(full, (1, 1, 28, 28))
    totals = result.report["totals"]
    assert (counted.macs, counted.macs_after) == (totals["macs"], totals["macs_after"])
    res = CliRunner().invoke(main, ["export", str(out / "sparse.pt"), "--onnx", str(tmp_path / "c.onnx"),
                                    "--report", str(tmp_path / "r.json"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["passed"]
    assert report["totals"]["macs_after"] == totals["macs_after"]


def test_a_sparsify_resumed_after_a_thinning_ends_where_the_whole_run_does(progressive_run, tmp_path,
                                                                           monkeypatch):
    out, _, _ = progressive_run
    real = pipeline.train_epoch

    def interrupted(*args, **kw):
        if kw["phase"] == "sparsify" and kw["epoch"] == 1:  # with pace the budget is met in the second epoch
            raise KeyboardInterrupt
        return real(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_finetune(_cfg(tmp_path / "cut"))
    state = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert state["phase"] == "sparsify" and state["thin"]  # the interrupted sparsify had thinned
    pipeline.run_finetune(_cfg(tmp_path / "cut", resume=True))
    a = load_checkpoint(out / "sparse.pt").state_dict
    b = load_checkpoint(tmp_path / "cut" / "sparse.pt").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_thin_keeps_the_model_whole_through_sparsify(tmp_path):
    messages = []
    result = pipeline.run_finetune(_cfg(tmp_path, thin=False),
                                   on_event=lambda e: messages.append(e.message) if e.phase == "info" else None)
    assert result.report.get("thinned") is None
    assert not any(m.startswith("sparsify thinned") for m in messages)
    assert not load_checkpoint(tmp_path / "sparse.pt").thin


def test_the_saving_estimate_holds_when_a_grouped_conv_loses_a_whole_group():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        for i in (0, 1):  # group 0 of the grouped conv: its two inputs and its two filters
            model[0].weight[i] = 0
            model[0].bias[i] = 0
            model[2].weight[i] = 0
            model[2].bias[i] = 0
    shape = (1, 3, 8, 8)
    st = analyze(model, shape)
    plan = plan_thinning(model, shape, st)
    assert plan.modules["2"]["groups"] == 3
    before = count(model, shape)
    assert thin(model, shape).applied
    after = count(model, shape)
    assert mac_saving(st, plan) == pytest.approx(1 - after.macs / before.macs, rel=1e-6)
