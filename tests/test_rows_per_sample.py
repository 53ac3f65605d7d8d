"""A Linear's MACs per sample count every row it computes for one sample, wherever the rows sit: windowed
attention (Swin) folds its windows into the batch axis, a sequence-first layout puts the tokens before it.
The count must be the export's, or `export` refuses the checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from counted_cut import assert_cut_as_counted, exported
from torch import nn
from zeroing import zero_groups

from sslcompress.finetune.counting import count
from sslcompress.finetune.groups import build_groups
from sslcompress.surgery.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")


class WindowAttentionNet(nn.Module):
    """Patches, then one Swin-style block: 2x2 windows of 4x4 tokens folded into the batch axis for attention,
    unfolded for the MLP."""

    def __init__(self, dim: int = 16, window: int = 4, heads: int = 2):
        super().__init__()
        self.window, self.heads = window, heads
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x)
        b, c, h, w = x.shape
        s = self.window
        windows = x.reshape(b, c, h // s, s, w // s, s).permute(0, 2, 4, 3, 5, 1).reshape(-1, s * s, c)
        y = self.norm1(windows)
        n = y.shape[1]
        q, k, v = (f(y).reshape(-1, n, self.heads, c // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, n, c)
        tokens = (windows + self.proj(y)).reshape(b, -1, c)
        tokens = tokens + self.fc2(F.gelu(self.fc1(self.norm2(tokens))))
        return self.head(tokens.mean(1))


class SequenceFirst(nn.Module):
    """Tokens first, (S, B, E), as nn.Transformer's default layout has them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 10)

    def forward(self, x):
        t = x.flatten(2).permute(2, 0, 1)  # (B, 8, S) -> (S, B, 8)
        t = t + self.fc2(F.relu(self.fc1(t)))
        return self.head(t.mean(0))


@pytest.mark.parametrize("net,shape", [(WindowAttentionNet, (1, 3, 32, 32)), (SequenceFirst, (1, 8, 4, 5))])
def test_the_count_is_the_exports(net, shape):
    torch.manual_seed(0)
    model = net().eval()
    report = compress(exported(model, shape)).report
    assert count(model, shape).macs == report["totals"]["macs"]
    neurons = [g for g in build_groups(model, shape, ("neuron",)) if g.removable]
    zero_groups(model, neurons[3:9], rows_and_columns_only=True)
    assert_cut_as_counted(model, shape, exported(model, shape))
