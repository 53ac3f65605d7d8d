"""The training's MAC count of a ViT with zero neurons and heads equals what the surgery cuts from its export,
with a static and a dynamic batch. Fresh vit_tiny weights keep every bias zero, so onnxsim shares one zero
initializer among all blocks' biases of a shape: each block must still lose its own neurons."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslcompress.finetune.counting import Counter
from sslcompress.models.registry import build_builtin
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_zeros(seed: int):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_builtin("vit_tiny", 10, 1, (8, 8)).eval()
    with torch.no_grad():
        for blk in model.blocks:
            assert not blk.mlp.fc1.bias.any()  # what makes onnxsim share them
            dead = torch.as_tensor(rng.choice(384, int(rng.integers(0, 384)), replace=False))
            blk.mlp.fc1.weight[dead] = 0
            blk.mlp.fc2.weight[:, dead] = 0
            att = blk.attn
            for h in rng.choice(att.num_heads, int(rng.integers(0, att.num_heads)), replace=False):
                rows = slice(int(h) * att.head_dim, (int(h) + 1) * att.head_dim)
                for lin in (att.q, att.k, att.v):
                    lin.weight[rows] = 0
                    lin.bias[rows] = 0
                att.proj.weight[:, rows] = 0
    return model


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_counted_macs_are_the_cut_macs(seed, dynamic):
    model = _random_zeros(seed)
    counted = Counter(model, (1, 1, 8, 8)).count()
    result = compress(export_onnx(model, (1, 1, 8, 8), dynamic_batch=dynamic).model)
    assert result.verification.passed
    totals = result.report["totals"]
    assert (totals["macs"], totals["macs_after"]) == (counted.macs, counted.macs_after)
    assert counted.macs_after < counted.macs
