"""ModelSpec: everything needed to rebuild a model, small enough to live inside a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedModelError


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class ModelSpec:
    """Names an architecture and the shape of its inputs and outputs.

    ``name`` is a builtin name, ``"torchvision:NAME"``, ``"path/to/file.py:factory"`` or
    ``"pkg.module:factory"``.
    """

    name: str
    num_classes: int = 10
    in_channels: int = 3
    input_size: tuple[int, int] = (32, 32)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise UnsupportedModelError(f"A model name must be a non-empty string, got {self.name!r}.")
        if not _positive_int(self.num_classes):
            raise UnsupportedModelError(f"num_classes must be a positive integer, got {self.num_classes!r}.")
        if not _positive_int(self.in_channels):
            raise UnsupportedModelError(f"in_channels must be a positive integer, got {self.in_channels!r}.")
        size = self.input_size
        if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_positive_int(v) for v in size):
            raise UnsupportedModelError(f"input_size must be two positive integers (H, W), got {size!r}.")
        object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """(1, C, H, W): the shape of one example, for tracing and export."""
        return (1, self.in_channels, self.input_size[0], self.input_size[1])

    def to_dict(self) -> dict[str, Any]:
        """Plain str/int/list values only, so torch.load(weights_only=True) can read it back."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "input_size": [self.input_size[0], self.input_size[1]],
        }

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        """Inverse of :meth:`to_dict`; anything malformed raises UnsupportedModelError."""
        if not isinstance(d, dict):
            raise UnsupportedModelError(f"A model spec must be a dict, got {type(d).__name__}.")
        if "name" not in d:
            raise UnsupportedModelError("A model spec dict has no 'name' entry.")
        kwargs: dict[str, Any] = {"name": d["name"]}
        for key in ("num_classes", "in_channels"):
            if key in d:
                kwargs[key] = d[key]
        if "input_size" in d:
            size = d["input_size"]
            if not isinstance(size, (list, tuple)):
                raise UnsupportedModelError(
                    f"A model spec's input_size must be a list of two integers, got {size!r}."
                )
            kwargs["input_size"] = tuple(size)
        return cls(**kwargs)
