"""The channel block of ONNX Runtime's blocked conv layout (NCHWc) on this CPU, asked of ORT itself.

MLAS runs a conv in NCHWc blocks of 16 channels where the CPU has AVX-512F, of 8 with AVX2, and not at all
elsewhere; the CPU model's name does not tell (two "AMD EPYC" hosts of this project differ). ORT's graph
optimiser shows it: a conv it rewrote to the blocked layout lands in the `com.microsoft.nchwc` domain. For a
plain conv (group 1) ORT takes an input width w in blocks where w % block == 0 or w < block (the input is then
read in place), so a probe of w = b + 1 input channels is blocked exactly while b + 1 < block: the first b
of 2, 4, ..., 64 whose probe is not blocked is the block.

Above one block, onnxruntime 1.32 also takes an input width that is a multiple of 4 (its ReorderInput pads it
with zero channels to whole blocks, and the conv computes the padded width: 20, 24 and 28 inputs cost what 32
do), where older versions took whole blocks only. `nchwc_input_alignment` asks ORT which.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

PROBES = (2, 4, 8, 16, 32, 64)
NCHWC_DOMAIN = "com.microsoft.nchwc"


def _conv(in_channels: int, out_channels: int = 16):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((out_channels, in_channels, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 8, 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _blocked(in_channels: int) -> bool:
    """Whether ORT's CPU provider rewrites a 3x3 conv of `in_channels` inputs to its blocked layout."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # ORT warns that an NCHWc graph is tied to this CPU: that is the point here
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(_conv(in_channels).SerializeToString(), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
    return any(n.op_type == "Conv" and n.domain == NCHWC_DOMAIN for n in optimized.graph.node)


@functools.cache
def nchwc_block(provider: str = "cpu") -> int:
    """Channels per block of ORT's NCHWc convs for `provider`: 8 or 16 on x86 CPUs, 1 where there is no
    blocked layout (another CPU, or the CUDA provider, whose kernels do not block channels this way)."""
    if provider != "cpu" or not _blocked(4 * PROBES[-1]):
        return 1
    return next((b for b in PROBES if not _blocked(b + 1)), 1)


@functools.cache
def nchwc_input_alignment(provider: str = "cpu") -> int:
    """The step of the input widths above one block that ORT's blocked convs take (padding them to whole blocks):
    4 in onnxruntime 1.32, the block itself where ORT takes whole blocks only; 1 without blocks."""
    block = nchwc_block(provider)
    if block <= 1:
        return 1
    return next((a for a in (1, 2, 4, 8) if a < block and _blocked(block + a)), block)
