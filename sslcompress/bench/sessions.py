"""The bench's ORT sessions: they live in `sslcompress.runtime`; these names stay for older imports."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..runtime.binding import Io, io_of, runner
from ..runtime.pinning import calling_thread_on, placement, usable_cpus
from ..runtime.providers import GPU_INSTALL, PROVIDERS, ProviderUnavailableError, check_provider, probe_cuda
from ..runtime.sessions import SESSION_CONFIG, create_session, session_options

__all__ = ["GPU_INSTALL", "PROVIDERS", "SESSION_CONFIG", "Io", "ProviderUnavailableError", "calling_thread_on",
           "check_provider", "io_of", "make_session", "placement", "probe_cuda", "runner", "session_options",
           "usable_cpus"]


def make_session(model: bytes | str | Path, provider: str, threads: int, pin: bool = False) -> ort.InferenceSession:
    """`runtime.create_session` with the bench's positional order."""
    return create_session(model, provider=provider, threads=threads, pin=pin)
