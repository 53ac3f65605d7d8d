"""The table of built-in architectures and the input-size check that guards them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from . import convnext, imagenet, resnet_cifar, small, vit

Factory = Callable[[int, int, tuple[int, int]], nn.Module]

_MAX_SEARCH_SIDE = 4096


@dataclass(frozen=True)
class Builtin:
    """A builtin architecture: its factory, a one-line description and the input it was designed for."""

    factory: Factory
    description: str
    in_channels: int
    input_size: tuple[int, int]


BUILTINS: dict[str, Builtin] = {
    "lenet5": Builtin(
        small.lenet5, "Caffe LeNet (20-50 conv, 500 fc) for MNIST, as in the SSL paper", 1, (28, 28)
    ),
    "mlp": Builtin(
        small.mlp, "fully connected 784-500-300-10 network for MNIST, as in the SSL paper", 1, (28, 28)
    ),
    "convnet": Builtin(
        small.convnet, "Caffe cifar10_full ConvNet (32-32-64 conv, LRN) for CIFAR-10", 3, (32, 32)
    ),
    "resnet20": Builtin(
        resnet_cifar.resnet20, "CIFAR ResNet-20 (3x3 blocks of 16/32/64, option B)", 3, (32, 32)
    ),
    "resnet32": Builtin(
        resnet_cifar.resnet32, "CIFAR ResNet-32 (3x5 blocks of 16/32/64, option B)", 3, (32, 32)
    ),
    "resnet56": Builtin(
        resnet_cifar.resnet56, "CIFAR ResNet-56 (3x9 blocks of 16/32/64, option B)", 3, (32, 32)
    ),
    "vit_tiny": Builtin(
        vit.vit_tiny, "small ViT (96 wide, 6 pre-norm blocks of 3 heads, MLP 4x) on about 8x8 patches", 3, (32, 32)
    ),
    "llama_vit_tiny": Builtin(
        vit.llama_vit_tiny, "vit_tiny with LLaMA blocks (RMSNorm, grouped-query rotary attention, SwiGLU MLP of 256)", 3, (32, 32)
    ),
    "vit_small": Builtin(
        vit.vit_small, "ViT-S/16 layout (384 wide, 12 pre-norm blocks of 6 heads, MLP 4x, 16x16 patches)", 3, (224, 224)
    ),
    "convnext_cifar": Builtin(
        convnext.convnext_cifar, "small ConvNeXt (32/64/128, 2 blocks a stage, 7x7 depthwise, 4x MLP)", 3, (32, 32)
    ),
    "alexnet": Builtin(imagenet.alexnet, "single-tower AlexNet as in torchvision", 3, (224, 224)),
    "vgg16": Builtin(imagenet.vgg16, "VGG-16 (configuration D) without BatchNorm", 3, (224, 224)),
    "vgg16_bn": Builtin(imagenet.vgg16_bn, "VGG-16 (configuration D) with BatchNorm", 3, (224, 224)),
    "resnet18": Builtin(imagenet.resnet18, "ImageNet ResNet-18, torchvision layout", 3, (224, 224)),
    "resnet50": Builtin(imagenet.resnet50, "ImageNet ResNet-50 (v1.5), torchvision layout", 3, (224, 224)),
}


def runs_on(factory: Factory, num_classes: int, in_channels: int, size: tuple[int, int]) -> Exception | None:
    """Build and run the architecture on the meta device (no memory, no compute); return what failed, if anything."""
    try:
        with torch.device("meta"):
            model = factory(num_classes, in_channels, size)
            model.eval()
            model(torch.zeros(1, in_channels, size[0], size[1]))
    except Exception as exc:  # any failure here means this input shape cannot work
        return exc
    return None


def smallest_side(factory: Factory, num_classes: int, in_channels: int) -> int | None:
    """Smallest square input side the architecture accepts, or None if no side up to 4096 works."""
    hi = 1
    while runs_on(factory, num_classes, in_channels, (hi, hi)) is not None:
        if hi >= _MAX_SEARCH_SIDE:
            return None
        hi *= 2
    lo = hi // 2  # lo fails (or is 0), hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if runs_on(factory, num_classes, in_channels, (mid, mid)) is None:
            hi = mid
        else:
            lo = mid
    return hi


def build_builtin(name: str, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """Build a builtin, first checking on the meta device that the input size fits the architecture."""
    entry = BUILTINS[name]
    if (in_channels, tuple(input_size)) == (entry.in_channels, tuple(entry.input_size)):
        # The shape the architecture was designed for: no check needed, and the meta-device run costs
        # seconds the first time (torch imports its decompositions for it).
        return entry.factory(num_classes, in_channels, input_size)
    failure = runs_on(entry.factory, num_classes, in_channels, input_size)
    if failure is not None:
        side = smallest_side(entry.factory, num_classes, in_channels)
        h, w = input_size
        if side is not None and min(h, w) < side:
            raise UnsupportedModelError(
                f"Model {name!r} needs inputs of at least {side}x{side} pixels, got {h}x{w}."
            ) from failure
        raise UnsupportedModelError(
            f"Model {name!r} cannot run on a {in_channels}x{h}x{w} input: {failure}"
        ) from failure
    return entry.factory(num_classes, in_channels, input_size)
