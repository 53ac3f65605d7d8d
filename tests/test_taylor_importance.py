"""--importance taylor: the ranking that lands a budget scores each group by the loss its removal costs to
first order, (gradient . weight)^2 over the recent steps, on one scale for the whole network. Built-in
LeNet-5 and ResNet-20 on random inputs and the bundled digits, a second or two a run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from sslcompress.cli import main
from sslcompress.config import FinetuneConfig, build_config, check_resume_fingerprint, resume_fingerprint
from sslcompress.errors import ConfigError
from sslcompress.finetune.controller import Budget
from sslcompress.finetune.sparsifier import TAYLOR_DECAY, Sparsifier, _measure
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _sparsifier(name: str, dtype=torch.float32, **options) -> tuple[Sparsifier, torch.nn.Module, ModelSpec]:
    spec = ModelSpec(name, 10, 1 if name == "lenet5" else 3, (28, 28) if name == "lenet5" else (16, 16))
    torch.manual_seed(0)
    model = build_model(spec).to(dtype).train()
    return Sparsifier(model, spec, build_config(FinetuneConfig, None, options)), model, spec


def _loss(model, spec, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, spec.in_channels, *spec.input_size, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 10, (16,), generator=g)
    return F.cross_entropy(model(x), y)


def _backward(model, spec, seed: int) -> None:
    model.zero_grad(set_to_none=True)
    _loss(model, spec, seed).backward()


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_first_order_is_the_loss_slope_of_shrinking_each_group(name):
    """sum(g . w) over a group is -d/dt L(weights with the group scaled by 1 - t) at t = 0: checked against the
    loss itself, by a central difference, for groups of every kind the model has."""
    sp, model, spec = _sparsifier(name, torch.float64, structures="filter,channel,shape,depth"
                                  if name == "resnet20" else "filter,channel,shape")
    model.eval()  # batch statistics would make the loss depend on the batch split; eval keeps it one function
    _backward(model, spec, 1)
    first = sp.lasso.first_order()
    checked = 0
    for kind, ix in sp.lasso.kinds.items():
        for i in torch.linspace(0, ix.n - 1, 4).long().unique().tolist():
            eps = 1e-7  # ReLU kinks near the weights bend the loss within 1e-5 of them
            losses = []
            for t in (eps, -eps):
                scale = torch.ones(ix.n, dtype=torch.float64)
                scale[i] = 1 - t
                saved = {n: p.detach().clone() for n, p in model.named_parameters()}
                with torch.no_grad():
                    ix.scale_(scale)
                    losses.append(float(_loss(model, spec, 1).double()))
                    for n, p in model.named_parameters():
                        p.copy_(saved[n])
            slope = (losses[0] - losses[1]) / (2 * eps)  # dL/dt, the loss as the group shrinks
            assert slope == pytest.approx(-float(first[kind][i]), rel=1e-5, abs=1e-8), (kind, i)
            checked += 1
    assert checked >= 8


def test_observe_keeps_a_running_mean_of_the_squared_first_order_terms():
    sp, model, spec = _sparsifier("lenet5", importance="taylor")
    seen = []
    for seed in range(3):
        _backward(model, spec, seed)
        seen.append({k: v.pow(2) for k, v in sp.lasso.first_order().items()})
        sp.observe()
    scores, global_scale = sp.importance(sp.lasso.norms())
    assert global_scale
    d = TAYLOR_DECAY
    for kind in scores:
        mean = (seen[0][kind] * d * d + seen[1][kind] * d + seen[2][kind]) * (1 - d) / (1 - d ** 3)
        assert torch.allclose(scores[kind], mean.sqrt(), rtol=1e-5, atol=1e-12)


def test_norm_importance_and_a_taylor_run_before_any_step_rank_by_the_norms_within_each_width():
    norm_sp, _, _ = _sparsifier("lenet5", importance="norm")
    taylor_sp, _, _ = _sparsifier("lenet5", importance="taylor")
    norms = norm_sp.lasso.norms()
    assert norm_sp.importance(norms) == (norms, False)
    assert taylor_sp.importance(norms) == (norms, False)  # nothing observed yet: the norms stand in
    assert [it.refs for it in norm_sp._ranked(None)] == [it.refs for it in taylor_sp._ranked(None)]


@pytest.mark.parametrize("measure", ["macs", "params"])
def test_taylor_ranking_orders_every_group_by_its_score_per_saving_across_widths(measure):
    """On the Taylor scale the items are not normalised by their width's mean: each scores its Taylor importance
    over what it saves in the budget's measure, and the ranking is that order over the whole network."""
    sp, model, spec = _sparsifier("lenet5", importance="taylor", min_keep=0.0)
    for seed in range(4):
        _backward(model, spec, seed)
        sp.observe()
    scores, _ = sp.importance(sp.lasso.norms())
    items = sp._ranked(None, measure)
    assert len(items) == sum(int((sp.lasso.norms()[k] > 0).sum()) for k in ("filter", "channel"))
    got = [it.score for it in items]
    assert got == sorted(got)
    for it in items:
        (kind, i), = it.refs
        assert it.score == pytest.approx(float(scores[kind][i]) / it.est[measure], rel=1e-6)
    # Saving matters: per unit saved, the order is not that of the Taylor scores alone.
    raw = sorted(items, key=lambda it: float(scores[it.refs[0][0]][it.refs[0][1]]))
    assert [it.refs for it in raw] != [it.refs for it in items]


def test_the_measure_of_a_taylor_ranking_follows_the_budget():
    assert _measure(Budget({"macs": 0.5})) == "macs"
    assert _measure(Budget({"macs": 0.5, "params": 0.3})) == "macs"
    assert _measure(Budget({"params": 0.3})) == "params"
    assert _measure(Budget({"latency": 0.5, "macs": 0.6})) == "latency"


def test_a_taylor_run_lands_its_budget_and_reports_its_importance(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["finetune", "--model", "lenet5", "--data", "digits", "--target-flops", "0.3",
                                    "--importance", "taylor", "--pretrain-epochs", "2", "--sparsify-epochs", "2",
                                    "--finetune-epochs", "1", "--out", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    import json
    report = json.loads((out / "report.json").read_text())
    assert report["importance"] == "taylor"
    assert report["budget"]["macs"]["reached"] <= 0.3 + 0.01
    assert report["accuracy"]["after_finetune"] > 0.8


def test_importance_is_checked_and_an_older_resume_state_continues_only_as_norm():
    """A resume state from before --importance ranked by norm: it continues with --importance norm, and the
    default (taylor) is refused naming the option."""
    with pytest.raises(ConfigError, match="importance"):
        build_config(FinetuneConfig, None, {"importance": "magnitude"})
    res = CliRunner().invoke(main, ["finetune", "--importance", "magnitude"])
    assert res.exit_code != 0 and "magnitude" in res.output
    assert FinetuneConfig().importance == "taylor"
    older = resume_fingerprint(build_config(FinetuneConfig, None, {"importance": "norm"}))
    del older["importance"]
    check_resume_fingerprint(older, resume_fingerprint(build_config(FinetuneConfig, None,
                                                                    {"importance": "norm"})), "state.pt")
    with pytest.raises(ConfigError, match="--importance norm, this one gives taylor"):
        check_resume_fingerprint(older, resume_fingerprint(build_config(FinetuneConfig, None, {})), "state.pt")


def test_the_one_shot_baseline_of_a_taylor_run_scores_from_training_gradients_and_leaves_the_model_as_it_was():
    from types import SimpleNamespace

    from sslcompress.data import load_data
    from sslcompress.finetune import pipeline

    cfg = build_config(FinetuneConfig, None, {"importance": "taylor", "data": "digits"})
    sp, model, spec = _sparsifier("lenet5", importance="taylor")
    model.eval()
    weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    r = SimpleNamespace(cfg=cfg, data=load_data("digits", image_size=spec.input_size))
    pipeline._observe_taylor(model, sp, r)
    # The bundled digits hold fewer training batches than the one-shot asks for: all of them are read.
    assert sp._taylor_steps == min(pipeline.ONE_SHOT_TAYLOR_BATCHES,
                                   r.data.num_batches("train", cfg.sparsify.batch_size, drop_last=True)) > 1
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for n, t in model.state_dict().items():
        assert torch.equal(t, weights[n]), n
    scores, global_scale = sp.importance(sp.lasso.norms())
    assert global_scale and all(bool((v > 0).any()) for v in scores.values())
