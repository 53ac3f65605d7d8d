"""Channels that run along another axis than dim 1: transformer features and channels-last tensors.

A Linear reads and writes the last axis of a (batch, tokens, features) tensor, and ConvNeXt permutes
(N, C, H, W) to (N, H, W, C) around its LayerNorm and Linear layers. The analysis in structure.py keeps,
for each value whose channel ids run along an axis other than 1, that axis; every op that reads such a
value comes here. What is followed: a Linear on the last axis (fresh ids for its outputs, counted once per
token), element-wise activations and dropout, sums and products of equal shapes (a gated MLP's
silu(gate(x)) * up(x)), scaling by a number, permute and transpose (they move the axis). LayerNorm and
RMSNorm pin what they normalise: deleting a channel, even a zero one, changes the mean and variance (the
mean square) of the rest. Anything else is a wall, as in structure.py.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

# Element-wise and zero-preserving whatever the axis: no pooling or resampling, which read neighbours.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh,
    nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Dropout, nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, torch.tanh, F.hardtanh,
    F.hardswish, F.dropout, F.relu_, torch.relu_, operator.neg, torch.neg,
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default, aten.dropout.default,
    aten.clone.default, aten.neg.default, aten.hardswish.default,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "neg", "detach"}
_SUM_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
                  aten.add.Tensor, aten.sub.Tensor}
_SUM_METHODS = {"add", "add_", "sub", "sub_"}
_SCALE_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
                    aten.mul.Tensor, aten.div.Tensor}
_SCALE_METHODS = {"mul", "mul_", "div", "div_"}
_PERMUTE_FUNCTIONS = {torch.permute, aten.permute.default}
_TRANSPOSE_FUNCTIONS = {torch.transpose, aten.transpose.int}
# RMSNorm (LLaMA-style blocks) pins its features as LayerNorm does: a deleted channel, even a zero one, changes
# the mean square the others are divided by.
RMS_NORM_MODULES: tuple[type[nn.Module], ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
_LAYER_NORM_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm, *RMS_NORM_MODULES)
_RMS_NORM_FUNCTIONS = {F.rms_norm, aten.rms_norm.default} if hasattr(F, "rms_norm") and hasattr(aten, "rms_norm") \
    else set()
_LAYER_NORM_FUNCTIONS = {F.layer_norm, aten.layer_norm.default} | _RMS_NORM_FUNCTIONS
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, aten.matmul.default, aten.bmm.default}
_SDPA_FUNCTIONS = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}


_PRODUCT_FUNCTIONS = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor}


_SPLIT_FUNCTIONS = {torch.chunk, torch.split, aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}


def is_split(node: fx.Node) -> bool:
    """torch.chunk / torch.split (a tuple of parts)."""
    return (node.op == "call_function" and node.target in _SPLIT_FUNCTIONS) or \
        (node.op == "call_method" and node.target in ("chunk", "split"))


GLU_FUNCTIONS = {F.glu, aten.glu.default}


def glu_dim(node: fx.Node, modules: dict) -> int | None:
    """The dim a GLU (F.glu, nn.GLU: the first half of the features times the sigmoid of the second) halves;
    None for other nodes."""
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.GLU):
        return modules[str(node.target)].dim
    if node.op == "call_function" and node.target in GLU_FUNCTIONS:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    return None


def glu_units(b, x: list[int]) -> list[int]:
    """A GLU's units: unit j is feature j and feature half + j of its input, one unit (zero in the first, the
    product is zero; its group owns both rows)."""
    half = len(x) // 2
    for i, j in zip(x[:half], x[half:]):
        b.union(i, j)
    return list(x[:half])


_SIZE_FUNCTIONS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def reads_a_size(node: fx.Node) -> bool:
    """x.shape, x.size(), x.dim() and torch.export's symbolic sizes: a read of sizes, not of values."""
    return (node.op == "call_function" and (node.target is getattr or node.target in _SIZE_FUNCTIONS)) or \
        (node.op == "call_method" and node.target in ("size", "dim"))


def is_product(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _PRODUCT_FUNCTIONS) or \
        (node.op == "call_method" and node.target in ("mul", "mul_"))


def is_permute(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("permute", "transpose")) or \
        (node.op == "call_function" and node.target in _PERMUTE_FUNCTIONS | _TRANSPOSE_FUNCTIONS)


def is_layer_norm(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _LAYER_NORM_MODULES)
    return node.op == "call_function" and node.target in _LAYER_NORM_FUNCTIONS


def applies(node: fx.Node, modules: dict, axis_of: dict, shape_of) -> bool:
    """Whether this node reads channels off dim 1, or is one of the ops that move or pin them."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return False
    if any(axis_of.get(a, 1) != 1 for a in node.all_input_nodes):
        return True
    if is_permute(node) or is_layer_norm(node, modules):
        return True
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Linear) and node.args:
        src = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        return src is not None and len(src) > 2
    return False


def matmul_macs(node: fx.Node, shape_of, batch: int, modules: dict) -> int:
    """Multiply-accumulates per sample of a product of two tensors (attention's q k^T and p v), of
    scaled-dot-product attention (both its products) and of a whole nn.MultiheadAttention (its projections
    too), as the ONNX counter has them; 0 for other nodes."""
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.MultiheadAttention):
        return _multihead_macs(node, modules[str(node.target)], shape_of, batch)
    out = shape_of(node)
    if node.op == "call_function" and node.target in _SDPA_FUNCTIONS and out is not None and len(node.args) >= 2:
        q, k = (shape_of(a) if isinstance(a, fx.Node) else None for a in node.args[:2])
        if q is None or k is None:
            return 0
        # q k^T: (..., L, E) x (..., E, S); p v: (..., L, S) x (..., S, Ev).
        lead = _prod(q[:-2])
        return (lead * q[-2] * k[-2] * q[-1] + _prod(out) * k[-2]) // max(batch, 1)
    if node.op == "call_function" and node.target in _WEIGHTED_FUNCTIONS and out is not None and len(node.args) >= 2 \
            and isinstance(node.args[1], fx.Node) and shape_of(node.args[1]) is not None:
        # A conv or Linear whose weight the forward computes (a weight-standardised conv: no module holds
        # it): a wall, but the export folds the weight and computes it, so its MACs count as a Conv's or Gemm's.
        return _prod(out) * _prod(shape_of(node.args[1])[1:]) // max(batch, 1)
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), _TRANSPOSED_CONVS) and node.args \
            and isinstance(node.args[0], fx.Node) and shape_of(node.args[0]) is not None:
        # A transposed conv (a decoder's upsampling): a wall, its MACs the export's, every weight per input pixel.
        return modules[str(node.target)].weight.numel() * _prod(shape_of(node.args[0])[2:])
    is_matmul = (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or \
        (node.op == "call_method" and node.target in ("matmul", "bmm"))
    if not is_matmul or out is None or len(node.args) < 2 or not isinstance(node.args[0], fx.Node):
        return 0
    a = shape_of(node.args[0])
    if a is None:
        return 0
    return _prod(out) * a[-1] // max(batch, 1)


_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d)
_WEIGHTED_FUNCTIONS = {F.conv1d, F.conv2d, F.linear, aten.conv1d.default, aten.conv2d.default, aten.linear.default}


def _multihead_macs(node: fx.Node, mha: nn.MultiheadAttention, shape_of, batch: int) -> int:
    """q, k, v and output projections and both products of nn.MultiheadAttention (query, key, value in)."""
    args = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")[len(node.args):]]
    shapes = [shape_of(a) if isinstance(a, fx.Node) else None for a in args]
    if any(sh is None or len(sh) != 3 for sh in shapes):
        return 0
    seq = 1 if mha.batch_first else 0
    (q, k, v), e = shapes, mha.embed_dim
    rows = q[0] * q[1]  # batch x target length, either order
    src = k[0] * k[1]
    projections = rows * q[2] * e + src * k[2] * e + src * v[2] * e + rows * e * e
    products = 2 * rows * k[seq] * e
    return (projections + products) // max(batch, 1)


def _prod(dims) -> int:
    total = 1
    for d in dims:
        total *= int(d)
    return total


def ids(b, node: fx.Node, modules: dict, shape, tensor_ids, axis_of: dict, shape_of, layers: dict, layer_cls, wall,
        batch: int = 1):
    """(channel ids, their axis) of a node that `applies`; `batch` is the analysed input's."""
    args = node.args
    src = args[0] if args and isinstance(args[0], fx.Node) else None
    x = tensor_ids(src)
    axis = axis_of.get(src, 1) if src is not None else 1
    src_shape = shape_of(src) if src is not None else None
    rank = len(shape) if shape is not None else 0

    def blocked(why: str, defining: bool = False):
        # A wall's output keeps the axis its same-rank inputs had channels along, so what reads it sees
        # pinned ids where it looks for them (a Linear after a LayerNorm reads pinned features, not tokens).
        along = [axis_of.get(a, 1) for a in node.all_input_nodes
                 if tensor_ids(a) is not None and len(shape_of(a) or ()) == rank]
        keep = next((a for a in along if a != 1), 1) if rank > 1 else 1
        return wall(node, why, keep, defining), keep

    dim = glu_dim(node, modules)
    if dim is not None:
        if x is not None and src_shape is not None and isinstance(dim, int) and dim % len(src_shape) == axis \
                and len(x) % 2 == 0 and shape is not None and shape[axis] == len(x) // 2:
            return glu_units(b, x), axis
        return blocked(f"GLU {node.name} along another axis than the channels'")
    if node.op == "call_module":
        mod = modules[str(node.target)]
        name = str(node.target)
        if isinstance(mod, nn.Linear):
            return _linear(b, node, name, mod, x, axis, shape, src_shape, layers, layer_cls, wall, batch)
        if isinstance(mod, _LAYER_NORM_MODULES):
            # The reason a residual stream keeps its width, whatever else pinned it first (a position
            # embedding added): deleting a channel changes what the norm computes for the others.
            return blocked(_layer_norm_reason(name, isinstance(mod, RMS_NORM_MODULES)), defining=True)
        if isinstance(mod, _ELEMENTWISE_MODULES) and x is not None and shape == src_shape:
            return list(x), axis
        return blocked(f"{type(mod).__name__} {name} on channels along axis {axis}")
    target, is_fn = node.target, node.op == "call_function"
    if reads_a_size(node):
        return None, 1  # x.shape, x.size(): sizes, no channels (PVT v2's Mix-FFN reads its tokens' shape)
    if is_fn and target in _LAYER_NORM_FUNCTIONS:
        return blocked(_layer_norm_reason(node.name, target in _RMS_NORM_FUNCTIONS), defining=True)
    if x is not None and shape == src_shape and (
            (is_fn and target in _ELEMENTWISE_FUNCTIONS) or (not is_fn and target in _ELEMENTWISE_METHODS)):
        return list(x), axis
    if (is_fn and target in _SUM_FUNCTIONS) or (not is_fn and target in _SUM_METHODS):
        other = args[1] if len(args) > 1 else None
        y = tensor_ids(other)
        if x is not None and y is not None and len(x) == len(y) and axis_of.get(other, 1) == axis \
                and shape == src_shape == shape_of(other):
            for i, j in zip(x, y):
                b.union(i, j)
            return list(x), axis
        return blocked(f"{node.name}: a sum with a constant or broadcast operand (0 + c != 0)")
    if (is_fn and target in _SCALE_FUNCTIONS) or (not is_fn and target in _SCALE_METHODS):
        other = args[1] if len(args) > 1 else node.kwargs.get("other")
        if x is not None and isinstance(other, (int, float)) and shape == src_shape:
            return list(x), axis
        y = tensor_ids(other) if isinstance(other, fx.Node) else None
        if is_product(node) and x is not None and y is not None and len(x) == len(y) \
                and axis_of.get(other, 1) == axis and shape == src_shape == shape_of(other):
            # A gated MLP's silu(gate(x)) * up(x) (SwiGLU, GeGLU): hidden unit j of the product is unit j of each
            # factor, one unit, whose rows in both Linears go together (zero in either, the product is zero).
            for i, j in zip(x, y):
                b.union(i, j)
            return list(x), axis
        return blocked(f"{node.name}: a product of two tensors")
    if is_permute(node) and x is not None and src_shape is not None:
        moved = _moved_axis(node, axis, len(src_shape))
        if moved is not None:
            return list(x), moved
    return blocked(f"unsupported op {node.op} {getattr(target, '__name__', target)} on channels along axis {axis}")


def _layer_norm_reason(name: str, rms: bool = False) -> str:
    if rms:
        return (f"RMS norm {name} normalises over these channels (deleting a channel, even a zero one, "
                "changes its mean square)")
    return (f"layer norm {name} normalises over these channels (deleting a channel, even a zero one, "
            "changes its mean and variance)")


def _moved_axis(node: fx.Node, axis: int, rank: int) -> int | None:
    """Where permute / transpose puts the axis the channels run along."""
    dims = list(node.args[1:])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    if not dims:
        dims = [node.kwargs.get("dims")] if "dims" in node.kwargs else [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = list(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return None
    dims = [d % rank for d in dims]
    is_transpose = node.target == "transpose" or node.target in _TRANSPOSE_FUNCTIONS
    if is_transpose:
        if len(dims) != 2:
            return None
        i, j = dims
        return j if axis == i else i if axis == j else axis
    if sorted(dims) != list(range(rank)):
        return None
    return dims.index(axis)


def _linear(b, node, name, mod, x, axis, shape, src_shape, layers, layer_cls, wall, batch: int = 1):
    """A Linear on the last axis: fresh output ids along it, its MACs counted once per row (token)."""
    if shape is None or src_shape is None:
        return wall(node, f"linear {name} on a tensor of unknown shape", 1), 1
    last = len(src_shape) - 1
    rows = _rows(shape, batch)
    if name in layers:
        return _called_again(b, node, layers[name], x, axis == last, shape, wall, batch)
    if x is not None and axis == last and len(x) == mod.in_features:
        in_ids = list(x)
    else:
        # The features it reads were not followed (a wall before it, or channels along another axis): those
        # channels stay, and so do its input features.
        why = f"linear {name} reads features that are not followed along the last axis"
        if x is not None:
            b.pin(x, why)
        in_ids = b.fresh(mod.in_features, pinned=why)
    out = b.fresh(mod.out_features)
    layers[name] = layer_cls(name, "linear", tuple(mod.weight.shape), mod.bias is not None, 1, (rows, 1),
                             in_ids, out)
    return out, len(shape) - 1


def _rows(shape: tuple[int, ...], batch: int) -> int:
    """Rows per sample of a Linear's output: every axis but the features', over the input's batch. Windowed
    attention (Swin) folds its windows into the batch axis, (batch x windows, tokens, features): those rows
    are a sample's too."""
    return max(1, _prod(shape[:-1]) // max(batch, 1))


def _called_again(b, node, first, x, on_last_axis: bool, shape: tuple[int, ...], wall, batch: int = 1):
    """A Linear module called once more (shared weights): its MACs count at this call too. On features that
    line up with the first call's, its inputs are one channel with the first call's and its outputs the same
    ids; otherwise both calls' features stay, since a row or column cut for one call is cut for the other."""
    first.more_hw.append((_rows(shape, batch), 1))
    last = len(shape) - 1
    if first.kind == "linear" and x is not None and on_last_axis and len(x) == len(first.in_ids):
        for i, j in zip(first.in_ids, x):
            b.union(i, j)
        return list(first.out_ids), last
    why = f"{first.kind} {first.name} called again on features that are not its first call's"
    b.pin(first.in_ids, why)
    b.pin(first.out_ids, why)
    return wall(node, why, last), last
