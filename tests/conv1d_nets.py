"""Conv1d test models. A text-recogniser-shaped classifier: a Conv2d stem, its rows stacked with its channels into
a sequence's features, then Conv1d layers (one dilated in a residual block, one strided) over the columns; also a
model file for `sslcompress finetune --model tests/conv1d_nets.py:SequenceNet`. And a speech model's blocks:
Conformer's convolution module (pointwise Conv1d, GLU over the channels, depthwise Conv1d, BatchNorm, SiLU,
pointwise Conv1d) between transposes of a (batch, time, features) stream."""

from __future__ import annotations

import torch
from torch import nn

ROWS = 4  # rows of the stem's output that become features


class SequenceNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: tuple[int, int] = (8, 12)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AvgPool2d((input_size[0] // ROWS, 1)))
        self.seq = nn.Sequential(nn.Conv1d(8 * ROWS, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv1d(16, 12, 5, padding=4, dilation=2), nn.BatchNorm1d(12), nn.ReLU(),
                                   nn.Conv1d(12, 16, 1), nn.BatchNorm1d(16))
        self.down = nn.Sequential(nn.Conv1d(16, 20, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool1d(2))
        self.head = nn.Linear(20, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        n, c, h, w = x.shape
        x = self.seq(x.reshape(n, c * h, w))
        x = torch.relu(x + self.block(x))
        return self.head(self.down(x).mean(-1))


class ConformerConv(nn.Module):
    def __init__(self, d: int, kernel: int = 7):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Conv1d(d, 2 * d, 1)
        self.glu = nn.GLU(dim=1)
        self.dw = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pw2 = nn.Conv1d(d, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x).transpose(1, 2)
        y = self.pw2(nn.functional.silu(self.bn(self.dw(self.glu(self.pw1(y))))))
        return x + y.transpose(1, 2)


class ConformerConvNet(nn.Module):
    """Image rows as time steps, embedded, two Conformer convolution modules, mean over time."""

    def __init__(self, num_classes: int = 10, width: int = 8, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(width, d)
        self.blocks = nn.Sequential(ConformerConv(d), ConformerConv(d))
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = self.blocks(self.embed(x.reshape(n, h, w)))
        return self.head(t.mean(1))


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` in eval mode with BatchNorm statistics and affine parameters away from their defaults, so a
    cut that mishandles them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()
