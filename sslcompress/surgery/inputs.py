"""Inputs to verify a compact model on: seeded random batches, and real images from a data spec.

Random normal inputs drive every channel, so they catch any change of the function; real images
check it where it is used and make the top-1 agreement meaningful. A model whose input has a
dynamic spatial size gets random inputs of its real inputs' shape, so it can be verified at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..errors import DataError, UnsupportedModelError

REAL_BATCH = 16  # images per real batch when the model's batch dimension is dynamic


def _the_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"Verification needs a model with exactly one input, this one has {len(inputs)}.")
    return inputs[0]


def declared_shape(model: onnx.ModelProto) -> tuple[int | None, ...]:
    """The input's declared shape, None for each symbolic or unknown dimension."""
    dims = _the_input(model).type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)


def _fmt(shape: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def random_batches(
    model: onnx.ModelProto,
    real: Sequence[np.ndarray] | None = None,
    *,
    n_random: int = 4,
    batch: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """``n_random`` seeded standard-normal batches of the model's input shape.

    A symbolic batch dimension becomes ``batch``; any other symbolic dimension is taken from the
    first real input, and without one the model cannot be verified (UnsupportedModelError).
    The stream is the one :func:`sslcompress.surgery.verify.compare` draws.
    """
    if n_random <= 0:
        return []
    name = _the_input(model).name
    shape: list[int] = []
    for i, d in enumerate(declared_shape(model)):
        if d is not None:
            shape.append(d)
        elif i == 0:
            shape.append(batch)
        elif real:
            if real[0].ndim <= i:
                raise DataError(f"The real inputs have {real[0].ndim} dimensions, the model's input {name!r} more.")
            shape.append(int(real[0].shape[i]))
        else:
            raise UnsupportedModelError(
                f"Input {name!r} has a dynamic dimension {i}, so no random inputs can be made for it; "
                "verify it on real inputs (--data SPEC on the command line)."
            )
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(shape), dtype=np.float32) for _ in range(n_random)]


def real_inputs(model: onnx.ModelProto, spec: str, *, limit: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Up to ``limit`` test images of data set ``spec``, normalized as in training, in batches the model takes.

    A static batch dimension B gives batches of exactly B images (a short remainder is dropped);
    a dynamic one gives batches of up to REAL_BATCH. Images of another shape than the model's
    input raise DataError: verification compares functions, it does not resize.
    """
    from ..data import load_data

    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise DataError(f"The number of real images must be a positive integer, got {limit!r}.")
    shape = declared_shape(model)
    name = _the_input(model).name
    if len(shape) != 4:
        raise DataError(
            f"Real images have the shape (N, C, H, W), but the model's input {name!r} has "
            f"{len(shape)} dimensions ({_fmt(shape)})."
        )
    data = load_data(spec, limit_test=limit, seed=seed)
    images = tuple(int(d) for d in data.x_test.shape[1:])
    if any(want is not None and want != got for want, got in zip(shape[1:], images)):
        raise DataError(
            f"Data set {data.name} has {_fmt(images)} images but the model's input {name!r} is "
            f"{_fmt(shape[1:])} (CxHxW); give images of the model's input shape."
        )
    n = int(data.x_test.shape[0])
    static_batch = shape[0]
    if static_batch is not None and n < static_batch:
        raise DataError(
            f"The model takes batches of exactly {static_batch} images, but only {n} real images were loaded "
            f"from {data.name}; raise the limit or export with a dynamic batch."
        )
    size = static_batch if static_batch is not None else min(REAL_BATCH, n)
    return [x.numpy() for x, _ in data.batches("test", size, drop_last=static_batch is not None)]
