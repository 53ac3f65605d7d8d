"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


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

    def broken(model, analysis=None):
        res = real(model, analysis)
        bias = model.graph.initializers["fc2.bias"]
        arr = bias.const_value.numpy().copy()
        arr[0] += 10.0
        bias.const_value = ir.tensor(arr, name="fc2.bias")
        return res

    monkeypatch.setattr(surgery_passes, "prune_dead_channels", broken)
