"""The paper's small networks: Caffe's LeNet, the 784-500-300-10 MLP and Caffe's cifar10_full ConvNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._init import init_weights


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pool_out(size: int, kernel: int, stride: int, ceil_mode: bool = False) -> int:
    """Output length of a padding-free pooling layer, with torch's (and Caffe's) ceil-mode rule."""
    out = (size - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size:
        out -= 1
    return out


def _flat_features(channels: int, height: int, width: int) -> int:
    if height <= 0 or width <= 0:
        raise ValueError(f"the input leaves a {height}x{width} feature map before the classifier")
    return channels * height * width


class LeNet5(nn.Module):
    """Caffe's MNIST LeNet, the network of the SSL paper's LeNet experiments.

    Caffe's version has no nonlinearity after the convolutions (only after fc1); this one keeps
    that so filter and shape sparsity behave as in the paper.
    """

    def __init__(self, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        h, w = input_size
        h = _pool_out(_conv_out(_pool_out(_conv_out(h, 5), 2, 2), 5), 2, 2)
        w = _pool_out(_conv_out(_pool_out(_conv_out(w, 5), 2, 2), 5), 2, 2)
        self.fc1 = nn.Linear(_flat_features(50, h, w), 500)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = torch.flatten(x, 1)
        x = self.relu1(self.fc1(x))
        return self.fc2(x)


class MLP(nn.Module):
    """The paper's fully connected MNIST network: inputs-500-300-classes with ReLUs."""

    def __init__(self, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = input_size
        self.fc1 = nn.Linear(in_channels * h * w, 500)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(500, 300)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(300, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class WithinChannelLRN(nn.Module):
    """Caffe's WITHIN_CHANNEL local response normalisation.

    y = x / (1 + alpha * mean over a size x size window of x^2) ** beta, the window zero-padded
    as in Caffe. `channelwise` tells the structure analysis that channel c of the output reads
    only channel c of the input and that 0 maps to 0, so channels pass through it.
    """

    channelwise = True

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> None:
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return x / (1 + self.alpha * local).pow(self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}"


class ConvNet(nn.Module):
    """Caffe's cifar10_full network, the paper's CIFAR-10 ConvNet.

    Pooling uses ``ceil_mode`` as Caffe does (32 -> 16 -> 8 -> 4). For padding-free pooling whose
    kernel is at least its stride, torch's average pooling then divides each clipped border window
    by the number of input pixels it covers, which is exactly Caffe's AVE rule, so the pools match
    Caffe bit for bit up to float summation order.

    The LRN layers are Caffe's ``norm_region: WITHIN_CHANNEL`` as in cifar10_full_train_test, the
    file the paper trained with (a 3x3 spatial window per channel). Each output channel depends on
    its own input channel only, so deleting a channel before it is exact.
    """

    def __init__(self, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
        self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        self.relu1 = nn.ReLU()
        self.norm1 = WithinChannelLRN(3, alpha=5e-5, beta=0.75)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(kernel_size=3, stride=2, ceil_mode=True)
        self.norm2 = WithinChannelLRN(3, alpha=5e-5, beta=0.75)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.AvgPool2d(kernel_size=3, stride=2, ceil_mode=True)
        h, w = input_size
        for _ in range(3):
            h, w = _pool_out(h, 3, 2, ceil_mode=True), _pool_out(w, 3, 2, ceil_mode=True)
        self.fc = nn.Linear(_flat_features(64, h, w), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.relu1(self.pool1(self.conv1(x))))
        x = self.norm2(self.pool2(self.relu2(self.conv2(x))))
        x = self.pool3(self.relu3(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.fc(x)


def lenet5(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    return LeNet5(num_classes, in_channels, input_size)


def mlp(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    return MLP(num_classes, in_channels, input_size)


def convnet(num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    return ConvNet(num_classes, in_channels, input_size)
