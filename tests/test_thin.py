"""Thinning: the torch model loses its dead channels and still computes exactly what the masked one did."""

from __future__ import annotations

import copy
import io
import random

import pytest
import torch
from torch import nn

from sslcompress.errors import CheckpointError, ConfigError
from sslcompress.finetune.counting import Counter
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.masks import MaskSet
from sslcompress.finetune.thin import (
    ThinPlan,
    apply_plan,
    plan_thinning,
    rebuild,
    slice_tensors,
    thin,
)
from sslcompress.models import ModelSpec, build_model


def _spec(name: str) -> ModelSpec:
    if name in ("lenet5", "mlp"):
        return ModelSpec(name, 10, 1, (28, 28))
    return ModelSpec(name, 10, 3, (32, 32))


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Nonzero biases and random BatchNorm statistics, so every kept entry matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 + 0.05)
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@torch.no_grad()
def _zero_groups(model: nn.Module, shape, fraction: float, seed: int = 0) -> int:
    """Zero a random share of the removable filter groups and of the channel groups of produced channels."""
    groups = build_groups(model, shape, ("filter", "channel"))
    filters = [g for g in groups if g.kind == "filter" and g.removable]
    produced = {g.channel for g in filters}
    channels = [g for g in groups if g.kind == "channel" and g.removable and g.channel in produced]
    rng = random.Random(seed)
    chosen = rng.sample(filters, int(fraction * len(filters))) + rng.sample(channels, int(fraction / 2 * len(channels)))
    params = dict(model.named_parameters())
    for g in chosen:
        for s in g.slices:
            p = params[s.param]
            if s.axis == "out":
                p[list(s.index)] = 0
            else:
                assert s.axis == "in"
                p[:, list(s.index)] = 0
    return len(chosen)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def _sparse(name: str, fraction: float = 0.4):
    torch.manual_seed(0)
    spec = _spec(name)
    model = build_model(spec).eval()
    _randomize(model)
    _zero_groups(model, spec.input_shape, fraction)
    return spec, model


@pytest.mark.parametrize("name", ["lenet5", "mlp", "convnet", "resnet20", "resnet18"])
def test_thinned_model_computes_the_masked_one(name):
    spec, model = _sparse(name)
    shape = spec.input_shape
    predicted = Counter(model, shape).count()
    x = torch.randn(3, *shape[1:])
    with torch.no_grad():
        want = model(x)
    res = thin(model, shape)
    assert res.applied, res.reason
    assert res.max_error is not None and res.max_error < 1e-5
    with torch.no_grad():
        got = model(x)
    assert _close(want, got)
    after = Counter(model, shape).count()
    # The counter's prediction for the masked model is what the thinned model really costs.
    assert after.macs == predicted.macs_after < predicted.macs
    assert after.params == predicted.params_after == res.params_after
    assert res.params_before - res.params_after == sum(res.plan.removed(n) for n in res.plan.keep
                                                       if not n.endswith(("running_mean", "running_var")))
    assert after.macs_after == after.macs  # nothing left to remove
    for m in model.modules():  # module attributes agree with the tensors
        if isinstance(m, nn.Conv2d):
            assert (m.out_channels, m.in_channels // m.groups) == tuple(m.weight.shape[:2])
        if isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape)
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_features == m.weight.numel() == m.running_mean.numel() == m.running_var.numel()


def test_plan_names_rows_columns_and_buffers():
    spec, model = _sparse("resnet20")
    plan = plan_thinning(model, spec.input_shape)
    assert 0 in plan.keep["conv1.weight"]  # the stem's filters, coupled with every stage-1 residual sum
    assert set(plan.keep["layer1.0.conv2.weight"]) == {0, 1}
    assert plan.keep["bn1.running_mean"][0] == plan.keep["bn1.weight"][0] == plan.keep["conv1.weight"][0]
    # A residual channel leaves every summand: the downsample path and the block path of stage 2.
    assert plan.keep["layer2.0.downsample.0.weight"][0] == plan.keep["layer2.0.conv2.weight"][0]
    assert plan.keep["fc.weight"] == {1: plan.keep["layer3.0.conv2.weight"][0]}
    ob, oa, ib, ia = plan.widths["layer1.0.conv1"]
    assert (ob, ib) == (16, 16) and oa < ob and ia < ib
    assert "layer" in plan.summary()


class _DepthwiseSE(nn.Module):
    """An inverted-residual style block with a squeeze-and-excitation gate."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 12, 1)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm2d(12)
        self.se1 = nn.Conv2d(12, 4, 1)
        self.se2 = nn.Conv2d(4, 12, 1)
        self.project = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.expand(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = x * torch.sigmoid(self.se2(torch.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        x = torch.relu(self.project(x))
        return self.fc(torch.flatten(x, 1))


def test_depthwise_and_gate_are_cut_together():
    torch.manual_seed(0)
    model = _DepthwiseSE().eval()
    _randomize(model)
    shape = (1, 3, 8, 8)
    _zero_groups(model, shape, 0.4)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    res = thin(model, shape)
    assert res.applied, res.reason
    c = model.dw.out_channels
    assert c < 12 and model.dw.in_channels == model.dw.groups == c and model.dw.weight.shape[0] == c
    assert model.se2.out_channels == model.se1.in_channels == model.bn2.num_features == c
    with torch.no_grad():
        assert _close(want, model(x))


def test_optimizer_state_carries_over():
    spec, dense = _sparse("resnet20")
    dense.train()
    masks = {n: p != 0 for n, p in dense.named_parameters()}
    thinned = copy.deepcopy(dense)
    opt_a = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(thinned.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ms_a = MaskSet(dense, masks).attach()
    ms_b = MaskSet(thinned, masks).attach()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]

    def step(model, opt, ms, batch):
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
        ms.apply_()

    step(dense, opt_a, ms_a, batches[0])
    step(thinned, opt_b, ms_b, batches[0])  # momentum built up before thinning
    ms_b.detach()
    res = thin(thinned, spec.input_shape, optimizer=opt_b)
    assert res.applied, res.reason
    assert thinned.training and all(m.training for m in thinned.modules())
    ms_b = MaskSet(thinned, slice_tensors(masks, res.plan)).attach()
    step(dense, opt_a, ms_a, batches[1])
    step(thinned, opt_b, ms_b, batches[1])
    want = slice_tensors(dict(dense.named_parameters()), res.plan)
    for n, p in thinned.named_parameters():
        assert p.shape == want[n].shape
        assert _close(want[n].detach(), p.detach()), n
        buf_a = opt_a.state[dict(dense.named_parameters())[n]]["momentum_buffer"]
        buf_b = opt_b.state[p]["momentum_buffer"]
        assert _close(slice_tensors({n: buf_a}, res.plan)[n], buf_b), n
    assert len(opt_b.param_groups[0]["params"]) == len(list(thinned.parameters()))
    want_bufs = slice_tensors(dict(dense.named_buffers()), res.plan)
    for n, b in thinned.named_buffers():  # running statistics updated in train mode, channel by channel
        assert torch.allclose(want_bufs[n].float(), b.float(), rtol=1e-5, atol=1e-6), n


def test_plan_round_trip_and_rebuild(tmp_path):
    spec, model = _sparse("lenet5")
    res = thin(model, spec.input_shape)
    assert res.applied
    buf = io.BytesIO()
    torch.save({"plan": res.plan.to_dict(), "state_dict": model.state_dict()}, buf)
    buf.seek(0)
    raw = torch.load(buf, weights_only=True)
    plan = ThinPlan.from_dict(raw["plan"])
    assert plan == res.plan
    rebuilt = rebuild(spec, plan).eval()
    rebuilt.load_state_dict(raw["state_dict"])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(CheckpointError):
        ThinPlan.from_dict({"format": "sslcompress-thin-plan", "version": 1, "keep": {"a": {0: [3]}},
                            "shapes": {"a": [2]}, "modules": {}})
    with pytest.raises(CheckpointError):
        ThinPlan.from_dict({"keep": {}})


def test_plan_does_not_apply_twice():
    spec, model = _sparse("lenet5")
    plan = plan_thinning(model, spec.input_shape)
    apply_plan(model, plan)
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="applied twice"):
        apply_plan(model, plan)
    assert all(p is before[n] for n, p in model.named_parameters())


class _HardCoded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc = nn.Linear(800, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc(x.view(-1, 800))


def test_hard_coded_width_is_left_alone():
    torch.manual_seed(0)
    model = _HardCoded().eval()
    shape = (1, 1, 28, 28)
    _zero_groups(model, shape, 0.4)
    params = dict(model.named_parameters())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    res = thin(model, shape)
    assert not res.applied and "forward fails" in res.reason and res.reason.endswith(".")
    assert not res.plan.empty
    assert all(p is params[n] for n, p in model.named_parameters())
    assert (model.conv2.out_channels, model.fc.in_features) == (50, 800)
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_nothing_dead_is_a_no_op():
    torch.manual_seed(0)
    spec = _spec("convnet")
    model = build_model(spec).eval()
    _randomize(model)
    plan = plan_thinning(model, spec.input_shape)
    assert plan.empty and plan.summary() == "nothing to thin"
    params = dict(model.named_parameters())
    apply_plan(model, plan)
    assert all(p is params[n] for n, p in model.named_parameters())
    res = thin(model, spec.input_shape)
    assert not res.applied and res.params_after == res.params_before


def test_a_layer_keeps_one_channel():
    torch.manual_seed(0)
    spec = _spec("lenet5")
    model = build_model(spec).eval()
    _randomize(model)
    with torch.no_grad():
        model.conv2.weight.zero_()
        model.conv2.bias.zero_()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    res = thin(model, spec.input_shape)
    assert res.applied, res.reason
    assert (model.conv1.out_channels, model.conv2.in_channels, model.conv2.out_channels) == (1, 1, 1)
    assert model.fc1.in_features == 16
    with torch.no_grad():
        assert _close(want, model(x))


def test_mlp_input_pixels_stay():
    """Zero fc1 columns read image pixels: the counter drops them, but the input tensor cannot shrink."""
    torch.manual_seed(0)
    spec = _spec("mlp")
    model = build_model(spec).eval()
    with torch.no_grad():
        model.fc1.weight[:, :100] = 0
        model.fc2.weight[:7] = 0
        model.fc2.bias[:7] = 0
    plan = plan_thinning(model, spec.input_shape)
    assert "fc1.weight" not in plan.keep and len(plan.keep["fc2.weight"][0]) == 293
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    assert thin(model, spec.input_shape).applied
    assert (model.fc1.in_features, model.fc2.out_features, model.fc3.in_features) == (784, 293, 293)
    with torch.no_grad():
        assert _close(want, model(x))
