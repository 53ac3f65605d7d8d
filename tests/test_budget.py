"""Budgets of MACs and parameters, and aligned widths.

The budget is checked every few optimizer steps of sparsify, so a lambda strong enough to go through the
whole budget in one epoch is stopped within it; every run lands at or below what it asks, and at most one
point below (one alignment step with --align). LeNet-5 on a fixed subset of the bundled digits, and a
ResNet-20 from its initial weights, in batches of 16: a second or two a run on one thread.
"""

from __future__ import annotations

import pytest
import torch

from sslcompress.config import (
    FinetuneConfig,
    PretrainConfig,
    RunOptions,
    TrainOptions,
    build_config,
    check_resume_fingerprint,
    resume_fingerprint,
)
from sslcompress.errors import ConfigError, TrainingError, UnreachableBudgetError
from sslcompress.finetune.checkpoint import load_checkpoint
from sslcompress.finetune.pipeline import run_finetune, run_pretrain
from sslcompress.finetune.sparsifier import Sparsifier
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT_TRAIN = 480  # 30 steps an epoch in batches of 16
BATCH = 16
POINT = 0.01


def _opts(epochs, lr=0.02, **kw) -> TrainOptions:
    return TrainOptions(epochs=epochs, lr=lr, batch_size=BATCH, weight_decay=0.0, **kw)


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget-pre")
    return run_pretrain(PretrainConfig(run=RunOptions(model="lenet5", data="digits", out=str(out),
                                                      limit_train=LIMIT_TRAIN),
                                       train=_opts(2))).checkpoint


def _lenet_run(out, weights, **kw):
    base = dict(run=RunOptions(data="digits", weights=str(weights), out=str(out), limit_train=LIMIT_TRAIN),
                sparsify=_opts(2), finetune=_opts(1, 0.01))
    base.update(kw)
    return FinetuneConfig(**base)


def _resnet_run(out, **kw):
    """ResNet-20 from its initial weights (no pretraining): what sparsify does with lambda is all that counts."""
    base = dict(run=RunOptions(model="resnet20", data="digits", out=str(out), limit_train=256, limit_test=64),
                structures=("depth", "filter"), pretrain=_opts(0), sparsify=_opts(1, 0.05), finetune=_opts(0))
    base.update(kw)
    return FinetuneConfig(**base)


def _messages(events):
    return [e.message for e in events if e.message]


def _assert_landed(report):
    """Every asked fraction met, and the one that binds at most one point below what was asked."""
    budget = report["budget"]
    asked = {m: budget[m]["asked"] for m in ("macs", "params") if budget[m]["asked"] is not None}
    reached = {m: budget[m]["reached"] for m in asked}
    assert all(reached[m] <= asked[m] for m in asked), budget
    assert max(reached[m] - asked[m] for m in asked) >= -POINT, budget
    totals = report["totals"]
    assert budget["macs"]["reached"] == pytest.approx(totals["macs_fraction"])
    assert budget["params"]["reached"] == pytest.approx(totals["params_after"] / totals["params"])


def _assert_connected(path, shape):
    model = load_checkpoint(path).build()
    with torch.no_grad():
        y = model(torch.randn(2, *shape))
    assert not torch.equal(y[0], y[1])


def test_a_lambda_that_goes_through_the_budget_in_one_epoch_is_stopped_within_it(tmp_path):
    # -s depth,filter at a lambda that, unchecked and without a floor under the trunks, removes the whole
    # network in its first epoch.
    with pytest.raises(TrainingError, match="cut the network"):
        run_finetune(_resnet_run(tmp_path / "unchecked", strength=6.0, min_keep=0.0))
    events = []
    res = run_finetune(_resnet_run(tmp_path / "checked", strength=6.0, target_flops=0.6), events.append)
    _assert_landed(res.report)
    met = res.report["budget"]["met_at"]
    assert met["epoch"] == 0 and met["step"] < 16  # 16 steps an epoch, checked every 4
    assert res.report["budget"]["checked_every"] == 4
    assert any("met in sparsify epoch 1, step" in m for m in _messages(events))
    _assert_connected(res.checkpoint, (1, 28, 28))


def test_a_params_budget_is_checked_within_the_epoch(lenet, tmp_path):
    one_epoch = dict(strength=1.0, sparsify=_opts(1), finetune=_opts(0))
    unchecked = run_finetune(_lenet_run(tmp_path / "unchecked", lenet, **one_epoch)).report
    assert unchecked["totals"]["params_fraction"] < 0.4  # an epoch of this lambda goes far past 50%
    res = run_finetune(_lenet_run(tmp_path / "checked", lenet, target_params=0.5, **one_epoch))
    _assert_landed(res.report)
    assert res.report["budget"]["met_at"]["epoch"] == 0
    assert res.report["target_params"] == 0.5


@pytest.mark.parametrize("kw", [
    dict(strength=0.05, target_flops=0.5),  # lambda too weak: the ranking lands it
    dict(strength=0.6, target_flops=0.6),  # lambda gets there in sparsify
    dict(strength=0.6, target_params=0.3),
    dict(strength=0.05, target_flops=0.5, target_params=0.5),
], ids=["flops-ranked", "flops-lambda", "params", "both"])
def test_budgets_land_within_a_point(lenet, tmp_path, kw):
    res = run_finetune(_lenet_run(tmp_path, lenet, **kw))
    _assert_landed(res.report)
    _assert_connected(res.checkpoint, (1, 28, 28))


def _assert_aligned(report, align):
    widths = report["widths"]
    assert report["align"] == align and widths
    for w in widths:
        if w["exempt"]:
            assert w["aligned"] is None and (w["exempt"].startswith("pinned") or w["total"] < align
                                             or w["kept"] < align), w
        else:
            assert w["kept"] % align == 0 and w["aligned"], w
    layers = {lay["name"]: lay for lay in report["layers"]}
    for w in widths:
        if not w["exempt"]:
            assert all(layers[n]["filters"][0] % align == 0 for n in w["layers"]), w
    return widths


def test_align_keeps_widths_multiples_and_lands_within_a_step(lenet, tmp_path):
    res = run_finetune(_lenet_run(tmp_path, lenet, strength=0.05, target_flops=0.5, align=8))
    widths = {w["layers"][0]: w for w in _assert_aligned(res.report, 8)}
    assert widths["fc2"]["exempt"].startswith("pinned")  # the model output keeps its 10 classes
    reached = res.report["budget"]["macs"]["reached"]
    assert reached <= 0.5
    # One alignment step here: fc1's blocks of 8 rows, or less than a point.
    assert reached >= 0.5 - POINT


def test_align_without_a_budget_rounds_widths_down(lenet, tmp_path):
    res = run_finetune(_lenet_run(tmp_path, lenet, strength=0.3, align=8))
    _assert_aligned(res.report, 8)
    assert res.report["budget"] is None


def test_align_on_a_resnet_with_coupled_widths(tmp_path):
    res = run_finetune(_resnet_run(tmp_path, structures=("filter", "channel"), strength=1.0, target_flops=0.5,
                                   align=8))
    widths = _assert_aligned(res.report, 8)
    stem = next(w for w in widths if "conv1" in w["layers"])
    assert len(stem["layers"]) > 1  # the residual adds make the stem and every layer1 block one width
    _assert_landed(res.report)


def test_a_resumed_budget_run_ends_as_the_uninterrupted_one(lenet, tmp_path):
    # The schedule asks for the budget 1.8 epochs in, so it is met in the second epoch, after the interruption.
    kw = dict(strength=0.3, target_flops=0.87, sparsify=_opts(3), finetune=_opts(1, 0.01))
    whole = run_finetune(_lenet_run(tmp_path / "whole", lenet, **kw))
    assert whole.report["budget"]["met_at"]["epoch"] == 1 and whole.report["budget"]["met_at"]["step"] > 1

    class Stop(Exception):
        pass

    def interrupt(event):
        if event.phase == "sparsify" and event.epoch == 1 and event.step == 1:
            raise Stop

    with pytest.raises(Stop):
        run_finetune(_lenet_run(tmp_path / "cut", lenet, **kw), interrupt)
    resumed = run_finetune(_lenet_run(tmp_path / "cut", lenet, resume=True, **kw))
    a, b = load_checkpoint(whole.checkpoint).state_dict, load_checkpoint(resumed.checkpoint).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.report["budget"] == resumed.report["budget"]


def test_good_values_accepted_and_resume_refuses_a_changed_budget():
    cfg = build_config(FinetuneConfig, {"target_params": 0.4, "align": 8, "budget_every": 10}, {"target_flops": 0.5})
    assert cfg.targets() == {"macs": 0.5, "params": 0.4} and cfg.align == 8 and cfg.budget_every == 10
    for change, flag in (({"align": 16}, "--align"), ({"target_params": 0.3}, "--target-params"),
                         ({"budget_every": 5}, "--budget-every")):
        other = build_config(FinetuneConfig, {"target_params": 0.4, "align": 8, "budget_every": 10, **change},
                             {"target_flops": 0.5})
        with pytest.raises(ConfigError, match=flag):
            check_resume_fingerprint(resume_fingerprint(cfg), resume_fingerprint(other), "state.pt")


def test_forced_zeroing_refuses_a_budget_under_the_smallest_connected_model(lenet):
    # The pipeline refuses such a target up front; enforce itself must also stop short of cutting the network
    # and say how close the closest connected model came.
    ckpt = load_checkpoint(lenet)
    model = ckpt.build()
    cfg = _lenet_run("unused", lenet)
    sp = Sparsifier(model, ckpt.model, cfg)
    with pytest.raises(TrainingError, match=r"cannot be met without cutting the network.*keeps 0\.\d+ of the MACs"):
        sp.enforce(0.001)
    assert sp.connected()
    assert sp.fractions()["macs"] > 0.001
    with torch.no_grad():
        y = model(torch.randn(2, *ckpt.model.input_shape[1:]))
    assert not torch.equal(y[0], y[1])


def test_pace_reaches_the_budget_step_by_step_where_lambda_lags(lenet, tmp_path):
    # A lambda far too weak to prune anything in two epochs: without pace the whole budget is one cut at
    # the end of sparsify; with pace the checks follow the schedule, so the first epoch already ends pruned.
    weak = dict(strength=1e-4, target_flops=0.3)
    runs = {}
    for pace in (True, False):
        events = []
        res = run_finetune(_lenet_run(tmp_path / str(pace), lenet, pace=pace, **weak), events.append)
        _assert_landed(res.report)
        first = next(e for e in events if e.phase == "sparsify" and e.end_of_epoch)
        runs[pace] = (res.report, first.macs_fraction, _messages(events))
    paced, first_paced, _ = runs[True]
    assert paced["budget"]["pace"] and paced["budget"]["paced_groups"] > 0
    assert paced["budget"]["met_at"] is not None  # met at a check, not by the cut at the end
    assert first_paced < 0.8  # the schedule asks for 1 - 0.7 / 1.2 of the MACs after the first of two epochs
    unpaced, first_unpaced, messages = runs[False]
    assert unpaced["budget"]["paced_groups"] == 0 and unpaced["budget"]["met_at"] is None
    assert first_unpaced > 0.95
    assert any("budget not met by lambda alone" in m for m in messages)


def test_an_unreachable_budget_is_refused_before_sparsify(lenet, tmp_path):
    # Over the all-zero floor (so the up-front floor check lets it through) but under the smallest connected
    # model at widths in blocks of 8 (conv2, fc1 and fc2 keep a block each, about a tenth of the MACs): the
    # one-shot ranking finds that before a single sparsify step, instead of the landing after them.
    cfg = _lenet_run(tmp_path, lenet, target_flops=0.03, align=8)
    sp = Sparsifier(load_checkpoint(lenet).build(), load_checkpoint(lenet).model, cfg)
    assert sp.floors()["macs"] < 0.03
    events = []
    with pytest.raises(UnreachableBudgetError, match=r"cannot be met without cutting the network.*keeps 0\.\d+ of the MACs.*"
                                          r"with widths in steps of 8 \(--align\); refused before sparsify"):
        run_finetune(cfg, events.append)
    assert not [e for e in events if e.phase == "sparsify"]
    assert not (tmp_path / "sparse.pt").exists()


def test_align_may_empty_a_width_to_meet_a_budget(tmp_path):
    # With every width at least one block of 16 a ResNet-20 keeps about 47% of its MACs; 30% is met only by
    # emptying inner widths (residual branches), which the ranking may do as it may without --align.
    res = run_finetune(_resnet_run(tmp_path, structures=("filter", "channel"), strength=0.0, target_flops=0.3,
                                   align=16))
    widths = _assert_aligned(res.report, 16)
    # An emptied inner width leaves its block's second conv reading only zeros: the branch adds a constant, which
    # replaces it in the cut, and the count says so.
    assert any(w["kept"] == 0 and w["aligned"] for w in widths)
    # Within one block of the asked fraction: the largest, a stage-1 width of 16, is 11.6% of the MACs.
    reached = res.report["budget"]["macs"]["reached"]
    assert 0.3 - 0.116 <= reached <= 0.3
    _assert_connected(res.checkpoint, (1, 28, 28))
    # The emptied branches leave the cut model too, which computes what the checkpoint computes.
    cut = compress(export_checkpoint(res.checkpoint).model)
    assert cut.verification.passed and cut.report["blocks_constant"]
    assert cut.report["totals"]["macs_fraction"] == pytest.approx(reached)
