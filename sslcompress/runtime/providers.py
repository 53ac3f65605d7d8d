"""Execution providers: the names ORT knows them by, and one clear error where one cannot run."""

from __future__ import annotations

import onnxruntime as ort

from ..errors import ConfigError, SSLCompressError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# The CPU and GPU wheels both install the module `onnxruntime` and cannot live side by side (onnxruntime
# issue 26996), and uninstalling one deletes files of the other; the base dependency brings the CPU wheel back.
GPU_INSTALL = ("pip install sslcompress[gpu] && pip uninstall -y onnxruntime onnxruntime-gpu"
               " && pip install onnxruntime-gpu")


class ProviderUnavailableError(SSLCompressError):
    """An execution provider was asked for that this onnxruntime build or machine cannot run."""


def gpu_error(why: str) -> ProviderUnavailableError:
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
            raise gpu_error(f"this onnxruntime {ort.__version__} offers only {', '.join(available)}")
        raise ProviderUnavailableError(f"this onnxruntime {ort.__version__} lacks {name}")
    return name


def probe_cuda() -> None:
    """Start a CUDA session on a one-node model, so a missing GPU is one error before any work."""
    check_provider("cuda")
    from onnx import TensorProto, helper

    from .sessions import create_session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    create_session(model.SerializeToString(), provider="cuda")
