"""A zeroed torch model exported, cut, and held to what the training counted: verification passed, the MACs
after the cut those the count predicted, and the uncut model's outputs at an input the verification did not
see."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from sslcompress.finetune.counting import count
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx


def exported(model: torch.nn.Module, shape: tuple[int, ...], exporter: str = "legacy", opset: int = 17
             ) -> onnx.ModelProto:
    """Our export (the legacy exporter, simplified) at `opset`, or torch's dynamo exporter at its default."""
    if exporter == "legacy":
        return export_onnx(model, shape, opset=opset).model
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["output"],
                             verbose=False).model_proto


def assert_cut_as_counted(model: torch.nn.Module, shape: tuple[int, ...], proto: onnx.ModelProto, counted=None):
    """The cut of `proto` (the export of `model`), held to `counted` (`model`'s count, counted now where not
    given); returns both."""
    counted = counted or count(model, shape)
    result = compress(proto)
    assert result.verification.passed
    assert result.report["totals"]["macs_after"] == counted.macs_after < counted.macs
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    outs = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for p in (proto, result.model)]
    assert np.abs(outs[0] - outs[1]).max() <= 1e-5 * np.abs(outs[0]).max()
    return result, counted


def assert_thinned_exactly(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """`thin` slices the zero groups out of the torch model: the same outputs, and a dense count equal to what
    the zeroed model counted after."""
    from sslcompress.finetune.thin import thin

    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    counted = count(model, shape)
    result = thin(model, shape)
    assert result.applied, result.reason
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    after = count(model, shape)
    assert after.macs == after.macs_after == counted.macs_after < counted.macs


def assert_groups_cut_as_counted(model: torch.nn.Module, shape: tuple[int, ...], kind: str, names: list[str],
                                 zeroed: list[int], exporter: str = "legacy") -> None:
    """`model`'s groups of `kind` are `names`; those at the positions `zeroed`, set to zero, are cut from its
    export as the training counts them."""
    from zeroing import zero_groups

    from sslcompress.finetune.groups import build_groups

    groups = build_groups(model, shape, (kind,))
    assert [g.name for g in groups] == names
    zero_groups(model, [groups[i] for i in zeroed])
    assert_cut_as_counted(model, shape, exported(model, shape, exporter))
