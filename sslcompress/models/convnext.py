"""A small ConvNeXt for CIFAR-sized inputs.

Each block is a depthwise 7x7 conv, then channels-last (a permute) LayerNorm and a Linear-GELU-Linear
inverted bottleneck (4x), a permute back and the residual sum. A 2x2 stride-2 stem and 2x2 stride-2
downsampling convs (each after a channels-first LayerNorm) take 32x32 to 4x4 over three stages.
"""

from __future__ import annotations

import torch
from torch import nn

from ._init import init_transformer_weights


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) tensor, as ConvNeXt writes it: permute, norm, permute."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, input_size: tuple[int, int], *,
                 dims: tuple[int, ...] = (32, 64, 128), depths: tuple[int, ...] = (2, 2, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], kernel_size=2, stride=2),
                                  ChannelsFirstLayerNorm(dims[0]))
        stages: list[nn.Module] = []
        for k, (dim, depth) in enumerate(zip(dims, depths)):
            down: list[nn.Module] = []
            if k > 0:
                down = [ChannelsFirstLayerNorm(dims[k - 1]), nn.Conv2d(dims[k - 1], dim, kernel_size=2, stride=2)]
            stages.append(nn.Sequential(*down, *[Block(dim) for _ in range(depth)]))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)
        init_transformer_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean(dim=(-2, -1))))


def convnext_cifar(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    return ConvNeXt(num_classes, in_channels, input_size)
