"""ONNX Runtime sessions set up for honest timing, and one callable per (session, batch) that runs it.

The settings that matter (measured in shared/reference/ort-cpu-facts.md):

- graph optimisation ORT_ENABLE_ALL: 1.2-1.8x faster than lower levels (NCHWc layouts, fused Add/ReLU);
- intra-op threads set explicitly (ORT's default is one per core, whatever else runs), inter-op 1, sequential;
- spinning: ORT's pool threads busy-wait for work, which lets a tiny net at batch 1 gain from 2 threads
  at all; but several sessions in one process then steal each other's cores (up to 5x slower) while the
  idle ones spin. ``session.force_spinning_stop=1`` keeps spinning while a Run lasts and stops it when Run
  returns, so sessions timed in turn in one process do not disturb each other;
- placement (optional, the bench's default): the calling thread and each session's workers pinned to the
  same CPUs for every variant (`session.intra_op_thread_affinities`), see `placement`.

CUDA: the input is copied to the device once and bound with I/O binding, the output is bound on the device
too (no copy back per call), and each call ends with a synchronisation of the outputs.

This module imports only numpy, onnxruntime and the package's errors, so the memory probe
(`sslcompress.bench.memory`) measures a process that holds little else.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import ConfigError, SSLCompressError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# The CPU and GPU wheels both install the module `onnxruntime` and cannot live side by side (onnxruntime
# issue 26996), and uninstalling one deletes files of the other; the base dependency brings the CPU wheel back.
GPU_INSTALL = ("pip install sslcompress[gpu] && pip uninstall -y onnxruntime onnxruntime-gpu"
               " && pip install onnxruntime-gpu")
# Session config entries, beside the typed options set in session_options().
SESSION_CONFIG = {"session.force_spinning_stop": "1"}


class ProviderUnavailableError(SSLCompressError):
    """An execution provider was asked for that this onnxruntime build or machine cannot run."""


def _gpu_error(why: str) -> ProviderUnavailableError:
    return ProviderUnavailableError(
        f"--provider cuda needs onnxruntime-gpu and an NVIDIA GPU: {why}; on a machine with a GPU run"
        f" `{GPU_INSTALL}` (the CPU and GPU wheels share one module), or use --provider cpu")


def check_provider(provider: str) -> str:
    """The ORT provider name for 'cpu' / 'cuda'; a clear error where it is not in this onnxruntime."""
    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        if provider == "cuda":
            raise _gpu_error(f"this onnxruntime {ort.__version__} offers only {', '.join(available)}")
        raise ProviderUnavailableError(f"this onnxruntime {ort.__version__} lacks {name}")
    return name


def usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return []


def placement(threads: int) -> tuple[int, list[int]] | None:
    """(CPU of the calling thread, CPUs of the pool's workers) for a pinned run; None where there are too few.

    Every variant gets the same placement. Unpinned, the scheduler keeps each session's worker threads on the
    core where they first ran; on a machine where another process holds a core, one variant's workers can
    sit on it for the whole run and another's not, a bias that interleaving rounds cannot cancel (seen here:
    the same model 1x and 2.5x apart at 2 threads on 2 busy cores).
    """
    cpus = usable_cpus()
    if len(cpus) < threads:
        return None
    return cpus[0], cpus[1:threads]


@contextmanager
def calling_thread_on(cpu: int | None):
    """Pin the calling thread to one CPU for the duration (its workers are pinned by the session)."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def session_options(threads: int, pin: bool = False) -> ort.SessionOptions:
    """The options the bench times with; `pin` places the pool's workers as `placement` says."""
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT's warnings go to stderr past the CLI
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    where = placement(threads) if pin else None
    if where is not None and where[1]:
        # One group per worker (threads - 1 of them; ORT never pins the calling thread), CPU ids 1-based.
        so.add_session_config_entry("session.intra_op_thread_affinities", ";".join(str(c + 1) for c in where[1]))
    return so


def make_session(model: bytes | str | Path, provider: str, threads: int, pin: bool = False) -> ort.InferenceSession:
    """A session on `provider` ('cpu' or 'cuda'); CUDA that falls back to the CPU is refused, not timed."""
    name = check_provider(provider)
    source = str(model) if isinstance(model, Path) else model
    try:
        with warnings.catch_warnings():  # ORT warns, then falls back to the CPU: that is refused below instead
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(source, sess_options=session_options(threads, pin), providers=[name])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeError types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if provider == "cuda":
            raise _gpu_error(f"CUDAExecutionProvider could not start ({first})") from exc
        raise SSLCompressError(f"ONNX Runtime cannot load the model: {first}") from exc
    if sess.get_providers()[0] != name:
        raise _gpu_error("CUDAExecutionProvider is installed but did not start (no GPU, or CUDA/cuDNN"
                         " libraries missing)")
    return sess


def probe_cuda() -> None:
    """Start a CUDA session on a one-node model, so a missing GPU is one error before any work."""
    check_provider("cuda")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    make_session(model.SerializeToString(), "cuda", 1)


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


def runner(sess: ort.InferenceSession, x: np.ndarray, provider: str) -> Callable[[], None]:
    """One synchronous inference on input x per call: what a sample times."""
    io = io_of(sess)
    if provider == "cpu":
        feed = {io.input: x}
        outputs = [io.output]

        def run_cpu() -> None:
            sess.run(outputs, feed)

        return run_cpu
    binding = sess.io_binding()
    x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)  # copied to the GPU once, outside the timing
    binding.bind_ortvalue_input(io.input, x_dev)
    binding.bind_output(io.output, "cuda")
    binding.synchronize_inputs()

    def run_cuda() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the call is over when its outputs are ready on the device

    run_cuda.keep_alive = (x_dev, binding)  # type: ignore[attr-defined]
    return run_cuda
