"""Means over the channels that keep dividing by the count the model had, once thinning cut some channels.

A forward that averages over the channels (ConvNeXt V2's global response normalisation divides each channel's
norm by the mean of the norms) divides by the width it reads. Thinning cuts only channels that are exactly zero,
which add nothing to the sum, but the sliced forward would divide by fewer of them. A plan slices tensors and
sets widths; it cannot rewrite a forward. So the module whose forward takes such a mean gets a pair of forward
hooks: while that forward runs, a mean of a tensor of the rank and over the dims the forward wrote is computed
as the sum over those dims divided by the count the model had (a TorchFunctionMode, which sees `x.mean(...)` and
`torch.mean(x, ...)` alike). The plan records each (module, dims, rank, count), so a model rebuilt from it gets
the same hooks.

torch.fx's symbolic trace calls a method of its proxies without the mode seeing it: a thinned model traced so
still shows the mean, whose channels a later thinning then keeps (see thin._averaged). torch.export's trace
runs the mode, and shows the sum and the division by the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_MEANS = (torch.mean, torch.Tensor.mean)


@dataclass(frozen=True)
class KeptMean:
    """A mean over `dims` (as the forward writes them) of a tensor of `rank` dims that divides by `count`."""

    dims: tuple[int, ...]
    rank: int
    count: int


def raw_dims(dim) -> tuple[int, ...] | None:
    """The dims of a mean as its call wrote them (an int, a list or a tuple), or None."""
    if isinstance(dim, int) and not isinstance(dim, bool):
        return (dim,)
    if isinstance(dim, (list, tuple)) and dim and all(isinstance(d, int) for d in dim):
        return tuple(dim)
    return None


class _Mode(TorchFunctionMode):
    def __init__(self, means: tuple[KeptMean, ...]):
        super().__init__()
        self.means = means

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _MEANS and args and isinstance(args[0], torch.Tensor) and "dtype" not in kwargs:
            x = args[0]
            dims = raw_dims(args[1] if len(args) > 1 else kwargs.get("dim"))
            keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            for m in self.means:
                if dims == m.dims and x.dim() == m.rank:
                    return torch.sum(x, dim=dims, keepdim=keepdim) / m.count
        return func(*args, **kwargs)


class _Enter:
    """Forward pre-hook: the mode on for this call of the module."""

    def __init__(self, means: tuple[KeptMean, ...]):
        self.means = means
        self.active: list[_Mode] = []  # one per call in progress (a module may call itself)

    def __call__(self, module, args):
        mode = _Mode(self.means)
        mode.__enter__()
        self.active.append(mode)


class _Exit:
    """Forward hook, called even where the forward raises: the mode off again."""

    def __init__(self, enter: _Enter):
        self.enter = enter

    def __call__(self, module, args, output):
        if self.enter.active:
            self.enter.active.pop().__exit__(None, None, None)


def install(module: nn.Module, means: tuple[KeptMean, ...]) -> list:
    """Hooks on `module` that keep its means' counts; returns their handles (`.remove()` takes them off)."""
    enter = _Enter(tuple(means))
    return [module.register_forward_pre_hook(enter), module.register_forward_hook(_Exit(enter), always_call=True)]


def kept(module: nn.Module) -> dict[tuple[tuple[int, ...], int], int]:
    """The counts `module`'s hooks keep already, by (dims, rank): a later thinning keeps them too."""
    return {(m.dims, m.rank): m.count for hook in module._forward_pre_hooks.values() if isinstance(hook, _Enter)
            for m in hook.means}
