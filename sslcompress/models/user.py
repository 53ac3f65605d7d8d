"""Models the user brings: a factory in a .py file or an importable module, or a torchvision architecture."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError

TORCHVISION_PREFIX = "torchvision:"


def torchvision_available() -> bool:
    """Whether torchvision imports here; a broken install counts as missing."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_file(spec_name: str, target: str) -> Any:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise UnsupportedModelError(f"Cannot load model {spec_name!r}: the file {target} does not exist.")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"sslcompress_user_model_{path.stem.replace('-', '_')}_{digest}"
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise UnsupportedModelError(
            f"Cannot load model {spec_name!r}: {target} is not a loadable Python file."
        )
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look classes up here
    try:
        import_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise UnsupportedModelError(
            f"Cannot load model {spec_name!r}: executing {target} raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _import_module(spec_name: str, target: str) -> Any:
    try:
        return importlib.import_module(target)
    except (Exception, SystemExit) as exc:
        raise UnsupportedModelError(
            f"Cannot load model {spec_name!r}: importing {target} raised {type(exc).__name__}: {exc}"
        ) from exc


def _factory_kwargs(factory: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``offered`` that the factory's signature can take by keyword."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(offered)
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in offered.items() if k in names}


def build_user_model(name: str, num_classes: int, in_channels: int, input_size: tuple[int, int]) -> nn.Module:
    """Build ``"path/to/file.py:factory"`` or ``"pkg.module:factory"``, passing only the keywords it accepts."""
    target, _, attr = name.rpartition(":")
    if not target or not attr:
        raise UnsupportedModelError(
            f"Cannot load model {name!r}: expected 'path/to/file.py:factory' or 'pkg.module:factory'."
        )
    module = _load_file(name, target) if _is_file_target(target) else _import_module(name, target)
    factory = getattr(module, attr, None)
    if factory is None:
        raise UnsupportedModelError(f"Cannot load model {name!r}: {target} has no attribute {attr!r}.")
    if not callable(factory):
        raise UnsupportedModelError(f"Cannot load model {name!r}: {target}.{attr} is not callable.")
    offered = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    try:
        model = factory(**_factory_kwargs(factory, offered))
    except (Exception, SystemExit) as exc:
        raise UnsupportedModelError(f"Model factory {name!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"Model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def build_torchvision_model(
    name: str, num_classes: int, in_channels: int, input_size: tuple[int, int]
) -> nn.Module:
    """Build ``"torchvision:NAME"`` with random weights; pretrained weights are never fetched."""
    arch = name[len(TORCHVISION_PREFIX) :].strip()
    if not arch:
        raise UnsupportedModelError(f"Model {name!r} names no torchvision architecture.")
    try:
        import torchvision.models as tv_models
    except Exception as exc:
        raise UnsupportedModelError(
            f"Model {name!r} needs torchvision, which is not importable here ({type(exc).__name__}: {exc})."
        ) from exc
    if in_channels != 3:
        raise UnsupportedModelError(f"Model {name!r} takes 3 input channels, not {in_channels}.")
    try:
        model = tv_models.get_model(arch, weights=None, num_classes=num_classes)
    except Exception as exc:
        raise UnsupportedModelError(
            f"torchvision cannot build model {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    _check_input_fits(name, model, in_channels, input_size)
    return model


def _check_input_fits(name: str, model: nn.Module, in_channels: int, input_size: tuple[int, int]) -> None:
    """Run the model once with meta-device weights so a too-small input fails here, not mid-training."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    meta_state = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.device("meta"):
            torch.func.functional_call(model, meta_state, (torch.zeros(1, in_channels, *input_size),))
    except Exception as exc:
        h, w = input_size
        raise UnsupportedModelError(
            f"Model {name!r} cannot run on a {in_channels}x{h}x{w} input: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
