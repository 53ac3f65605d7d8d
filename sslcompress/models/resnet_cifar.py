"""CIFAR ResNets (He et al. 2016, section 4.2) with projection shortcuts where the shape changes."""

from __future__ import annotations

import torch
from torch import nn

from ._init import init_weights
from .imagenet import BasicBlock  # the same block; only the stem and widths differ


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: a 16-wide stem and three stages of n blocks (16, 32, 64 wide)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet20(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels)
