"""torchvision's VisionTransformer (nn.MultiheadAttention called with need_weights=False, MLPBlock) gets head
and neuron groups, and the training's count of a zeroed one equals what the surgery cuts from its export.
Runs only where torchvision imports beside the installed torch."""

from __future__ import annotations

import pytest
import torch

from sslcompress.models import torchvision_available

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torchvision_available(), reason="torchvision is not importable")]

LAYERS, HEADS, DIM, MLP = 2, 4, 32, 64
SHAPE = (1, 3, 16, 16)


def _small_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=4, num_layers=LAYERS, num_heads=HEADS, hidden_dim=DIM,
                             mlp_dim=MLP, num_classes=10).eval()


@pytest.mark.parametrize("dynamic", [False, True])
def test_torchvision_vit_heads_and_neurons(dynamic):
    from sslcompress.finetune.counting import Counter
    from sslcompress.finetune.groups import build_groups
    from sslcompress.surgery.compress import compress
    from sslcompress.surgery.export import export_onnx

    model = _small_vit()
    groups = [g for g in build_groups(model, SHAPE, ("neuron", "head")) if g.removable]
    heads = [g for g in groups if g.kind == "head"]
    neurons = [g for g in groups if g.kind == "neuron"]
    assert len(heads) == LAYERS * HEADS and len(neurons) == LAYERS * MLP
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in heads[1::2] + neurons[::3]:
            for s in g.slices:
                p = params[s.param]
                index = torch.as_tensor(s.index)
                p.index_fill_(0 if s.axis == "out" else 1, index, 0.0)
    counted = Counter(model, SHAPE).count()
    assert counted.macs_after < counted.macs
    result = compress(export_onnx(model, SHAPE, dynamic_batch=dynamic).model)
    assert result.verification.passed
    assert (result.report["totals"]["macs"], result.report["totals"]["macs_after"]) == (counted.macs,
                                                                                       counted.macs_after)
