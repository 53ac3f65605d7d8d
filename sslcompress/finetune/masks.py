"""Frozen zeros: masks that hold through optimizer steps, momentum and weight decay."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ConfigError


class UnknownMaskError(ConfigError, KeyError):
    """Masks name a parameter the model lacks (a KeyError too, as before it was a ConfigError)."""

    __str__ = BaseException.__str__


class MaskSet:
    """Keeps masked weights at exactly zero while the rest trains.

    Gradients are masked by hooks (so momentum never gathers in a masked weight) and the
    weights are multiplied by the mask after every optimizer step (so weight decay or any
    other update that ignores the gradient cannot revive them).
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"MaskSet takes a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(masks, Mapping):
            raise ConfigError(f"masks must map parameter names to tensors, got {type(masks).__name__}.")
        params = dict(model.named_parameters())
        missing = [n for n in masks if n not in params]
        if missing:
            raise UnknownMaskError(f"masks name parameters the model lacks: {', '.join(map(str, missing[:3]))}.")
        for n, m in masks.items():
            if not isinstance(m, torch.Tensor):
                raise ConfigError(f"the mask of {n} must be a tensor, got {type(m).__name__}.")
            if tuple(m.shape) != tuple(params[n].shape):
                raise ConfigError(f"the mask of {n} has shape {tuple(m.shape)}, the parameter {tuple(params[n].shape)}.")
        self.masks = {n: m.to(device=params[n].device, dtype=torch.bool) for n, m in masks.items()}
        self._params = {n: params[n] for n in self.masks}
        self._hooks: list = []

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def zeros(self) -> int:
        return int(sum((~m).sum() for m in self.masks.values()))

    @torch.no_grad()
    def apply_(self) -> None:
        for n, p in self._params.items():
            p.mul_(self.masks[n])

    def attach(self) -> MaskSet:
        """Zero the masked weights now and mask their gradients from here on."""
        self.apply_()
        for n, p in self._params.items():
            mask = self.masks[n]
            self._hooks.append(p.register_hook(lambda g, mask=mask: g * mask))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def state(self) -> dict[str, torch.Tensor]:
        return {n: m.cpu() for n, m in self.masks.items()}


def elementwise_masks(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Masks of individual zero weights (for non-structured l1 sparsity)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach() != 0 for n in names if bool((params[n] == 0).any())}
