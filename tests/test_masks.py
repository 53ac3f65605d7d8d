"""MaskSet: masked weights stay exactly zero through optimizer steps, momentum and weight decay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.masks import MaskSet, elementwise_masks
from sslcompress.finetune.regularizer import GroupLasso
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (1, 1, 28, 28)


def setup():
    torch.manual_seed(0)
    m = build_model(ModelSpec("lenet5", 10, 1, (28, 28)))
    with torch.no_grad():
        m.conv1.bias.uniform_(-0.1, 0.1)
        m.conv2.bias.uniform_(-0.1, 0.1)
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    return m, x, y


def zero_some_groups(m):
    with torch.no_grad():
        m.conv1.weight[[2, 11]] = 0
        m.conv1.bias[[2, 11]] = 0
        m.conv2.weight[:, 7] = 0
        m.conv2.weight[:, :, :, 0] = 0
        m.fc1.weight[:, 32:48] = 0
    groups = build_groups(m, SHAPE, ("filter", "channel", "kernel_col"))
    return GroupLasso(m, groups).keep_masks()


def step(m, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
], ids=["sgd", "adam", "adamw"])
def test_masked_weights_stay_zero(make_opt):
    m, x, y = setup()
    opt = make_opt(m.parameters())
    for _ in range(3):  # momentum / Adam moments gather in every weight before the masks exist
        step(m, opt, x, y)
    masks = zero_some_groups(m)
    assert set(masks) == {"conv1.weight", "conv1.bias", "conv2.weight", "fc1.weight"}
    ms = MaskSet(m, masks).attach()
    assert len(ms) == 4
    assert ms.zeros == 2 * 25 + 2 + (50 * 25 + 50 * 20 * 5 - 50 * 5) + 500 * 16
    params = dict(m.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(20):
        step(m, opt, x, y)
        ms.apply_()  # what the training loop does after every optimizer step
        for n, mask in masks.items():
            assert bool((params[n][~mask] == 0).all()), n
    for n, mask in masks.items():
        # the rest trains
        assert not torch.equal(params[n][mask], start[n][mask]), n
    for n in ("conv2.bias", "fc1.bias", "fc2.weight"):
        assert not torch.equal(params[n], start[n]), n


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=1e-3),
], ids=["sgd", "adam"])
def test_gradient_hooks_alone_keep_zeros_with_fresh_optimizer(make_opt):
    m, x, y = setup()
    masks = zero_some_groups(m)
    ms = MaskSet(m, masks).attach()
    opt = make_opt(m.parameters())
    params = dict(m.named_parameters())
    for _ in range(20):
        step(m, opt, x, y)  # no apply_: masked gradients never move a zero weight
        for n, mask in masks.items():
            assert bool((params[n][~mask] == 0).all()), n
    ms.detach()


def test_gradients_masked_until_detach():
    m, x, y = setup()
    masks = zero_some_groups(m)
    ms = MaskSet(m, masks).attach()
    params = dict(m.named_parameters())
    F.cross_entropy(m(x), y).backward()
    for n, mask in masks.items():
        g = params[n].grad
        assert bool((g[~mask] == 0).all()), n
        assert bool((g[mask] != 0).any()), n
    ms.detach()
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    # without the hooks the zero weights get gradients again
    assert bool((params["conv2.weight"].grad[:, 7] != 0).any())
    assert bool((params["conv1.weight"].grad[2] != 0).any())
    assert bool((params["fc1.weight"].grad[:, 32:48] != 0).any())
    # detach twice is harmless; attach again masks again
    ms.detach()
    ms.attach()
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    assert bool((params["conv2.weight"].grad[:, 7] == 0).all())
    ms.detach()


def test_apply_zeroes_revived_weights_and_state():
    m, _, _ = setup()
    masks = zero_some_groups(m)
    ms = MaskSet(m, masks)
    with torch.no_grad():
        m.conv2.weight[:, 7] = 1.0
    ms.apply_()
    assert bool((m.conv2.weight[:, 7] == 0).all())
    state = ms.state()
    assert set(state) == set(masks)
    assert all(torch.equal(state[n], masks[n]) and state[n].dtype == torch.bool for n in masks)


def test_unknown_parameter_name():
    m, _, _ = setup()
    with pytest.raises(KeyError):
        MaskSet(m, {"nope.weight": torch.ones(3, dtype=torch.bool)})


def test_elementwise_masks():
    m, _, _ = setup()
    with torch.no_grad():
        m.fc1.weight[0, 0] = 0
        m.fc1.weight[3, 9] = 0
    masks = elementwise_masks(m, ["fc1.weight", "fc2.weight"])
    assert set(masks) == {"fc1.weight"}
    assert int((~masks["fc1.weight"]).sum()) == 2
    assert not masks["fc1.weight"][3, 9]
