"""Built-in CNN architectures and loading of user and torchvision models by name."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .registry import BUILTINS, build_builtin
from .spec import ModelSpec
from .user import TORCHVISION_PREFIX, build_torchvision_model, build_user_model, torchvision_available

__all__ = ["ModelSpec", "build_model", "builtin_models", "natural_input", "torchvision_available"]

_USER_INPUT: tuple[int, tuple[int, int]] = (3, (224, 224))


def builtin_models() -> dict[str, str]:
    """Builtin name -> one-line description, for help texts and error messages."""
    return {name: entry.description for name, entry in BUILTINS.items()}


def _unknown(name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Unknown model {name!r}: use one of {', '.join(BUILTINS)}, 'torchvision:NAME', "
        "'path/to/file.py:factory' or 'pkg.module:factory'."
    )


def natural_input(name: str) -> tuple[int, tuple[int, int]]:
    """(in_channels, (H, W)) the architecture was designed for; (3, (224, 224)) for user and torchvision models."""
    entry = BUILTINS.get(name)
    if entry is not None:
        return entry.in_channels, entry.input_size
    if ":" in name:
        return _USER_INPUT
    raise _unknown(name)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the model a spec names, with fresh random weights; never downloads anything."""
    args = (spec.num_classes, spec.in_channels, spec.input_size)
    if spec.name in BUILTINS:
        return build_builtin(spec.name, *args)
    if spec.name.startswith(TORCHVISION_PREFIX):
        return build_torchvision_model(spec.name, *args)
    if ":" in spec.name:
        return build_user_model(spec.name, *args)
    raise _unknown(spec.name)
