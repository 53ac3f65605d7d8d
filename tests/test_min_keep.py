"""The floor under the widths that carry the network (--min-keep): group Lasso never thins a residual trunk or
a layer of a plain stack below its floor, nor does the ranking that lands a budget; widths a residual branch
bypasses may still empty. Built-in LeNet-5 and ResNet-20 on the bundled digits, a second or two a run."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from sslcompress.cli import main
from sslcompress.config import FinetuneConfig, RunOptions, TrainOptions, build_config
from sslcompress.errors import TrainingError, UnreachableBudgetError
from sslcompress.finetune.checkpoint import load_checkpoint
from sslcompress.finetune.controller import Budget
from sslcompress.finetune.pipeline import run_finetune
from sslcompress.finetune.sparsifier import Sparsifier
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET_TRUNKS = {
    ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"): 16,
    ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2", "layer2.2.conv2"): 32,
    ("layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2", "layer3.2.conv2"): 64,
}


def _sparsifier(name: str, **options) -> Sparsifier:
    spec = ModelSpec(name, 10, 1 if name == "lenet5" else 3, (28, 28) if name == "lenet5" else (16, 16))
    torch.manual_seed(0)
    model = build_model(spec).eval()
    return Sparsifier(model, spec, build_config(FinetuneConfig, None, options))


def _width(sp: Sparsifier, layers) -> int:
    counted = {lc.name: lc for lc in sp.counter.count().layers}
    return max(counted[n].filters[0] for n in layers)


def test_the_trunks_and_the_layers_of_a_plain_stack_get_a_floor_and_residual_branches_none():
    sp = _sparsifier("resnet20")
    assert sp.min_widths == {k: math.ceil(0.1 * w) for k, w in RESNET_TRUNKS.items()}  # 2, 4, 7
    lenet = _sparsifier("lenet5", min_keep=0.25)
    # conv1, conv2 and fc1 each carry the whole signal; fc2 writes the output (pinned), no group removes it.
    assert lenet.min_widths == {("conv1",): 5, ("conv2",): 13, ("fc1",): 125}
    assert _sparsifier("resnet20", min_keep=0.0).min_widths == {}


def test_a_proximal_step_that_would_zero_everything_leaves_each_trunk_its_strongest_channels():
    sp = _sparsifier("resnet20", structures="filter")
    before = sp.lasso.norms()["filter"].clone()
    sp.lasso.proximal_step(1e6, sp.lambdas, sp.spared())
    after = sp.lasso.norms()["filter"]
    for unit in sp.units(1):
        ids = [ref[1] for ref in unit.refs if ref is not None]
        if not ids:
            continue
        floor = sp.min_widths.get(tuple(sorted(unit.layers)), 0)
        alive = [i for i in ids if after[i] > 0]
        strongest = sorted(ids, key=lambda i: -float(before[i]))[:floor]
        assert sorted(alive) == sorted(strongest), unit.layers  # a branch's inner width: none left
        assert all(float(after[i]) == float(before[i]) for i in alive)  # spared, not shrunk
    assert sp.connected()
    # Without the floor, the same step empties the trunks too and cuts the network.
    bare = _sparsifier("resnet20", structures="filter", min_keep=0.0)
    bare.lasso.proximal_step(1e6, bare.lambdas, bare.spared())
    assert not bare.connected()


def test_the_trimmed_penalty_leaves_out_the_spared_groups():
    sp = _sparsifier("lenet5")
    spared = sp.spared()
    lam = dict(sp.lambdas)
    full, trimmed = sp.lasso.penalty(lam), sp.lasso.penalty(lam, spared)
    left_out = sum(lam[k] * float((ix.weight * sp.lasso.norms()[k])[spared[k]].sum())
                   for k, ix in sp.lasso.kinds.items() if k in spared)
    assert left_out > 0
    assert float((full - trimmed).detach()) == pytest.approx(left_out, rel=1e-5)


@pytest.mark.parametrize("align", [None, 16])
def test_the_ranking_lands_a_budget_above_every_floor(align):
    sp = _sparsifier("resnet20", align=align, min_keep=0.2)
    sp.enforce(Budget({"macs": 0.08}), align)
    assert sp.fractions()["macs"] <= 0.08 and sp.connected()
    for layers, floor in sp.min_widths.items():
        kept = _width(sp, layers)
        assert kept >= floor
        if align and kept >= align:
            assert kept % align == 0
    # Stage 3's trunk (64, floor 13): blocks of 16 stop at the first multiple at or above the floor.
    if align:
        assert _width(sp, list(RESNET_TRUNKS)[2]) >= 16


def test_floors_bound_what_the_ranking_can_remove():
    with_floor, bare = _sparsifier("lenet5"), _sparsifier("lenet5", min_keep=0.0)
    assert with_floor.floors()["macs"] > bare.floors()["macs"]
    target = (with_floor.floors()["macs"] + bare.floors()["macs"]) / 2
    with pytest.raises(TrainingError, match="--min-keep 0.1"):
        with_floor.enforce(Budget({"macs": target}))
    bare.enforce(Budget({"macs": target}))
    assert bare.fractions()["macs"] <= target


def _opts(epochs, lr=0.02):
    return TrainOptions(epochs=epochs, lr=lr, batch_size=16, weight_decay=0.0)


def _resnet(out, **kw) -> FinetuneConfig:
    base = dict(run=RunOptions(model="resnet20", data="digits", out=str(out), limit_train=256, limit_test=64),
                structures=("depth", "filter"), pretrain=_opts(0), sparsify=_opts(1, 0.05), finetune=_opts(0))
    return FinetuneConfig(**{**base, **kw})


def test_a_lambda_that_cuts_the_network_without_the_floor_leaves_each_trunk_at_it(tmp_path):
    # The lambda that, without the floor, removes the whole network in its first epoch (test_budget.py).
    res = run_finetune(_resnet(tmp_path / "run", strength=6.0))
    rows = {tuple(r["layers"]): r for r in res.report["min_widths"]}
    assert set(rows) == set(RESNET_TRUNKS)
    assert all(r["kept"] >= r["min"] for r in rows.values())
    assert res.report["min_keep"] == 0.1
    ckpt = load_checkpoint(res.checkpoint)
    with torch.no_grad():
        y = ckpt.build()(torch.randn(2, *ckpt.model.input_shape[1:]))
    assert not torch.equal(y[0], y[1])
    # The cut model computes what the checkpoint computes, trunks at their floor, emptied branches gone.
    cut = compress(export_checkpoint(res.checkpoint).model)
    assert cut.verification.passed


def test_a_budget_under_the_floor_is_refused_up_front_naming_it(tmp_path):
    # With filter groups alone every branch may empty: half of each trunk leaves 0.36% of the MACs, 0.02% none.
    with pytest.raises(UnreachableBudgetError, match="--min-keep 0.5"):
        run_finetune(_resnet(tmp_path / "run", structures=("filter",), target_flops=0.002, min_keep=0.5))
    assert not (tmp_path / "run" / "sparse.pt").exists()


def test_the_cli_takes_min_keep_and_refuses_a_fraction_outside_0_1(tmp_path):
    res = CliRunner().invoke(main, ["finetune", "--model", "lenet5", "--min-keep", "1.5", "--out",
                                    str(tmp_path / "x")])
    assert res.exit_code != 0
    assert "(--min-keep) must be a number in [0, 1], got 1.5" in res.output
    assert not (tmp_path / "x").exists()


def test_the_cli_names_the_widths_left_at_their_floor(tmp_path):
    # Strength 50 on LeNet cuts the network without the floor (test_pipeline.py); with it every width stops there.
    res = CliRunner().invoke(main, ["finetune", "--model", "lenet5", "--pretrain-epochs", "1", "--sparsify-epochs",
                                    "1", "--finetune-epochs", "0", "--strength", "50", "--limit-train", "256",
                                    "--limit-test", "64", "--threads", "1", "-q", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "at the floor (--min-keep 0.1; a lower value lets them thin further): conv1 2, conv2 5, fc1 50" \
        in res.output
