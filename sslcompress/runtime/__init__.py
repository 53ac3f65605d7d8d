"""One runtime room: ONNX Runtime sessions, providers, I/O binding and the interleaved timing harness.

Everything in the package that runs a model in ORT (the bench, the surgery's verification and its
lowering decisions) makes its sessions with `create_session` and times with `timing.interleaved`.
"""

from __future__ import annotations

from .providers import PROVIDERS, ProviderUnavailableError, check_provider, probe_cuda
from .sessions import create_session, session_options

__all__ = ["PROVIDERS", "ProviderUnavailableError", "check_provider", "create_session", "probe_cuda",
           "session_options"]
