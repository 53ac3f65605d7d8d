"""The ranking that forced zeroing lands a budget with.

A conv followed by BatchNorm computes the same function at any scale of its weights, so the ranking must
not prefer one width over another for the scale of its weights: it compares each group with the rest of
its width. And the last channels of a width weigh more than the first: forced zeroing thins every width
rather than emptying the costliest one (on a pretrained CIFAR ResNet-20 at 50% of the MACs, norm per cost
alone left stage 1 one channel wide).
"""

from __future__ import annotations

import pytest
import torch

from sslcompress.config import FinetuneConfig, build_config
from sslcompress.finetune.sparsifier import Sparsifier
from sslcompress.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = ModelSpec("resnet20", num_classes=10, in_channels=3, input_size=(32, 32))
STAGE1_TRUNK = ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")  # each writes the stage-1 trunk


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(SPEC)
    # Trained-looking BatchNorm statistics, so eval mode depends on them.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _scaled(model: torch.nn.Module, convs: tuple[str, ...], alpha: float) -> torch.nn.Module:
    """The same function with these convs' weights times alpha: their BatchNorms' statistics follow."""
    out = _model()
    out.load_state_dict(model.state_dict())
    mods = dict(out.named_modules())
    with torch.no_grad():
        for name in convs:
            mods[name].weight.mul_(alpha)
            bn = mods[name.replace("conv", "bn") if "conv" in name else name]
            bn.running_mean.mul_(alpha)
            bn.running_var.mul_(alpha * alpha)
            bn.eps *= alpha * alpha
    return out


def _forced(model: torch.nn.Module, target: float) -> tuple[dict[str, list[bool]], list[int]]:
    cfg = build_config(FinetuneConfig, None, {"model": "resnet20", "structures": ("filter", "channel"),
                                              "weighting": "macs"})
    sp = Sparsifier(model, SPEC, cfg)
    sp.enforce(target)
    zero = {k: (v == 0).tolist() for k, v in sp.lasso.norms().items()}
    return zero, [lay.filters[0] for lay in sp.counter.count().layers]


def test_the_ranking_ignores_the_scale_a_batchnorm_undoes():
    model = _model()
    scaled = _scaled(model, STAGE1_TRUNK, 0.01)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), model(x), rtol=1e-4, atol=1e-4)  # the same function
    zero, widths = _forced(model, 0.5)
    zero_scaled, widths_scaled = _forced(scaled, 0.5)
    assert widths_scaled == widths
    assert zero_scaled == zero


def test_forced_zeroing_thins_every_width_instead_of_emptying_one():
    _, widths = _forced(_model(), 0.3)
    assert min(widths) >= 2, widths
