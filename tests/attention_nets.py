"""The small transformer the attention tests build around their attention module."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class TwoBlocks(nn.Module):
    """2x2 patch tokens of a one-channel image, two residual attention blocks, a classifier on their mean."""

    def __init__(self, dim: int, make_attention: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 2, 2)
        self.attn0 = make_attention()
        self.attn1 = make_attention()
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn0(x)
        x = x + self.attn1(x)
        return self.head(x.mean(1))
