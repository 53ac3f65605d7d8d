"""A test model behind control flow on a size, which torch.fx cannot trace: the analysis then reads the graph
torch.export records (aten ops, sizes as numbers)."""

from __future__ import annotations

import torch
from torch import nn


def untraceable(net: type[nn.Module]) -> type[nn.Module]:
    """`net` with its forward behind `if x.shape[-1] > 4:`, computing the same outputs."""

    class Untraceable(net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] > 4:
                x = x * 1.0
            return super().forward(x)

    Untraceable.__name__ = f"Untraceable{net.__name__}"
    return Untraceable
