"""Shared fixtures.

Every test runs torch (and BLAS/OpenMP in subprocesses) and the surgery's verification sessions
with one intra-op thread: the tensors are small, and on a busy 2-core machine more threads only
contend (up to 10x slower).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before torch is imported; inherited by the CLI subprocesses

import pytest  # noqa: E402
import torch  # noqa: E402

from sslcompress.surgery import verify as _verify  # noqa: E402

torch.set_num_threads(1)
_verify.VERIFY_THREADS = 1  # read at each session; by default up to 4 (the machine's cores)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """A run with --threads N sets torch's process-wide count; the next test starts at one again."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensor ops: intra-op threads only contend on a busy 2-core machine (up to 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def broken_surgery(monkeypatch):
    """A deliberately wrong surgery: after pruning, the compact LeNet's fc2 bias is moved by 10, so
    verification must fail (first at node '/fc2/Gemm')."""
    import onnx_ir as ir

    from sslcompress.surgery import passes as surgery_passes

    real = surgery_passes.prune_dead_channels

    def broken(model, analysis=None, align=None):
        res = real(model, analysis, align)
        bias = model.graph.initializers["fc2.bias"]
        arr = bias.const_value.numpy().copy()
        arr[0] += 10.0
        bias.const_value = ir.tensor(arr, name="fc2.bias")
        return res

    monkeypatch.setattr(surgery_passes, "prune_dead_channels", broken)


@pytest.fixture()
def sparse_ckpt(tmp_path):
    """A LeNet-5 checkpoint whose conv1 filters 6.. are exactly zero: something for the surgery to cut."""
    from sslcompress.finetune.checkpoint import Checkpoint, save_checkpoint
    from sslcompress.models import ModelSpec, build_model

    torch.manual_seed(0)
    spec = ModelSpec("lenet5", 10, 1, (28, 28))
    m = build_model(spec)
    with torch.no_grad():
        m.conv1.weight[6:] = 0
        m.conv1.bias[6:] = 0
    path = tmp_path / "sparse.pt"
    save_checkpoint(path, Checkpoint("sparse", spec, m.state_dict()))
    return path


@pytest.fixture()
def fail_writes(monkeypatch):
    """`fail_writes(name)`: from then on, writing the temporary file of an output named `name` fails as a
    full disk does (ENOSPC), so tests see what the atomic writers leave behind."""
    import sslcompress.io as sio

    real = sio.os.fdopen

    def arm(name: str) -> None:
        def fdopen(fd, mode="r", *a, **k):
            f = real(fd, mode, *a, **k)
            if name in sio.os.readlink(f"/proc/self/fd/{fd}"):
                f.close()
                raise OSError(28, "No space left on device")
            return f

        monkeypatch.setattr(sio.os, "fdopen", fdopen)

    return arm
