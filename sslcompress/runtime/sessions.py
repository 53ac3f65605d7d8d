"""ONNX Runtime sessions, made one way for the whole package: the bench, the surgery's checks and timing.

The settings that matter (measured in shared/reference/ort-cpu-facts.md):

- graph optimisation ORT_ENABLE_ALL: 1.2-1.8x faster than lower levels (NCHWc layouts, fused Add/ReLU);
  "basic" and "disable" exist for checks that compare values rather than time them;
- intra-op threads set explicitly (ORT's default is one per core, whatever else runs), inter-op 1, sequential;
- spinning: ORT's pool threads busy-wait for work, which lets a tiny net at batch 1 gain from 2 threads
  at all; but several sessions in one process then steal each other's cores (up to 5x slower) while the
  idle ones spin. ``session.force_spinning_stop=1`` keeps spinning while a Run lasts and stops it when Run
  returns, so sessions timed in turn in one process do not disturb each other;
- placement (optional, the bench's default): each session's workers pinned to the CPUs that
  `pinning.placement` names (`session.intra_op_thread_affinities`).

This module imports only onnxruntime and the package's errors (never onnx: a ModelProto is recognised by
its SerializeToString), so the memory probe (`sslcompress.bench.memory`) measures a process that holds
little else.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from ..errors import ConfigError, UnsupportedModelError
from .pinning import placement
from .providers import check_provider, gpu_error

if TYPE_CHECKING:
    import onnx

OPTIMIZATION = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
# Session config entries, beside the typed options set in session_options(), when spinning_stop is on.
SESSION_CONFIG = {"session.force_spinning_stop": "1"}


# ORT's status text: "[ONNXRuntimeError] : 1 : FAIL : <message>", where the message may quote the C++ source
# ("/onnxruntime_src/.../reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(...) <what failed>").
_STATUS_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_SOURCE_PLACE = re.compile(r"\S+\.(?:h|cc|cpp|cu):\d+\s+(?:[\w:~<>,*& ]+?\([^()]*\)\s*)?")


def ort_message(exc: BaseException, limit: int = 240) -> str:
    """An ONNX Runtime exception as one short line: its status prefix and C++ source places dropped."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = _SOURCE_PLACE.sub("", _STATUS_PREFIX.sub("", text)).strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def session_options(threads: int = 1, pin: bool = False, *, optimization: str = "all",
                    spinning_stop: bool = True) -> ort.SessionOptions:
    """The options every session of the package uses; `pin` places the pool's workers as `placement` says."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    if optimization not in OPTIMIZATION:
        raise ConfigError(f"unknown graph optimization {optimization!r}; choose from {', '.join(OPTIMIZATION)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Fatal only: ORT's own log lines would reach stderr before the CLI's one line; its errors come back as
    # exceptions, which the package words itself.
    so.log_severity_level = 4
    if spinning_stop:
        for key, value in SESSION_CONFIG.items():
            so.add_session_config_entry(key, value)
    where = placement(threads) if pin else None
    if where is not None and where[1]:
        # One group per worker (threads - 1 of them; ORT never pins the calling thread), CPU ids 1-based.
        so.add_session_config_entry("session.intra_op_thread_affinities", ";".join(str(c + 1) for c in where[1]))
    return so


def _source(model: Any) -> bytes | str:
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model)
    if isinstance(model, str | Path):
        return str(model)
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto, without importing onnx for the others
        try:
            return model.SerializeToString()
        except Exception as exc:  # noqa: BLE001 - a proto over 2 GiB, or a half-built one
            raise UnsupportedModelError(f"the ONNX model cannot be serialised for ONNX Runtime: {exc}") from exc
    raise ConfigError(f"a model for ONNX Runtime is bytes, a path or an onnx.ModelProto, not {type(model).__name__}")


def create_session(model: bytes | str | Path | onnx.ModelProto, *, provider: str = "cpu", threads: int = 1,
                   optimization: str = "all", pin: bool = False, spinning_stop: bool = True,
                   profile_prefix: str | None = None) -> ort.InferenceSession:
    """A session on `provider` ('cpu' or 'cuda'); CUDA that falls back to the CPU is refused, not used.
    With `profile_prefix`, ORT's profiler times every node of every run into a file named from it
    (`end_profiling()` writes it and returns its path).

    A model ORT cannot load (not ONNX, an op it lacks, a broken graph) is an UnsupportedModelError whose
    message gives ORT's first line.
    """
    name = check_provider(provider)
    source = _source(model)
    options = session_options(threads, pin, optimization=optimization, spinning_stop=spinning_stop)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        with warnings.catch_warnings():  # ORT warns, then falls back to the CPU: that is refused below instead
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(source, sess_options=options, providers=[name])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeError types
        first = ort_message(exc)
        if provider == "cuda" and _loads_on_cpu(source):
            raise gpu_error(f"CUDAExecutionProvider could not start ({first})") from exc
        raise UnsupportedModelError(f"ONNX Runtime cannot load the model: {first}") from exc
    if sess.get_providers()[0] != name:
        raise gpu_error("CUDAExecutionProvider is installed but did not start (no GPU, or CUDA/cuDNN"
                        " libraries missing)")
    return sess


def _loads_on_cpu(source: bytes | str) -> bool:
    """Whether the CPU provider loads the model: tells a CUDA failure from a model ORT refuses anywhere."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any refusal means the model, not the provider, is at fault
        return False
    return True
