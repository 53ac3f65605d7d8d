"""One callable per (session, input) that runs one synchronous inference: what a timing sample calls.

CUDA: the inputs are copied to the device once and bound with I/O binding, the output is bound on the device
too (no copy back per call), and each call ends with a synchronisation of the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..errors import ConfigError


@dataclass(frozen=True)
class Io:
    """The model's single input and first output."""

    input: str
    output: str
    shape: tuple[int | None, ...]  # None for a symbolic dimension


def io_of(sess: ort.InferenceSession) -> Io:
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ConfigError(f"the bench times models with one input; this one has {len(inputs)}")
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape)
    return Io(inputs[0].name, sess.get_outputs()[0].name, shape)


# ORT's names of the floating-point input types a bench or a profile feeds, and their numpy types.
FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def as_input(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """x in the float type of the session's input (an fp16 model takes the same values in half precision)."""
    want = FLOAT_INPUTS.get(sess.get_inputs()[0].type)
    return x if want is None or x.dtype == want else x.astype(want)


def runner(sess: ort.InferenceSession, x: np.ndarray | Mapping[str, np.ndarray], provider: str
           ) -> Callable[[], None]:
    """One synchronous inference per call on input x (in the input's float type), or on a feed {name: array} of
    every input of a model with several; its first output kept where the provider put it."""
    if isinstance(x, Mapping):
        names = [i.name for i in sess.get_inputs()]
        if sorted(x) != sorted(names):
            raise ConfigError(f"the feed gives {', '.join(sorted(x))}; the model takes {', '.join(names)}")
        feed = dict(x)
    else:
        io = io_of(sess)
        feed = {io.input: as_input(sess, x)}
    output = sess.get_outputs()[0].name
    if provider == "cpu":
        outputs = [output]

        def run_cpu() -> None:
            sess.run(outputs, feed)

        return run_cpu
    binding = sess.io_binding()
    on_device = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for n, a in feed.items()}  # copied once
    for n, value in on_device.items():
        binding.bind_ortvalue_input(n, value)
    binding.bind_output(output, "cuda")
    binding.synchronize_inputs()

    def run_cuda() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the call is over when its outputs are ready on the device

    run_cuda.keep_alive = (on_device, binding)  # type: ignore[attr-defined]
    return run_cuda
