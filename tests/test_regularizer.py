"""GroupLasso against a plain per-group reference: norms, penalty, proximal step, masks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conv1d_nets import SequenceNet, with_statistics
from torch import nn

from sslcompress.errors import ConfigError
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.regularizer import GroupLasso
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


LENET_SHAPE = (1, 1, 28, 28)
R20_SHAPE = (1, 3, 32, 32)
SEQUENCE_SHAPE = (1, 1, 8, 12)

# ---------------------------------------------------------------- reference implementation


def ref_slice(p: torch.Tensor, s) -> torch.Tensor:
    """The values of one slice (a copy)."""
    idx = list(s.index)
    if s.axis == "out":
        return p[idx]
    if s.axis == "in":
        return p[:, idx]
    if s.axis == "fiber":
        return p.reshape(p.shape[0], -1)[:, idx]
    if s.axis == "row":
        return p[:, :, idx]
    if s.axis == "col":  # the last axis: a Conv1d's taps too
        return p[..., idx]
    assert s.axis == "all"
    return p.clone()


def ref_scale_(p: torch.Tensor, s, scale: float) -> None:
    idx = list(s.index)
    if s.axis == "out":
        p[idx] = p[idx] * scale
    elif s.axis == "in":
        p[:, idx] = p[:, idx] * scale
    elif s.axis == "fiber":
        v = p.view(p.shape[0], -1)
        v[:, idx] = v[:, idx] * scale
    elif s.axis == "row":
        p[:, :, idx] = p[:, :, idx] * scale
    elif s.axis == "col":
        p[..., idx] = p[..., idx] * scale
    else:
        p.mul_(scale)


def ref_add_(p: torch.Tensor, s, value: float) -> None:
    idx = list(s.index)
    if s.axis == "out":
        p[idx] += value
    elif s.axis == "in":
        p[:, idx] += value
    elif s.axis == "fiber":
        p.view(p.shape[0], -1)[:, idx] += value
    elif s.axis == "row":
        p[:, :, idx] += value
    elif s.axis == "col":
        p[..., idx] += value
    else:
        p += value


def ref_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().double() for n, p in model.named_parameters()}


def ref_norm(params, g) -> float:
    return math.sqrt(sum(float(ref_slice(params[s.param], s).pow(2).sum()) for s in g.slices))


def ref_numel(params, g) -> int:
    return sum(ref_slice(params[s.param], s).numel() for s in g.slices)


def spatial_sizes(model, input_shape) -> dict[str, int]:
    """Output H*W of every Conv2d, L of every Conv1d (1 for Linear), measured with forward hooks."""
    sizes: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: sizes.__setitem__(name, o[0, 0].numel())))
        elif isinstance(mod, nn.Linear):
            sizes[name] = 1
    was = model.training
    model.eval()
    with torch.no_grad():
        p = next(model.parameters())
        model(torch.zeros(input_shape, dtype=p.dtype))
    model.train(was)
    for h in hooks:
        h.remove()
    return sizes


def ref_weights(model, input_shape, groups, weighting) -> list[float]:
    params = ref_params(model)
    if weighting == "none":
        return [1.0] * len(groups)
    if weighting == "sqrt":
        w = [math.sqrt(ref_numel(params, g)) for g in groups]
    else:
        hw = spatial_sizes(model, input_shape)
        w = []
        for g in groups:
            cost = 0
            for s in g.slices:
                layer, pname = s.param.rsplit(".", 1)
                if pname == "weight" and layer in hw:
                    cost += ref_slice(params[s.param], s).numel() * hw[layer]
            w.append(float(max(cost, 1)))
    mean = sum(w) / len(w)
    return [x / mean for x in w]


def ref_prox(params, groups, weights, lr, lam, norms=None) -> list[float]:
    """Closed-form group soft-threshold on `params` in place; returns the scale of each group."""
    norms = norms or [ref_norm(params, g) for g in groups]
    scales = []
    for g, n, w in zip(groups, norms, weights, strict=True):
        scale = max(0.0, 1.0 - lr * lam * w / n) if n > 0 else 0.0
        for s in g.slices:
            ref_scale_(params[s.param], s, scale)
        scales.append(scale)
    return scales


def threshold_between(norms, weights) -> float:
    """A value of lr*lambda that puts roughly half the groups under the threshold, far from any tie."""
    r = sorted(n / w for n, w in zip(norms, weights, strict=True))
    lo, hi = len(r) // 4, max(len(r) * 3 // 4, len(r) // 4 + 1)
    k = max(range(lo, min(hi, len(r) - 1)), key=lambda i: r[i + 1] - r[i])
    assert r[k + 1] - r[k] > 1e-5 * r[k + 1]
    return (r[k] + r[k + 1]) / 2


# ---------------------------------------------------------------- fixtures

_CACHE: dict = {}


def model_and_groups(name: str):
    if name not in _CACHE:
        torch.manual_seed(1)
        if name == "lenet":
            m = build_model(ModelSpec("lenet5", 10, 1, (28, 28)))
            shape = LENET_SHAPE
            kinds = ("filter", "channel", "shape", "kernel_row", "kernel_col")
        elif name == "sequence":  # Conv1d layers after a Conv2d stem
            m = with_statistics(SequenceNet()).train()
            shape = SEQUENCE_SHAPE
            kinds = ("filter", "channel", "kernel_col")
        else:
            m = build_model(ModelSpec("resnet20", 10, 3, (32, 32)))
            # distinct BN scales so depth groups have distinct norms
            with torch.no_grad():
                for mod in m.modules():
                    if isinstance(mod, nn.BatchNorm2d):
                        mod.weight.uniform_(0.5, 1.5)
                        mod.bias.uniform_(-0.1, 0.1)
            shape = R20_SHAPE
            kinds = ("depth",)
        _CACHE[name] = (m, shape, build_groups(m, shape, kinds))
    m, shape, groups = _CACHE[name]
    return copy.deepcopy(m), shape, groups


def current(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().double() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- proximal step


CASES = [("lenet", k, w) for k in ("filter", "channel", "shape", "kernel_row", "kernel_col")
         for w in ("none", "sqrt", "macs")]
CASES += [("resnet20", "depth", w) for w in ("none", "sqrt", "macs")]
CASES += [("sequence", k, w) for k in ("filter", "channel", "kernel_col") for w in ("sqrt", "macs")]


@pytest.mark.parametrize("net,kind,weighting", CASES)
def test_proximal_step_matches_closed_form(net, kind, weighting):
    model, shape, all_groups = model_and_groups(net)
    groups = [g for g in all_groups if g.kind == kind and g.removable]
    assert len(groups) >= 5
    weights = ref_weights(model, shape, groups, weighting)
    if weighting != "none":
        assert len(set(round(w, 9) for w in weights)) > 1 or kind in ("kernel_row", "kernel_col")
    params = ref_params(model)
    norms = [ref_norm(params, g) for g in groups]
    lr = 0.1
    lam = threshold_between(norms, weights) / lr

    gl = GroupLasso(model, [g for g in all_groups if g.kind == kind], weighting=weighting)
    # norms() matches the reference before the step
    assert torch.allclose(gl.norms()[kind].double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5)
    gl.proximal_step(lr, {kind: lam})
    scales = ref_prox(params, groups, weights, lr, lam, norms)

    got = current(model)
    for n in params:
        assert torch.allclose(got[n], params[n], rtol=1e-5, atol=1e-7), n
    zero = [g for g, s in zip(groups, scales, strict=True) if s == 0]
    kept = [g for g, s in zip(groups, scales, strict=True) if s > 0]
    assert zero and kept
    for g in zero:
        for s in g.slices:
            assert bool((ref_slice(got[s.param], s) == 0).all()), g.name
    for g in kept:
        assert ref_norm(got, g) > 0
    # zero_groups agrees with norms() == 0 and with the reference
    zg = gl.zero_groups()[kind]
    assert torch.equal(zg, gl.norms()[kind] == 0)
    assert zg.tolist() == [s == 0 for s in scales]


def test_proximal_step_float64_model():
    model, shape, all_groups = model_and_groups("lenet")
    model = model.double()
    groups = [g for g in all_groups if g.kind == "filter" and g.removable]
    weights = ref_weights(model, shape, groups, "sqrt")
    params = ref_params(model)
    lr = 0.05
    lam = threshold_between([ref_norm(params, g) for g in groups], weights) / lr
    GroupLasso(model, all_groups, "sqrt").proximal_step(lr, {"filter": lam})
    ref_prox(params, groups, weights, lr, lam)
    for n, p in model.named_parameters():
        # (lambda and the group weights are float32: the threshold is exact to ~1e-7)
        assert p.dtype == torch.float64
        assert torch.allclose(p.detach(), params[n], rtol=1e-5, atol=1e-8), n


def test_proximal_step_kinds_in_turn():
    model, shape, all_groups = model_and_groups("lenet")
    params = ref_params(model)
    filt = [g for g in all_groups if g.kind == "filter" and g.removable]
    chan = [g for g in all_groups if g.kind == "channel" and g.removable]
    lr = 0.1
    lf = threshold_between([ref_norm(params, g) for g in filt], [1.0] * len(filt)) / lr
    GroupLasso(model, all_groups).proximal_step(lr, {"filter": lf, "channel": 0.02 / lr})
    ref_prox(params, filt, [1.0] * len(filt), lr, lf)  # filters first (their order in the group list)
    ref_prox(params, chan, [1.0] * len(chan), lr, 0.02 / lr)  # then channels, on the result
    got = current(model)
    for n in params:
        assert torch.allclose(got[n], params[n], rtol=1e-5, atol=1e-7), n


def test_only_removable_groups_are_regularised():
    model, shape, all_groups = model_and_groups("lenet")
    before = ref_params(model)
    gl = GroupLasso(model, all_groups)
    assert gl.groups == [g for g in all_groups if g.removable]
    assert len([g for g in all_groups if not g.removable]) == 10  # fc2's filters: the model output
    gl.proximal_step(1.0, {"filter": 1e6})
    got = current(model)
    for n in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias"):
        assert bool((got[n] == 0).all()), n
    assert torch.equal(got["fc2.weight"], before["fc2.weight"])
    assert torch.equal(got["fc2.bias"], before["fc2.bias"])
    assert bool(gl.zero_groups()["filter"].all())


class Walled(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.c3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.sigmoid(self.c1(x)))))


def test_pinned_groups_are_not_regularised():
    torch.manual_seed(0)
    m = Walled()
    groups = build_groups(m, (1, 2, 7, 7), ("filter", "channel"))
    removable = {(g.kind, g.layers) for g in groups if g.removable}
    assert removable == {("filter", ("c2",)), ("channel", ("c3",))}
    before = ref_params(m)
    GroupLasso(m, groups).proximal_step(1.0, {"filter": 1e6, "channel": 1e6})
    got = current(m)
    for n in ("c1.weight", "c1.bias"):
        assert torch.equal(got[n], before[n]), n
    assert bool((got["c2.weight"] == 0).all()) and bool((got["c2.bias"] == 0).all())
    # c3 only loses what its channel groups own: all of its input channels; its bias stays
    assert bool((got["c3.weight"] == 0).all())
    assert torch.equal(got["c3.bias"], before["c3.bias"])


# ---------------------------------------------------------------- penalty


@pytest.mark.parametrize("weighting", ["none", "sqrt", "macs"])
def test_penalty_and_gradient(weighting):
    model, shape, all_groups = model_and_groups("lenet")
    with torch.no_grad():
        model.conv1.weight[2].zero_()
        model.conv1.bias[2].zero_()
        model.conv2.weight[:, 4].zero_()
        model.conv2.weight[:, :, 0, :].zero_()  # a whole kernel row: zero row group and 100 zero shape groups
    lambdas = {"filter": 0.3, "channel": 0.05, "shape": 0.01, "kernel_row": 0.02}
    params = ref_params(model)
    expect = 0.0
    coef = {n: torch.zeros_like(p) for n, p in params.items()}
    n_zero = 0
    for kind, lam in lambdas.items():
        groups = [g for g in all_groups if g.kind == kind and g.removable]
        weights = ref_weights(model, shape, groups, weighting)
        for g, w in zip(groups, weights, strict=True):
            norm = ref_norm(params, g)
            expect += lam * w * norm
            if norm == 0:
                n_zero += 1
                continue
            for s in g.slices:  # d/dW of lam*w*||W_g|| = lam*w*W_g/||W_g||
                ref_add_(coef[s.param], s, lam * w / norm)
    grads = {n: coef[n] * params[n] for n in params}
    assert n_zero >= 1 + 1 + 100 + 1

    gl = GroupLasso(model, all_groups, weighting)
    pen = gl.penalty(lambdas)
    assert pen.dim() == 0
    assert float(pen.detach()) == pytest.approx(expect, rel=1e-5)
    model.zero_grad()
    pen.backward()
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        assert bool(torch.isfinite(g).all()), n
        assert torch.allclose(g.double(), grads[n], rtol=1e-4, atol=1e-6), n
    assert bool((model.conv1.weight.grad[2] == 0).all())
    assert bool((model.conv1.bias.grad[2] == 0).all())


def test_penalty_without_lambdas_is_zero():
    model, shape, all_groups = model_and_groups("lenet")
    gl = GroupLasso(model, all_groups)
    assert float(gl.penalty({})) == 0.0
    assert float(gl.penalty({"filter": 0.0, "depth": 1.0})) == 0.0


def test_bad_weighting():
    model, shape, all_groups = model_and_groups("lenet")
    with pytest.raises(ConfigError):
        GroupLasso(model, all_groups, weighting="bogus")


# ---------------------------------------------------------------- masks


def test_keep_masks_false_exactly_on_zero_groups():
    model, shape, all_groups = model_and_groups("lenet")
    with torch.no_grad():
        model.conv1.bias.fill_(0.1)  # (init_weights zeroes conv biases)
        model.conv1.weight[[3, 7]] = 0
        model.conv1.bias[[3, 7]] = 0
        model.conv1.weight[5] = 0  # filter 5 weight zero but its bias is not: group not zero
        model.conv2.weight[:, 5] = 0  # channel group
        model.conv2.weight[:, 9, 1, 2] = 0  # one shape group
        model.conv2.weight[0, 0, 0, 0] = 0  # a lone zero: no group
        model.fc1.weight[:, 16:32] = 0  # fc1 channel group of conv2's channel 1
        model.fc2.weight[0] = 0  # fc2 filter group: not removable
        model.fc2.bias[0] = 0
        model.conv2.weight[:, :, :, 4] = 0  # a kernel column (and 100 shape groups)
    gl = GroupLasso(model, all_groups)
    masks = gl.keep_masks()
    assert set(masks) == {"conv1.weight", "conv1.bias", "conv2.weight", "fc1.weight"}

    exp = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    exp["conv1.weight"][[3, 7]] = False
    exp["conv1.bias"][[3, 7]] = False
    exp["conv2.weight"][:, 5] = False
    exp["conv2.weight"][:, 9, 1, 2] = False
    exp["conv2.weight"][:, :, :, 4] = False
    exp["fc1.weight"][:, 16:32] = False
    for n, m in masks.items():
        assert m.dtype == torch.bool and m.shape == exp[n].shape
        assert torch.equal(m, exp[n]), n

    # the same, from the reference: False exactly where some removable group is all zero
    params = ref_params(model)
    ref = {n: torch.ones_like(p) for n, p in params.items()}
    for g in gl.groups:
        if ref_norm(params, g) == 0:
            for s in g.slices:
                ref_scale_(ref[s.param], s, 0.0)
    for n in ref:
        assert torch.equal(masks.get(n, torch.ones_like(ref[n], dtype=torch.bool)), ref[n].bool()), n
    # zero_groups agrees with norms()
    for k, z in gl.zero_groups().items():
        assert torch.equal(z, gl.norms()[k] == 0)
    assert int(gl.zero_groups()["filter"].sum()) == 2
    assert int(gl.zero_groups()["channel"].sum()) == 2
    assert int(gl.zero_groups()["kernel_col"].sum()) == 1
    assert int(gl.zero_groups()["shape"].sum()) == 25 + 1 + 20 * 5 - 5  # channel 5, (9,1,2), column 4 (5 fibers of channel 5 in it)


def test_keep_masks_depth():
    model, shape, all_groups = model_and_groups("resnet20")
    with torch.no_grad():
        for p in model.layer3.get_submodule("1").parameters():
            p.zero_()
    masks = GroupLasso(model, all_groups).keep_masks()
    assert set(masks) == {f"layer3.1.{m}.{p}" for m, p in [("conv1", "weight"), ("bn1", "weight"), ("bn1", "bias"),
                                                           ("conv2", "weight"), ("bn2", "weight"), ("bn2", "bias")]}
    assert not any(bool(m.any()) for m in masks.values())
