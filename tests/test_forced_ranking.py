"""The ranking that forced zeroing lands a budget with.

Each group is compared with the rest of its pool (its norm over the pool's mean norm, as Torch-Pruning's
group norm normalises): a width whose weights are all at another scale is cut the same, and every pool keeps
a group scoring at least 1 (the mean), so forced zeroing thins widths rather than emptying the costliest one (on a
pretrained CIFAR ResNet-20 at 50% of the MACs, norm per cost alone left stage 1 one channel wide).
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


def _scaled(model: torch.nn.Module, params: tuple[str, ...], alpha: float) -> torch.nn.Module:
    """A copy with these parameters times alpha."""
    out = _model()
    out.load_state_dict(model.state_dict())
    named = dict(out.named_parameters())
    with torch.no_grad():
        for name in params:
            named[name].mul_(alpha)
    return out


def _forced(model: torch.nn.Module, target: float) -> tuple[dict[str, list[bool]], list[int]]:
    cfg = build_config(FinetuneConfig, None, {"model": "resnet20", "structures": ("filter", "channel"),
                                              "weighting": "macs"})
    sp = Sparsifier(model, SPEC, cfg)
    sp.enforce(target)
    zero = {k: (v == 0).tolist() for k, v in sp.lasso.norms().items()}
    return zero, [lay.filters[0] for lay in sp.counter.count().layers]


def test_a_width_at_another_scale_is_cut_the_same():
    model = _model()
    with torch.no_grad():  # trained-looking weights: BatchNorm scales and shifts that differ per channel
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    # Everything the filter groups of the stage-1 trunk hold: its writers' weights and BatchNorm affines.
    trunk = tuple(f"{c}.weight" for c in STAGE1_TRUNK) + tuple(
        f"{c.replace('conv', 'bn')}.{p}" for c in STAGE1_TRUNK for p in ("weight", "bias"))
    zero, widths = _forced(model, 0.5)
    for alpha in (0.01, 100.0):
        zero_scaled, widths_scaled = _forced(_scaled(model, trunk, alpha), 0.5)
        assert widths_scaled == widths
        assert zero_scaled == zero
    assert widths[0] < 16  # the trunk is cut, so the equalities above compare cuts


def test_forced_zeroing_thins_every_width_instead_of_emptying_one():
    _, widths = _forced(_model(), 0.3)
    assert min(widths) >= 2, widths
