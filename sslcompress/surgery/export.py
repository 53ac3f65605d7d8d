"""Export a torch model to a simplified ONNX graph, and read and write ONNX files safely.

The surgery works on the simplified graph: onnxsim folds BatchNorm into the preceding Conv and
removes the Identity and Constant clutter of the TorchScript exporter, so channel analysis sees
one weight tensor per filter.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath, PureWindowsPath

import onnx
import onnxsim
import torch
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper
from torch import nn

from ..errors import ConfigError, UnsupportedModelError, VerificationError, first_line
from ..finetune.checkpoint import load_checkpoint
from ..io import atomic_write_bytes
from .rms_norm_export import rms_norm_exportable
from .softmax_over_one import fold_softmax_over_one

INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"


@dataclass(frozen=True)
class ExportResult:
    """An exported model and what the export did to it.

    ``bn_remaining`` counts BatchNormalization nodes left after simplification; it is 0 for a
    plain Conv/BN net, and nonzero where a BN does not follow a Conv (it then stays a node).
    """

    model: onnx.ModelProto
    opset: int
    dynamic_batch: bool
    nodes_before_simplify: int
    nodes_after: int
    bn_remaining: int

    @property
    def bn_folded(self) -> bool:
        """True when no BatchNormalization node is left in the graph."""
        return self.bn_remaining == 0


def _count_op(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for node in model.graph.node if node.op_type == op_type)


def _batch_is_dynamic(model: onnx.ModelProto) -> bool:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_finite(model: nn.Module) -> None:
    """Refuse a model with a NaN or infinite weight, or a NaN buffer: it computes nothing worth exporting. An
    infinite buffer is a constant the model means (a causal mask of -inf added to attention scores), except in
    a norm's running statistics, which training writes."""
    stats = {f"{name}.{leaf}" for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             for leaf in ("running_mean", "running_var")}
    for kind, named in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if not t.is_floating_point():
                continue
            bad_values = torch.isnan(t) if kind == "buffer" and name not in stats else ~torch.isfinite(t)
            if bool(bad_values.any()):
                what = "NaN" if kind == "buffer" and name not in stats else "NaN or infinite"
                raise UnsupportedModelError(
                    f"The model's {kind} {name!r} holds {int(bad_values.sum())} {what} value(s) of {t.numel()}; "
                    "a model that is not finite cannot be exported (retrain it, e.g. with a lower learning rate).")


# The opsets torch's TorchScript exporter writes (it warns and fails past its newest).
EXPORT_MIN_OPSET = 11
try:
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as EXPORT_MAX_OPSET
except ImportError:  # where torch does not name it: the newest it wrote when this was written
    EXPORT_MAX_OPSET = 20


@contextlib.contextmanager
def _exporter_output_silenced():
    """torch's exporter writes its IR graph to file descriptor 1 when it fails (from C++, past sys.stdout), and
    warnings to 2: neither reaches the user, whose error is the one line made from the exception."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _torch_export(model: nn.Module, input_shape: tuple[int, ...], opset: int, dynamic_batch: bool) -> bytes:
    """TorchScript export into memory; the model is put in eval mode and its mode restored after.

    nn.MultiheadAttention in eval mode takes its fast path, one aten::_native_multi_head_attention that no ONNX
    opset has; with the fast path off while exporting, it is written out as MatMuls the surgery can cut per
    head. The setting is global, so its previous value is put back after. aten::rms_norm, which no opset the
    exporter writes has, is written out as the ops it computes (rms_norm_export)."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(*input_shape, generator=generator).to(_device_of(model))
    axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    buf = io.BytesIO()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad(), _exporter_output_silenced(), rms_norm_exportable(opset):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), buf, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                do_constant_folding=True,
            )
    except Exception as exc:
        raise UnsupportedModelError(
            f"torch.onnx.export failed for {type(model).__name__} at opset {opset}: {first_line(exc)}"
        ) from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return buf.getvalue()


def _zero_initializers_apart(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each reader of an all-zero initializer gets its own copy. torch's exporter merges initializers of equal
    values, and a sparse model's zero weights are equal: the k and v projections of a zeroed attention branch
    then read one weight, onnxsim merges the two MatMuls as a common subexpression, and the export computes
    fewer MACs than the model it was exported from (whose count steered the budget). Apart, they stay two
    layers, and the surgery deletes both."""
    graph = model.graph
    zero = {init.name: init for init in graph.initializer
            if init.data_location != onnx.TensorProto.EXTERNAL
            and not numpy_helper.to_array(init).any()}
    seen: dict[str, int] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in zero:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(zero[name])
                copy.name = f"{name}__reader{seen[name]}"
                graph.initializer.append(copy)
                node.input[k] = copy.name
    return model


def _simplify(model: onnx.ModelProto, dynamic_batch: bool) -> onnx.ModelProto:
    """onnxsim with its own numeric check off (it prints); callers verify in ORT themselves. Its constant folding
    writes a line to file descriptor 2 for each node it cannot fold (a causal mask's Where), from C++: noise to
    the user, silenced with the exporter's."""
    try:
        with _exporter_output_silenced():
            simplified, ok = onnxsim.simplify(model)
    except Exception as exc:
        raise UnsupportedModelError(f"onnxsim could not simplify the exported model: {exc}") from exc
    if not ok:
        raise VerificationError("onnxsim produced a simplified model that it could not validate.")
    if dynamic_batch and not _batch_is_dynamic(simplified):
        raise UnsupportedModelError("onnxsim fixed the batch dimension that the export asked to keep dynamic.")
    return simplified


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    simplify: bool = True,
) -> ExportResult:
    """Export ``model`` for inputs of ``input_shape`` (batch first) as one ONNX graph.

    The graph has one input ``"input"`` and one output ``"output"``; with ``dynamic_batch`` their
    dim 0 is the symbol ``"batch"``, otherwise it is ``input_shape[0]``.
    """
    if not input_shape or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise UnsupportedModelError(f"An input shape must be positive integers, got {input_shape!r}.")
    if isinstance(opset, bool) or not isinstance(opset, int) or not EXPORT_MIN_OPSET <= opset <= EXPORT_MAX_OPSET:
        raise ConfigError(f"--opset must be from {EXPORT_MIN_OPSET} to {EXPORT_MAX_OPSET} (what torch's exporter "
                          f"writes), got {opset!r}")
    _check_finite(model)
    raw = onnx.load_from_string(_torch_export(model, tuple(input_shape), opset, dynamic_batch))
    before = len(raw.graph.node)
    # A softmax over one element folded first: onnxsim could pack what only it reads with live layers.
    out = _simplify(_zero_initializers_apart(fold_softmax_over_one(raw)), dynamic_batch) if simplify else raw
    return ExportResult(
        model=out,
        opset=opset,
        dynamic_batch=dynamic_batch,
        nodes_before_simplify=before,
        nodes_after=len(out.graph.node),
        bn_remaining=_count_op(out, "BatchNormalization"),
    )


def export_checkpoint(
    path: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    simplify: bool = True,
) -> ExportResult:
    """Export the model a stage-1 checkpoint holds, at the input shape it was trained for."""
    ckpt = load_checkpoint(path)
    return export_onnx(
        ckpt.build(), ckpt.model.input_shape, opset=opset, dynamic_batch=dynamic_batch, simplify=simplify
    )


def save_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    """Write atomically, so a reader never sees half a model under the real name."""
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GB
        raise UnsupportedModelError(f"The model is too large to write as a single ONNX file ({exc}).") from exc
    atomic_write_bytes(data, path)


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; anything unreadable raises UnsupportedModelError."""
    p = Path(path)
    if not p.is_file():
        raise UnsupportedModelError(f"ONNX file {p} not found.")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise UnsupportedModelError(f"{p} is not a readable ONNX model: not ONNX, or truncated ({exc}).") from exc
    external = _checked_external_data(model, p)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except (RuntimeError, ValueError, OSError) as exc:
            raise UnsupportedModelError(f"{p}: its external data cannot be read ({exc}).") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise UnsupportedModelError(f"{p} is not a readable ONNX model: it holds no graph.")
    newest = onnx.defs.onnx_opset_version()
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if default and default[0] > newest:
        raise UnsupportedModelError(
            f"{p} uses ONNX opset {default[0]}, newer than the {newest} that onnx {onnx.__version__} reads."
        )
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, RuntimeError) as exc:
        first = first_line(exc)
        raise UnsupportedModelError(
            f"{p} is an ONNX model that onnx {onnx.__version__} rejects (IR {model.ir_version}, "
            f"opsets {_opsets(model)}): {first}"
        ) from exc
    return model


_PACKED_4BIT = {
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)
}


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's declared dims and type need as raw data; None for a type with no fixed size."""
    count = math.prod(int(d) for d in tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return count * itemsize


def _checked_external_data(model: onnx.ModelProto, path: Path) -> int:
    """Check every external-data entry before anything is read, and return how many there are.

    A location must be a relative path inside the model's folder (no ``..``, not absolute, no symlink
    that leads out), name an existing file, and offset plus length must lie within that file; an
    entry without a length gets the length its dims need, so no read runs past the tensor.
    """
    folder = path.parent.resolve()
    count = 0
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        count += 1
        entries = {e.key: e.value for e in tensor.external_data}
        where = f"{path}: tensor {tensor.name!r}"
        location = entries.get("location", "")
        rel = PurePath(location)
        if not location or rel.is_absolute() or PureWindowsPath(location).is_absolute() or ".." in rel.parts \
                or ".." in PureWindowsPath(location).parts:
            raise UnsupportedModelError(
                f"{where} keeps its data at {location!r}; external data must be a relative path inside the "
                "model's folder, without '..'.")
        target = folder / rel
        resolved = target.resolve()
        if not resolved.is_relative_to(folder):
            raise UnsupportedModelError(
                f"{where} keeps its data at {location!r}, which leads to {resolved} outside the model's folder "
                f"{folder}; refusing to follow it.")
        if not resolved.is_file():
            raise UnsupportedModelError(f"{where} keeps its data in {target}, which is missing or not a file.")
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError as exc:
            raise UnsupportedModelError(f"{where} has an external-data offset or length that is not a number.") from exc
        size = resolved.stat().st_size
        needed = _tensor_bytes(tensor)
        if length is None:
            if needed is None:
                raise UnsupportedModelError(f"{where} has external data of a variable-size type and no length.")
            length = needed
            tensor.external_data.add(key="length", value=str(length))
        if offset < 0 or length < 0 or offset + length > size:
            raise UnsupportedModelError(
                f"{where} claims bytes {offset}..{offset + length} of {target}, which holds only {size} bytes.")
        if needed is not None and length != needed:
            raise UnsupportedModelError(
                f"{where} has {length} bytes of external data but its dims {list(tensor.dims)} need {needed}.")
    return count


def _opsets(model: onnx.ModelProto) -> str:
    return ", ".join(f"{o.domain or 'ai.onnx'}={o.version}" for o in model.opset_import) or "none"


def check_export_counts(dense: int, after: int, totals: dict, aligned: bool = False, removed: int = 0) -> None:
    """VerificationError unless the MACs a checkpoint's count gives (`dense`, `after`) are the ONNX model's
    (`totals` of the surgery report): the same dense count, and no more after the cut (unless --align kept
    zero channels on purpose). Fewer after the cut is what folding constant channels adds.

    `removed`: the MACs of the layers the checkpoint zeroes whole (ModelCount.macs_emptied). The uncut export
    may compute up to that much less than the dense count: the exporter shares one initializer between equal
    weights, all-zero ones included, and the simplifier then computes two layers that read the same input with
    them once (the gate and up projections of an emptied SwiGLU MLP)."""
    if not dense - removed <= totals["macs"] <= dense:
        raise VerificationError(
            f"the exported model computes {totals['macs']} MACs, the checkpoint's count says {dense}: the "
            "training counted another model than the one exported (an op its count misses), so its budget "
            "steered the wrong number")
    if totals["macs_after"] > after and not aligned:
        raise VerificationError(
            f"the compact model keeps {totals['macs_after']} MACs, the checkpoint predicted {after}: the "
            "surgery kept channels the training counted as removed (see the report's blocked_by)")
