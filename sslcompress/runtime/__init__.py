"""One runtime room: ONNX Runtime sessions, providers, I/O binding and the interleaved timing harness.

    create_session(model, provider="cpu", threads=1, optimization="all", pin=False, spinning_stop=True)
    runner(session, x, provider)            one synchronous inference per call (I/O binding on CUDA)
    interleaved({name: fn}, repeat=...)     rounds in rotating order; Timing, timings, bootstrap_ratio

Everything in the package that runs a model in ORT (the bench, the surgery's verification and its
lowering decisions) makes its sessions here. Modules: providers, pinning, sessions, binding, timing.
Names load lazily, so `runtime.timing` (numpy alone) does not import onnxruntime.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "PROVIDERS": "providers",
    "ProviderUnavailableError": "providers",
    "check_provider": "providers",
    "probe_cuda": "providers",
    "placement": "pinning",
    "calling_thread_on": "pinning",
    "usable_cpus": "pinning",
    "create_session": "sessions",
    "session_options": "sessions",
    "Io": "binding",
    "io_of": "binding",
    "runner": "binding",
    "Timing": "timing",
    "interleaved": "timing",
    "rounds": "timing",
    "calibrate": "timing",
    "timings": "timing",
    "bootstrap_ratio": "timing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
