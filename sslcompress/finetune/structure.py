"""Channel structure of a PyTorch model, read from its torch.fx graph.

Every channel (or feature) that flows between layers gets an integer id. Ops that pass a
channel through unchanged and keep zero at zero (ReLU, pooling, BatchNorm, ...) keep its id;
ops that sum tensors (residual Add) merge the ids of the summands, since a channel can only be
deleted when it is zero in every summand. Conv and Linear layers produce fresh ids. An op we do
not understand is a wall: the ids it reads are pinned and nothing behind it is deleted, which
keeps every group we later call removable honest.

Channels run along dim 1 of a conv's tensors; a Linear on (batch, tokens, features) and channels-last
tensors carry them along another axis, which last_axis.py follows. Attention heads (written out with separate
or packed q, k, v Linears, or an nn.MultiheadAttention) are found after the walk (heads.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..channel_ids import ChannelIds
from ..errors import UnsupportedModelError, first_line
from . import channel_stats, last_axis
from . import heads as attention_heads

# Modules whose output channel c depends only on input channel c and maps 0 to 0.
_ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,  # each channel resampled alone; 0 stays 0
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
_ZERO_PRESERVING_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.leaky_relu,
    torch.nn.functional.elu, torch.nn.functional.selu, torch.nn.functional.gelu, torch.nn.functional.silu,
    torch.nn.functional.mish, torch.tanh, torch.nn.functional.hardtanh, torch.nn.functional.hardswish,
    torch.nn.functional.dropout, torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.max_pool1d, torch.nn.functional.avg_pool1d, torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_max_pool1d, torch.nn.functional.relu_, torch.relu_, operator.neg, torch.neg,
    torch.nn.functional.interpolate, torch.nn.functional.upsample,
}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "neg", "detach"}
_SUM_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_SUM_METHODS = {"add", "add_", "sub", "sub_"}
_SCALE_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_SCALE_METHODS = {"mul", "mul_", "div", "div_"}
_PRODUCT_FUNCTIONS = {operator.mul, operator.imul, torch.mul}  # a number may come first
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
_MEAN_METHODS = {"mean", "amax", "sum"}

# torch.export's graph (read where fx cannot trace) names ops by their aten overloads; those below take their
# tensor and channel arguments where the torch functions above do, so the same handlers read them.
aten = torch.ops.aten
_ZERO_PRESERVING_FUNCTIONS |= {
    aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default, aten.leaky_relu.default,
    aten.elu.default, aten.selu.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
    aten.mish.default, aten.tanh.default, aten.hardswish.default, aten.neg.default, aten.dropout.default,
    aten.clone.default, aten.contiguous.default, aten.max_pool2d.default, aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default,
    aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec,
}
_SUM_FUNCTIONS |= {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor}
_SCALE_FUNCTIONS |= {aten.mul.Tensor, aten.div.Tensor}
_PRODUCT_FUNCTIONS |= {aten.mul.Tensor}
_FLATTEN_FUNCTIONS |= {aten.flatten.using_ints, aten.view.default, aten.reshape.default}
_CAT_FUNCTIONS |= {aten.cat.default}
_MEAN_FUNCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
_ZERO_PRESERVING_FUNCTIONS |= {aten.dropout_.default}
_PAD_FUNCTIONS = {torch.nn.functional.pad, aten.pad.default, aten.constant_pad_nd.default}


def _pads_space_with_zeros(node: fx.Node, rank: int | None) -> bool:
    """F.pad of the spatial axes alone (TF-style 'same' padding, Hugging Face's MobileNet), by zeros or by
    reflecting or repeating the edge: a zero channel stays zero, each channel on its own."""
    if node.op != "call_function" or node.target not in _PAD_FUNCTIONS or rank is None or len(node.args) < 2:
        return False
    pad = node.args[1]
    if node.target is aten.constant_pad_nd.default:
        mode, value = "constant", node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    else:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    return isinstance(pad, (list, tuple)) and all(isinstance(p, int) for p in pad) and len(pad) % 2 == 0 \
        and len(pad) // 2 <= rank - 2 and (mode != "constant" or value in (None, 0, 0.0))


# The convs the analysis reads: a Conv1d is a Conv2d of one row (its geometry is kept as 1 x K pairs), but its
# weight keeps its own three axes, (out, in, K).
CONVS = (nn.Conv1d, nn.Conv2d)


@dataclass
class Layer:
    """A Conv1d, Conv2d or Linear layer and the channel ids it reads and writes."""

    name: str
    kind: str  # "conv" | "linear"
    weight_shape: tuple[int, ...]
    has_bias: bool
    groups: int
    out_hw: tuple[int, int]  # output spatial size; (1, L) for a Conv1d, (1, 1) for Linear
    in_ids: list[int]  # per input channel (conv) or per input feature (linear)
    out_ids: list[int]  # per output channel / feature
    # Output sizes of further calls of the same module (weights shared, so the same channel ids): each call
    # costs its own MACs.
    more_hw: list[tuple[int, int]] = field(default_factory=list)
    # Conv geometry of the first call (what fixes a layer's speed beside its widths, for the latency table):
    # stride, padding (top, left), dilation and input spatial size; their defaults fit a Linear.
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    in_hw: tuple[int, int] = (1, 1)

    @property
    def calls(self) -> int:
        return 1 + len(self.more_hw)

    @property
    def kernel(self) -> tuple[int, int]:
        """(rows, columns) of the kernel: (1, K) for a Conv1d, (1, 1) for a Linear."""
        w = self.weight_shape
        return (int(w[2]), int(w[3])) if len(w) == 4 else (1, int(w[2])) if len(w) == 3 else (1, 1)

    @property
    def one_dimensional(self) -> bool:
        return self.kind == "conv" and len(self.weight_shape) == 3

    @property
    def carries_channels(self) -> bool:
        """A depthwise conv (one input channel per group, any number of outputs per group): each output is
        its input channel carried on, so they share one id."""
        return self.kind == "conv" and self.groups > 1 and self.weight_shape[1] == 1

    @property
    def grouped(self) -> bool:
        """A grouped conv with several input channels per group (ResNeXt, AlexNet): see finetune/grouped.py."""
        return self.kind == "conv" and self.groups > 1 and self.weight_shape[1] > 1

    @property
    def macs(self) -> int:
        """Dense multiply-accumulates of one sample, over every call of the layer."""
        w = self.weight_shape
        per_out = 1
        for d in w[1:]:
            per_out *= d
        return w[0] * per_out * self.macs_per_weight

    @property
    def macs_per_weight(self) -> int:
        """Multiply-accumulates one weight costs per sample: one per output position of every call."""
        return sum(h * w for h, w in [self.out_hw, *self.more_hw])


@dataclass
class Norm:
    """A BatchNorm whose affine parameters scale channels with these ids."""

    name: str
    ids: list[int]
    affine: bool


@dataclass
class Branch:
    """One side of a residual Add: deleting all of it leaves the other side (the shortcut)."""

    add_node: str
    modules: list[str]  # parametric modules inside the branch, in graph order
    shortcut: list[str] = field(default_factory=list)  # parametric modules only the other side runs (a projection)
    product_macs: int = 0  # MACs of its ops that are no layers (an attention's products), which go with it


@dataclass
class ChannelSplit:
    """A torch.chunk or torch.split along channels: the channel ids of each part, in order.

    The export rewrites the split sizes, but the forward writes them down: torch.split's sizes are fixed,
    and torch.chunk's parts are equal, so a thinned model may only lose the same count from every part."""

    name: str
    parts: list[list[int]]
    equal_parts: bool  # torch.chunk: thinning may cut it, as many from each part


@dataclass
class ModelStructure:
    """What the group builders and the MAC counter need to know about a model."""

    layers: dict[str, Layer]
    norms: dict[str, Norm]
    branches: list[Branch]
    parent: list[int]  # union-find over channel ids
    pinned: dict[int, str] = field(default_factory=dict)  # root id -> why it cannot be deleted
    input_ids: set[int] = field(default_factory=set)
    splits: list[ChannelSplit] = field(default_factory=list)
    # Multiply-accumulates per sample of products of two tensors (attention's q k^T and p v): no weights of
    # their own, so nothing thins them, but the MACs an export keeps include them.
    matmul_macs: int = 0
    heads: list[attention_heads.Heads] = field(default_factory=list)  # attentions whose heads can go
    # Parameters with one entry per channel read outside a layer (GRN's scale and shift), and means over the
    # channels, which a channel leaves only once it is zero (see channel_stats.py).
    channel_params: list[channel_stats.ChannelParam] = field(default_factory=list)
    means: list[channel_stats.MeanRead] = field(default_factory=list)

    def mean_reads(self) -> dict[int, str]:
        """Root id -> the mean over the channels that reads it (the module whose forward takes it, or the node)."""
        return {self.root(i): m.module or m.node for m in self.means for i in m.ids}

    root = ChannelIds.root  # the same union-find the analysis built

    def pin_reason(self, i: int) -> str | None:
        return self.pinned.get(self.root(i))

    def roots(self) -> list[int]:
        return sorted({self.root(i) for i in range(len(self.parent))})

    @property
    def dense_macs(self) -> int:
        return sum(layer.macs for layer in self.layers.values()) + self.matmul_macs


class _Tracer(fx.Tracer):
    """Keeps modules that declare `channelwise = True` whole, so they read as one per-channel op, and so
    subclasses of torch.nn's modules that keep their forward (Hugging Face's EfficientNetDepthwiseConv2d is an
    nn.Conv2d with its own __init__ alone): they compute what their base computes, and read as it."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return bool(getattr(m, "channelwise", False)) or super().is_leaf_module(m, qualname) or _torch_forward(m)


def _torch_forward(m: nn.Module) -> bool:
    """A torch.nn module whose subclasses (fx keeps torch.nn's own modules whole, nn.Sequential aside) add no
    method but __init__, extra_repr and reset_parameters: one that overrides a helper its forward calls
    (`_conv_forward`, for a weight-standardised conv) computes something else."""
    if isinstance(m, nn.Sequential):
        return False
    for cls in type(m).__mro__:
        if cls.__module__.startswith("torch.nn.modules."):
            return cls is not nn.Module
        if any(callable(v) and k not in _HARMLESS_METHODS for k, v in vars(cls).items()):
            return False
    return False


_HARMLESS_METHODS = {"__init__", "extra_repr", "reset_parameters"}


def _is_channelwise(mod: nn.Module) -> bool:
    return isinstance(mod, _ZERO_PRESERVING_MODULES) or bool(getattr(mod, "channelwise", False)) \
        or isinstance(mod, (nn.ConstantPad1d, nn.ConstantPad2d)) and mod.value == 0


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape)


def _describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return f"{node.op} {name}"


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Symbolic trace plus shape propagation on a zero input of `input_shape`.

    Where fx cannot trace the forward (Python control flow on shapes, `if x.shape[-1] > 16:`), torch.export
    records it for this input shape instead, the branches taken for it resolved (_exported_graph)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as fx_exc:  # fx raises many kinds of errors for untraceable code
        try:
            gm = _exported_graph(model, input_shape)
        except Exception as export_exc:
            raise UnsupportedModelError(
                f"cannot trace {type(model).__name__}: torch.fx stops at {_traced_construct(fx_exc)}, and "
                f"torch.export at {_exported_construct(export_exc)} (structured groups need a forward whose ops "
                "do not depend on the values of its input)"
            ) from fx_exc
    else:
        gm = _with_module_calls(model, graph)
    modes = {m: m.training for m in model.modules()}  # restored one by one: a frozen BN stays in eval
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(_zero_input(model, input_shape))
    except Exception as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not run on an input of shape {tuple(input_shape)} ({exc})"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training
    return gm


def _traced_construct(exc: BaseException) -> str:
    """fx's error in a few words: the construct it could not trace."""
    text = first_line(exc, 160)
    if "symbolically traced variables cannot be used as inputs to control flow" in text:
        return "Python control flow on a traced value (an if or a loop on a shape or a tensor)"
    return f"{type(exc).__name__}: {text}"


def _exported_construct(exc: BaseException) -> str:
    """torch.export's error in a few words."""
    if "DataDependent" in type(exc).__name__:
        return "control flow on the values of a tensor"
    return f"{type(exc).__name__}: {first_line(exc, 160)}"


def _zero_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    return torch.zeros(input_shape, device=device, dtype=dtype)


# Where an export fails, these log warnings and torch.export prints the graph so far to stderr; the refusal
# says what failed in one sentence instead.
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _exported_graph(model: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """The graph torch.export records for one input of `input_shape` (in eval mode), as a GraphModule of `model`.

    Its ops are aten overloads, which the analysis reads like their torch functions, and its parameters are
    attributes of `model` by name; every conv, Linear, BatchNorm, LayerNorm and RMSNorm call of a module's own
    parameters (and hyperparameters) is put back as a call of that module, so layers are recognised as in a
    symbolic trace.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _quiet(_EXPORT_LOGGERS):
            exported = torch.export.export(model, (_zero_input(model, input_shape),), strict=False).module()
    finally:
        for m, training in modes.items():
            m.training = training
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in exported.graph.nodes:
        if node.op == "call_module" and not node.users:
            continue  # torch.export's check of the input's shape: nothing to analyse
        env[node] = graph.node_copy(node, lambda n: env[n])
    gm = _with_module_calls(model, graph, exported)
    gm.graph.eliminate_dead_code()  # a functional graph: what nothing reads computes nothing
    gm.recompile()
    return gm


def _with_module_calls(model: nn.Module, graph: fx.Graph, exported: nn.Module | None = None) -> fx.GraphModule:
    """`graph` as a GraphModule of `model`, each conv, Linear, norm call of a module's own parameters put back as
    a call of that module, so layers and norms are recognised whoever called the function: torch.export's aten
    ops, or the forward of a subclass that fx traces through (a LayerNorm over channels first calls
    `F.layer_norm` between two permutes).

    Such a subclass is called here as its torch.nn base sharing its parameters: the call computes the function
    alone, and the permutes around it stay ops of the graph. Attributes are the model's; tensors torch.export
    lifted out of a forward (a constant it builds each call) come from `exported`."""
    own_forward: set[str] = set()
    for node in list(graph.nodes):
        name = _module_called(node, model)
        if name is None:
            continue
        with graph.inserting_before(node):
            call = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        if not _torch_forward(model.get_submodule(name)):
            own_forward.add(name)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)  # a parameter the module now reads itself
    root = {str(n.target): _attribute(model, str(n.target), exported) for n in graph.nodes
            if n.op in ("get_attr", "call_module")}
    gm = fx.GraphModule(root, graph, type(model).__name__)
    for name in own_forward:
        gm.set_submodule(name, _as_torch_base(model.get_submodule(name)))
    gm.recompile()
    return gm


def _attribute(model: nn.Module, target: str, exported: nn.Module | None):
    """The model's attribute at a dotted path, else the exported module's (a tensor it lifted)."""
    for owner in (model, exported):
        obj = owner
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise AttributeError(f"{type(model).__name__} has no attribute {target}")


def _as_torch_base(mod: nn.Module) -> nn.Module:
    """`mod` as the torch.nn class it derives from, its parameters and buffers the same tensors."""
    base = next(c for c in type(mod).__mro__ if c.__module__.startswith("torch.nn.modules."))
    shadow = copy.copy(mod)  # a new __dict__ holding the same parameter and buffer dicts
    shadow.__class__ = base
    return shadow


# aten overload -> the module type it computes, and the module attributes its arguments 1, 2, ... must be.
_MODULE_OPS = {
    aten.conv2d.default: (nn.Conv2d, ("weight", "bias", "stride", "padding", "dilation", "groups")),
    aten.conv1d.default: (nn.Conv1d, ("weight", "bias", "stride", "padding", "dilation", "groups")),
    aten.linear.default: (nn.Linear, ("weight", "bias")),
    aten.batch_norm.default: (nn.modules.batchnorm._BatchNorm,
                              ("weight", "bias", "running_mean", "running_var", None, None, "eps")),
    # A norm read as its module holds its scale and shift: a branch that starts at one is a depth group, as in
    # an fx graph (a transformer's MLP branch).
    aten.layer_norm.default: (nn.LayerNorm, ("normalized_shape", "weight", "bias", "eps")),
    aten.rms_norm.default: (nn.RMSNorm, ("normalized_shape", "weight", "eps")),
}
# The functions fx records where a subclass's own forward calls them; their arguments come in the same order.
_MODULE_OPS |= {fn: _MODULE_OPS[op] for fn, op in (
    (torch.nn.functional.conv2d, aten.conv2d.default), (torch.nn.functional.conv1d, aten.conv1d.default),
    (torch.nn.functional.linear, aten.linear.default), (torch.nn.functional.layer_norm, aten.layer_norm.default))}
if hasattr(torch.nn.functional, "rms_norm"):
    _MODULE_OPS[torch.nn.functional.rms_norm] = _MODULE_OPS[aten.rms_norm.default]
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}  # per axis for the tuples


def _module_called(node: fx.Node, model: nn.Module) -> str | None:
    """The module whose forward this call is (an aten op, or a torch.nn.functional one): the one whose parameters
    and settings it passes."""
    kind = _MODULE_OPS.get(node.target) if node.op == "call_function" else None
    if kind is None:
        return None
    cls, attrs = kind
    owners = {a.target.rsplit(".", 1)[0] for a in (*node.args[1:], *node.kwargs.values())
              if isinstance(a, fx.Node) and a.op == "get_attr"}
    if len(owners) != 1:
        return None
    (name,) = owners
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    if not isinstance(mod, cls):
        return None
    for k, attr in enumerate(attrs, start=1):
        if attr is None:
            continue
        want = getattr(mod, attr)
        default = _DEFAULTS.get(attr)
        if isinstance(want, tuple):
            default = [default] * len(want)
        arg = node.args[k] if k < len(node.args) else node.kwargs.get(attr, default)
        if isinstance(want, torch.Tensor) or want is None and attr in ("weight", "bias", "running_mean", "running_var"):
            got_name = arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else arg
            if got_name != (f"{name}.{attr}" if want is not None else None):
                return None
        elif isinstance(want, tuple) and isinstance(arg, int) and not isinstance(arg, bool):
            if list(want) != [arg] * len(want):  # F.conv2d(x, w, b, 2): one size for every axis
                return None
        elif (list(want) if isinstance(want, tuple) else want) != (list(arg) if isinstance(arg, (tuple, list)) else arg):
            return None
    return name


def analyze(model: nn.Module, input_shape: tuple[int, ...]) -> ModelStructure:
    """Channel ids, layers, norms and residual branches of `model` for inputs of `input_shape`."""
    gm = trace(model, input_shape)
    modules = dict(gm.named_modules())
    b = ChannelIds()
    ids_of: dict[fx.Node, object] = {}  # node -> list[int] (channel ids) | tuple of lists | None
    layers: dict[str, Layer] = {}
    norms: dict[str, Norm] = {}
    input_ids: set[int] = set()
    sum_nodes: list[fx.Node] = []
    gates: set[fx.Node] = set()
    splits: list[ChannelSplit] = []
    axis_of: dict[fx.Node, int] = {}  # the axis a node's channel ids run along, where it is not dim 1
    matmul_macs = 0
    batch = input_shape[0] if input_shape else 1
    stats = channel_stats.Follower(b, {n for n, _ in model.named_parameters()}, ids_of, axis_of, _shape,
                                   _away_from_zero)

    def tensor_ids(arg: object) -> list[int] | None:
        if isinstance(arg, fx.Node):
            val = ids_of.get(arg)
            return val if isinstance(val, list) else None
        return None

    def channel_lists(arg: fx.Node) -> list[list[int]]:
        """Every channel list a node holds: one for a tensor, one per part for the tuple a split returns."""
        val = ids_of.get(arg)
        return [val] if isinstance(val, list) else [p for p in val if p] if isinstance(val, tuple) else []

    def wall(node: fx.Node, why: str, axis: int = 1, defining: bool = False) -> list[int] | None:
        for arg in node.all_input_nodes:
            for ids in channel_lists(arg):
                b.pin(ids, why, defining=defining)
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return b.fresh(shape[axis], pinned=why)

    unused = _unused_values(gm)
    product_macs: dict[fx.Node, int] = {}  # MACs of the ops that are no layers (an attention's products)
    variable: set[fx.Node] = set()  # what depends on the model's input
    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder" or any(a in variable for a in node.all_input_nodes):
            variable.add(node)
        elif node.op in ("call_module", "call_function", "call_method"):
            # Computed from parameters, buffers and constants alone (Swin V2's position bias MLP on a
            # coordinate table): every export folds it into a constant, so it holds no layer, MAC or channel.
            ids_of[node] = None
            continue
        if node not in unused:
            product_macs[node] = last_axis.matmul_macs(node, _shape, batch, modules)
            matmul_macs += product_macs[node]
        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                ids_of[node] = None
                continue
            ids = b.fresh(shape[1], pinned="model input")
            input_ids.update(ids)
            ids_of[node] = ids
        elif node.op == "get_attr":
            ids_of[node] = None
        elif node.op == "output":
            for arg in node.all_input_nodes:
                for ids in channel_lists(arg):
                    b.pin(ids, "model output")
        elif (got := stats.read(node)) is not None:
            ids_of[node], axis = got
            if axis != 1 and isinstance(ids_of[node], list):
                axis_of[node] = axis
        elif last_axis.is_split(node):
            # Along the channels, or along the features of a (batch, tokens, features) value (a packed
            # gate-and-up projection chunked in two: a gated MLP's w12(x).chunk(2, -1)).
            along = axis_of.get(node.args[0], 1)
            ids_of[node] = _split_parts(node, tensor_ids, wall, along)
            if isinstance(ids_of[node], tuple):
                if along != 1:
                    axis_of[node] = along
                splits.append(ChannelSplit(node.name, [list(p) for p in ids_of[node]], node.target in _CHUNK_TARGETS))
        elif _is_part(node, ids_of):
            ids_of[node] = _part(node, ids_of, wall)
            if axis_of.get(node.args[0], 1) != 1:
                axis_of[node] = axis_of[node.args[0]]
        elif node.op == "call_module" and isinstance(modules.get(str(node.target)), CONVS) and node.args \
                and axis_of.get(node.args[0], 1) != 1:
            # A conv reads dim 1, and the channels followed here run along another axis (a wall's, after a
            # reshape the analysis does not follow): those stay, but the conv is a layer all the same, its MACs
            # counted as the export counts them.
            ids_of[node] = _module_ids(b, node, modules[str(node.target)], None, shape, layers, norms, input_ids,
                                       wall)
        elif last_axis.applies(node, modules, axis_of, _shape):
            ids_of[node], axis = last_axis.ids(b, node, modules, shape, tensor_ids, axis_of, _shape, layers, Layer,
                                               wall, batch)
            if axis != 1 and isinstance(ids_of[node], list):
                axis_of[node] = axis
            if _stream_sum(node, shape):
                # A residual stream whose features a LayerNorm pins (a pre-norm transformer's) still sums a
                # branch that may go whole: the sum is one for the depth groups, whatever its channels.
                sum_nodes.append(node)
        elif _gate_product(node, modules) is not None:
            # A sigmoid gate feeding x * gate only (squeeze-and-excitation): its channels follow x's.
            ids_of[node] = tensor_ids(node.args[0]) if node.args else None
            gates.add(node)
        elif (gated := _gated_operand(node, gates)) is not None:
            ids_of[node] = _gated_product(b, node, shape, tensor_ids, gated, wall)
        elif (dim := last_axis.glu_dim(node, modules)) is not None:
            ids_of[node] = _glu_ids(b, node, dim, shape, tensor_ids, wall)
        elif node.op == "call_module":
            mod = modules[str(node.target)]
            x = tensor_ids(node.args[0]) if node.args else None
            ids_of[node] = _module_ids(b, node, mod, x, shape, layers, norms, input_ids, wall)
        elif _is_cat_of_parts(node, ids_of):
            ids_of[node] = _cat_of_parts(node, ids_of, shape, wall)
        elif node.op in ("call_function", "call_method"):
            ids_of[node] = _function_ids(b, node, shape, tensor_ids, input_ids, wall, sum_nodes)
        else:
            ids_of[node] = wall(node, f"unsupported node {_describe(node)}")

    # A layer whose every call is unused (a query read only by scores a softmax over one key turns into ones)
    # is folded away by every export: it holds no MACs or groups.
    live_calls = {str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n not in unused}
    layers = {name: lay for name, lay in layers.items() if name in live_calls}
    branches = _residual_branches(gm, sum_nodes, modules, product_macs)
    return ModelStructure(
        layers=layers, norms=norms, branches=branches, parent=b.parent, pinned=b.pinned,
        input_ids=input_ids, splits=splits, matmul_macs=matmul_macs,
        heads=attention_heads.find(gm, modules, layers, _shape, batch, dict(model.named_modules())),
        channel_params=stats.channel_params, means=stats.means,
    )


_SOFTMAX_FUNCTIONS = {torch.softmax, torch.nn.functional.softmax, aten.softmax.int, aten._softmax.default,
                      torch.log_softmax, torch.nn.functional.log_softmax, aten.log_softmax.int,
                      aten._log_softmax.default}


def _constant_softmax(node: fx.Node) -> bool:
    """A softmax (log-softmax) over an axis of size 1: ones (zeros) whatever it reads."""
    if not ((node.op == "call_method" and node.target in ("softmax", "log_softmax"))
            or (node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS)):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    shape = _shape(node)
    return isinstance(dim, int) and shape is not None and -len(shape) <= dim < len(shape) and shape[dim] == 1


def _unused_values(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value reaches the output only through a softmax over an axis of size 1 (SwiftFormer's
    `(q @ w_g).softmax(-1)` of a (B, N, 1) value): the softmax is a constant, every export folds it, and what only
    it reads is computed by no export, so it holds no MACs."""
    unused: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if node.op in ("output", "placeholder") or not node.users:
            continue
        if all(u in unused or _constant_softmax(u) for u in node.users):
            unused.add(node)
    return unused


def _glu_ids(b, node: fx.Node, dim, shape, tensor_ids, wall):
    """A GLU over the channels (a gated conv's x[:, :C] * sigmoid(x[:, C:])): channel j is input channels j and
    C + j, one unit."""
    src = node.args[0] if node.args else None
    x = tensor_ids(src)
    src_shape = _shape(src) if isinstance(src, fx.Node) else None
    if x is None or src_shape is None or not isinstance(dim, int) or dim % len(src_shape) != 1 or len(x) % 2 \
            or shape is None or len(shape) < 2 or shape[1] != len(x) // 2:
        return wall(node, f"GLU {node.name} along another axis than the channels'")
    return last_axis.glu_units(b, x)


def _module_ids(b, node, mod, x, shape, layers, norms, input_ids, wall):
    name = str(node.target)
    if name in layers and isinstance(mod, (*CONVS, nn.Linear)):
        return _called_again(b, node, layers[name], x, shape, wall)
    if isinstance(mod, CONVS):
        if shape is None:
            return wall(node, f"conv {name} with unknown input")
        out_hw = _spatial(shape)
        if x is None:
            # Input channels the analysis does not follow (behind a wall that gave them no ids, or along
            # another axis): they stay, and so do its filters; the conv still computes, and counts, all of them.
            why = f"conv {name} reads channels that are not followed"
            out = wall(node, why)  # pins the ids its input carries; its outputs are fresh, pinned
            x = b.fresh(mod.in_channels, pinned=why)
            if mod.groups != 1 and mod.groups == mod.in_channels:
                out = [i for i in x for _ in range(mod.out_channels // mod.groups)]  # carried on, as below
            layers[name] = Layer(name, "conv", tuple(mod.weight.shape), mod.bias is not None, mod.groups,
                                 out_hw, list(x), list(out), **_conv_geometry(mod, node))
            return list(out)
        if mod.groups != 1 and mod.groups == mod.in_channels:
            # Depthwise (with or without a channel multiplier): the outputs of group g read input channel g
            # alone, so they are that channel carried on (one id). They are zero when it is and their biases
            # are; deleting the channel deletes its filters, one group of the conv.
            per_group = mod.out_channels // mod.groups
            out = [i for i in x for _ in range(per_group)]
            layers[name] = Layer(name, "conv", tuple(mod.weight.shape), mod.bias is not None, mod.groups,
                                 out_hw, list(x), out, **_conv_geometry(mod, node))
            return out
        # A grouped conv's outputs are new channels too; which of them and of its inputs an export can
        # delete while its groups stay equal is decided on the weights (finetune/grouped.py).
        out = b.fresh(mod.out_channels)
        layers[name] = Layer(name, "conv", tuple(mod.weight.shape), mod.bias is not None, mod.groups,
                             out_hw, list(x), out, **_conv_geometry(mod, node))
        return out
    if isinstance(mod, nn.Linear):
        if x is None or shape is None or len(shape) != 2 or len(x) != mod.in_features:
            return wall(node, f"linear {name} on a tensor that is not (batch, features)")
        out = b.fresh(mod.out_features)
        layers[name] = Layer(name, "linear", tuple(mod.weight.shape), mod.bias is not None, 1,
                             (1, 1), list(x), out)
        return out
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if x is None:
            return wall(node, f"batch norm {name} with unknown input")
        if not mod.affine and mod.track_running_stats:
            # Without a scale and shift to zero, eval mode maps a zero channel to -mean/std, not 0.
            b.pin(x, f"batch norm {name} without affine parameters")
        norms[name] = Norm(name, list(x), mod.affine)
        return list(x)
    if _is_channelwise(mod):
        return list(x) if x is not None else wall(node, f"{type(mod).__name__} {name}")
    if isinstance(mod, nn.Flatten):
        return _flatten(b, node, x, shape, input_ids, wall)
    return wall(node, f"{type(mod).__name__} {name} (channel mixing or f(0) != 0)")


def _pair(v, fill: int = 1) -> tuple[int, int]:
    """A conv setting as (rows, columns): a Conv1d's one value is its columns' (its rows' is `fill`)."""
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) > 1 else (fill, int(v[0]))
    return (int(v), int(v))


def _spatial(shape: tuple[int, ...]) -> tuple[int, int]:
    """The spatial size of a conv's (N, C, H, W) or, as one row, a Conv1d's (N, C, L) value."""
    return (int(shape[2]), int(shape[3])) if len(shape) == 4 else (1, int(shape[2])) if len(shape) == 3 else (1, 1)


def _conv_geometry(mod: nn.Conv1d | nn.Conv2d, node: fx.Node) -> dict:
    """Stride, padding, dilation and input size of a conv call; padding 'same' as the (top, left) pad torch
    uses (the extra pixel of an even total goes to the bottom and right), 'valid' as none. A Conv1d's are those
    of a conv of one row: no padding, stride and dilation 1 along the rows."""
    kernel, dilation = _pair(mod.kernel_size), _pair(mod.dilation)
    if mod.padding == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    elif mod.padding == "valid":
        padding = (0, 0)
    else:
        padding = _pair(mod.padding, fill=0)
    src = _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    in_hw = _spatial(src) if src is not None and len(src) in (3, 4) else (1, 1)
    return {"stride": _pair(mod.stride), "padding": padding, "dilation": dilation, "in_hw": in_hw}


def _called_again(b, node, first: Layer, x, shape, wall):
    """A layer module called once more: the same weights, so the same filters and input channels.

    Input channel j of this call and of the first are one channel as far as deletion goes (deleting it
    removes weight column j for both), so their ids are merged, and this call's outputs carry the first
    call's output ids. The call's MACs count beside the first's.
    """
    why = ""
    if x is None or shape is None or len(x) != len(first.in_ids):
        why = f"{first.kind} {first.name} called again on an input whose channels are not followed"
    elif first.kind == "linear" and len(shape) != 2:
        why = f"linear {first.name} called again on a tensor that is not (batch, features)"
    if why:
        # Its weights are the first call's: this call's channels cannot be cut, so neither can the first's;
        # it still computes, and counts.
        b.pin(first.in_ids, why)
        b.pin(first.out_ids, why)
        if shape is not None and (first.kind == "conv" or len(shape) == 2):
            first.more_hw.append(_spatial(shape) if first.kind == "conv" else (1, 1))
        return wall(node, why)
    for a, c in zip(first.in_ids, x):
        b.union(a, c)
    first.more_hw.append(_spatial(shape) if first.kind == "conv" else (1, 1))
    return list(first.out_ids)


_CHUNK_TARGETS = {torch.chunk, "chunk", aten.chunk.default}


def _part_shapes(node: fx.Node) -> list[tuple[int, ...]] | None:
    """The shapes of a node that returns a tuple of tensors (torch.chunk, torch.split)."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, (tuple, list)) or not all(hasattr(m, "shape") for m in meta):
        return None
    return [tuple(int(d) for d in m.shape) for m in meta]


def _split_parts(node: fx.Node, tensor_ids, wall, axis: int = 1):
    """torch.chunk / torch.split along the channels (`axis`, 1 or the axis features run along): consecutive
    channel ranges, as the surgery's Split selects them (its sizes follow the kept channels). Along any other
    dim it is a wall, as in the surgery."""
    src = node.args[0] if node.args else None
    x = tensor_ids(src)
    src_shape = _shape(src) if isinstance(src, fx.Node) else None
    parts = _part_shapes(node)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if x is None or src_shape is None or parts is None or not isinstance(dim, int) or len(src_shape) < 2:
        return wall(node, f"split {node.name} of a tensor whose channels cannot be followed")
    if dim % len(src_shape) != axis % len(src_shape):
        return wall(node, f"split {node.name} along dim {dim}, not the channel axis", axis)
    sizes = [p[axis] if len(p) > axis else -1 for p in parts]
    if sum(sizes) != len(x):
        return wall(node, f"split {node.name} into parts of other widths")
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return tuple(list(x[a:a + n]) for a, n in zip(starts, sizes))


def _is_part(node: fx.Node, ids_of: dict) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and bool(node.args) \
        and isinstance(ids_of.get(node.args[0]), tuple)


def _part(node: fx.Node, ids_of: dict, wall):
    """One part of a split: the channels of its range."""
    parts, index = ids_of[node.args[0]], node.args[1]
    if isinstance(index, int) and -len(parts) <= index < len(parts):
        return list(parts[index])
    if isinstance(index, slice):
        return tuple(parts[index])  # some parts, still a tuple: whatever reads it is a wall or indexes it
    return wall(node, f"indexing {node.name} of a split by {index!r}")


def _is_cat_of_parts(node: fx.Node, ids_of: dict) -> bool:
    """torch.cat of a tuple of split parts held as one value (`torch.cat(x.chunk(4, 1)[1:], 1)`)."""
    return node.op == "call_function" and node.target in _CAT_FUNCTIONS and bool(node.args) \
        and isinstance(ids_of.get(node.args[0]), tuple)


def _cat_of_parts(node: fx.Node, ids_of: dict, shape, wall):
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if shape is None or len(shape) < 2 or not isinstance(dim, int) or dim % len(shape) != 1:
        return wall(node, f"concatenation {node.name} not along channels")
    return [i for part in ids_of[node.args[0]] for i in part]


def _flatten(b, node, x, shape, input_ids, wall):
    """(N, C, H, W) -> (N, C*H*W): feature f belongs to channel f // (H*W)."""
    src = node.args[0] if node.args else None
    src_shape = _shape(src) if isinstance(src, fx.Node) else None
    if x is None or shape is None or src_shape is None:
        return wall(node, f"reshape {node.name}")
    if (len(shape) >= 2 and len(src_shape) >= 2 and shape[:2] == src_shape[:2]
            and all(d == 1 for d in (*shape[2:], *src_shape[2:]))):
        return list(x)  # (N, C) <-> (N, C, 1, 1): the same channels, size-1 dims added or dropped
    if len(shape) >= 3 and len(src_shape) >= 3 and shape[:2] == src_shape[:2] \
            and math.prod(shape[2:]) == math.prod(src_shape[2:]):
        # (N, C, H*W) <-> (N, C, H, W): only the spatial axes regrouped, each channel's values stay its own (the
        # surgery's Reshape "keep" plan); SegFormer's and PVT v2's Mix-FFN depthwise conv on its tokens.
        return list(x)
    shuffle = _channel_group_view(src_shape, shape)
    if shuffle == "merges two axes into channels" and len(x) == src_shape[1]:
        # (N, C, H, W) -> (N, C*H, W), a CNN's rows stacked with its channels into a sequence's features (a
        # text recogniser's step to its Conv1d or recurrent part): feature c*H + h is channel c's row h, so the
        # H features of channel c are that channel, as the surgery follows them.
        return [i for i in x for _ in range(src_shape[2])]
    if shuffle:
        # The surgery cannot cut it either (a Reshape that neither flattens nor keeps the channel axis is a
        # wall there), so the channels on both sides stay.
        return wall(node, f"reshape {node.name} that {shuffle} (a channel shuffle)")
    if len(shape) != 2 or shape[0] != src_shape[0] or len(src_shape) < 2:
        return wall(node, f"reshape {node.name} that is not a flatten to (batch, features)")
    spatial = 1
    for d in src_shape[2:]:
        spatial *= d
    if shape[1] != src_shape[1] * spatial:
        return wall(node, f"reshape {node.name}")
    if len(src_shape) == 2:
        return list(x)
    if all(i in input_ids for i in x):
        # Pixels of the model input have no producer; each feature is its own group (the
        # paper prunes MLP input pixels this way).
        return b.fresh(shape[1])
    return [i for i in x for _ in range(spatial)]


def _channel_group_view(src: tuple[int, ...], dst: tuple[int, ...]) -> str:
    """How a reshape splits channels into (groups, channels per group) or merges them back; '' if not."""
    if len(dst) == len(src) + 1 and len(src) >= 2 and dst[0] == src[0] and dst[1] * dst[2] == src[1] \
            and dst[3:] == src[2:]:
        return "splits the channel axis into groups"
    if len(src) == len(dst) + 1 and len(dst) >= 2 and src[0] == dst[0] and src[1] * src[2] == dst[1] \
            and src[3:] == dst[2:]:
        return "merges two axes into channels"
    return ""


def _function_ids(b, node, shape, tensor_ids, input_ids, wall, sum_nodes):
    target = node.target
    is_fn = node.op == "call_function"
    args = node.args
    tensors = [a for a in node.all_input_nodes if tensor_ids(a) is not None]

    if (is_fn and target is getattr) or (not is_fn and target in ("size", "dim")):
        return None
    if is_fn and target is operator.getitem:
        src = args[0] if args else None
        if isinstance(src, fx.Node) and tensor_ids(src) is None:
            # Indexing a size tuple or similar (no channels), or the tuple an unknown op returned
            # (torch.sort, torch.chunk, ...): a tensor taken from it gets fresh pinned ids.
            return wall(node, f"indexing {node.name}") if shape is not None and len(shape) >= 2 else None
        return wall(node, f"indexing {node.name}")
    if shape is None:
        # Not a single tensor (a size, a Python number, or a tuple of tensors): carries no
        # channels, but an op we do not know that reads channels is a wall for them.
        return wall(node, f"unsupported op {_describe(node)}") if tensors else None
    if (is_fn and target in _ZERO_PRESERVING_FUNCTIONS) or (not is_fn and target in _ZERO_PRESERVING_METHODS) \
            or _pads_space_with_zeros(node, len(shape)):
        x = tensor_ids(args[0]) if args else None
        if x is not None and len(x) == (shape[1] if len(shape) > 1 else -1):
            return list(x)
        return wall(node, f"{_describe(node)}")
    if (is_fn and target in _SUM_FUNCTIONS) or (not is_fn and target in _SUM_METHODS):
        a, c = (tensor_ids(args[0]), tensor_ids(args[1])) if len(args) >= 2 else (None, None)
        if a is not None and c is not None and len(a) == len(c) and len(shape) > 1 and shape[1] == len(a):
            for i, j in zip(a, c):
                b.union(i, j)
            sum_nodes.append(node)
            return list(a)
        return wall(node, f"{_describe(node)} with a constant or broadcast operand (0 + c != 0)")
    if (is_fn and target in _SCALE_FUNCTIONS) or (not is_fn and target in _SCALE_METHODS):
        x = tensor_ids(args[0]) if args else None
        other = args[1] if len(args) > 1 else node.kwargs.get("other")  # torch.mul(x, other=2.0)
        if is_fn and target in _PRODUCT_FUNCTIONS and len(args) > 1 and isinstance(args[0], (int, float)):
            x, other = tensor_ids(args[1]), args[0]  # 3.0 * x
        if len(tensors) == 1 and x is not None and isinstance(other, (int, float)):
            return list(x)
        return wall(node, f"{_describe(node)} of two tensors")
    if (is_fn and target in _FLATTEN_FUNCTIONS) or (not is_fn and target in _FLATTEN_METHODS):
        x = tensor_ids(args[0]) if args else None
        return _flatten(b, node, x, shape, input_ids, wall)
    if is_fn and target in _CAT_FUNCTIONS:
        seq = args[0]
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        parts = [tensor_ids(a) for a in seq] if isinstance(seq, (list, tuple)) else [None]
        if dim in (1, -3 if len(shape) == 4 else 1) and all(p is not None for p in parts):
            return [i for p in parts for i in p]
        return wall(node, f"concatenation {node.name} not along channels")
    if (is_fn and target in _MEAN_FUNCTIONS) or (not is_fn and target in _MEAN_METHODS):
        x = tensor_ids(args[0]) if args else None
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        src_shape = _shape(args[0])
        if x is not None and dims and src_shape and all(d % len(src_shape) >= 2 for d in dims):
            return list(x)
        return wall(node, f"reduction {node.name} over channels")
    return wall(node, f"unsupported op {_describe(node)}")


_GATE_FUNCTIONS = {torch.sigmoid, torch.nn.functional.sigmoid, torch.nn.functional.hardsigmoid,
                   aten.sigmoid.default, aten.hardsigmoid.default}
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_RESHAPE_METHODS = {"view", "reshape"}
_RESHAPE_FUNCTIONS = {aten.view.default, aten.reshape.default}


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _RESHAPE_METHODS) or \
        (node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)


def _is_gate_op(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_function":
        return node.target in _GATE_FUNCTIONS
    if node.op == "call_method":
        return node.target == "sigmoid"
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _GATE_MODULES)
    return False


def _gate_product(node: fx.Node, modules: dict) -> fx.Node | None:
    """For a sigmoid whose value, reshaped or not, is only a factor of one product of two tensors: that product.

    Such a gate scales each channel of the other factor, so a zero channel there stays zero whatever the gate
    says (sigmoid(0) = 0.5 is finite): the gate's channel is deleted with it. Anything else a sigmoid feeds
    sees f(0) != 0, and the sigmoid stays a wall.
    """
    if not _is_gate_op(node, modules):
        return None
    at = node
    while len(at.users) == 1:
        (user,) = at.users
        if last_axis.is_product(user):
            factors = [a for a in user.args[:2] if isinstance(a, fx.Node)]
            return user if len(factors) == 2 and at in factors and factors[0] is not factors[1] else None
        if _is_reshape(user) and user.args[0] is at:
            at = user
            continue
        return None
    return None


def _gated_operand(node: fx.Node, gates: set[fx.Node]) -> fx.Node | None:
    """The factor of this product that is a gate (through its reshapes), if any."""
    if not last_axis.is_product(node):
        return None
    for arg in node.args[:2]:
        at = arg
        while isinstance(at, fx.Node):
            if at in gates:
                return arg
            if _is_reshape(at):
                at = at.args[0]
                continue
            break
    return None


def _gated_product(b, node: fx.Node, shape, tensor_ids, gate_arg: fx.Node, wall):
    """x * gate: x's channel c and the gate's channel c are one channel; the product carries x's ids."""
    other = next(a for a in node.args[:2] if a is not gate_arg)
    x, g = tensor_ids(other), tensor_ids(gate_arg)
    if x is None or g is None or shape is None or len(shape) < 2 or not len(x) == len(g) == shape[1]:
        return wall(node, f"gating product {node.name} of other widths")
    for i, j in zip(x, g):
        b.union(i, j)
    return list(x)


def _residual_branches(gm: fx.GraphModule, sum_nodes: list[fx.Node], modules: dict,
                       product_macs: dict[fx.Node, int]) -> list[Branch]:
    """For every residual sum, the side whose deletion leaves the other side as a shortcut."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    ancestors: dict[fx.Node, set[fx.Node]] = {}

    def anc(n: fx.Node) -> set[fx.Node]:
        if n not in ancestors:
            acc: set[fx.Node] = set()
            for a in n.all_input_nodes:
                acc.add(a)
                acc |= anc(a)
            ancestors[n] = acc
        return ancestors[n]

    for n in gm.graph.nodes:  # fill in order to avoid deep recursion
        anc(n)

    # What the input's values reach. The rest (parameters, a mask built from the input's shape that every
    # layer's attention reads) stays when a branch goes, so it is no part of one.
    valued: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or (not last_axis.reads_a_size(n) and any(a in valued for a in n.all_input_nodes)):
            valued.add(n)

    def parametric(side: set[fx.Node]) -> list[str]:
        """The modules with parameters of their own that a side calls, in graph order."""
        mods = [str(n.target) for n in sorted(side, key=order.get) if n.op == "call_module"]
        return [m for m in mods if any(True for _ in modules[m].parameters(recurse=False))]

    branches: list[Branch] = []
    for node in sum_nodes:
        a, c = node.args[0], node.args[1]
        side_a = ((anc(a) | {a}) - (anc(c) | {c})) & valued
        side_c = ((anc(c) | {c}) - (anc(a) | {a})) & valued
        candidates = []
        # x - branch is x where the branch is zero; branch - x is -x, so a difference's first side is no branch.
        sides = ((side_c, side_a, c),) if _is_difference(node) else ((side_a, side_c, a), (side_c, side_a, c))
        for side, other, end in sides:
            if not side or not _self_contained(side, node) or (a if end is c else c) not in valued:
                continue  # (a sum with a constant, a position embedding, is no residual: no input passes it)
            params = parametric(side)
            if not params or not _zero_when_layers_are(end, side, modules) \
                    or any(_may_blow_up(n) for n in side):
                continue
            weights = sum(int(p.numel()) for m in params for p in modules[m].parameters(recurse=False))
            candidates.append((len(params), weights, params, parametric(other),
                               sum(product_macs.get(n, 0) for n in side)))
        if candidates:
            # With a projection shortcut both sides hold weights: the branch is the side with more layers (a
            # projection is one conv and its norm), then the heavier. Not the heavier alone: a thinned branch
            # whose channels all died (one kept, since a conv cannot have none) weighs less than its projection.
            candidates.sort(key=lambda t: (-t[0], -t[1]))
            _, _, params, shortcut, macs = candidates[0]
            branches.append(Branch(add_node=node.name, modules=params, shortcut=shortcut, product_macs=macs))
    return branches


_DIFFERENCE_FUNCTIONS = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor, aten.sub_.Tensor}


def _is_difference(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _DIFFERENCE_FUNCTIONS) \
        or (node.op == "call_method" and node.target in ("sub", "sub_"))


def _stream_sum(node: fx.Node, shape) -> bool:
    """An addition of two tensors of the sum's own shape (nothing broadcast), off channel axis 1."""
    is_fn = node.op == "call_function"
    if not ((is_fn and node.target in (operator.add, operator.iadd, torch.add, aten.add.Tensor))
            or (node.op == "call_method" and node.target in ("add", "add_"))):
        return False
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return len(operands) == 2 and shape is not None and all(_shape(a) == tuple(shape) for a in operands)


def _self_contained(side: set[fx.Node], add: fx.Node) -> bool:
    # A user that nothing reads (torch.export's _assert_tensor_metadata after a softmax's dtype cast) goes too,
    # and a read of a size is no read of values (the branch's own views read the sizes of its tensors).
    return all(user in side or user is add or (not user.users and user.op != "output") or last_axis.reads_a_size(user)
               for n in side for user in n.users)


# Ops that only move elements (a channels-last stretch of a ConvNeXt block): zero stays zero.
# and what selects or rolls them (a Swin block crops its padded windows and rolls its shifted ones back).
_LAYOUT_FUNCTIONS = {torch.permute, torch.transpose, aten.permute.default, aten.transpose.int, torch.roll,
                     aten.roll.default, aten.slice.Tensor, aten.select.int}
_LAYOUT_METHODS = {"permute", "transpose", "roll"}


def _slices_a_tensor(node: fx.Node) -> bool:
    """x[:, :h, :w] (ints, slices, None, ...): a view of x's elements, zero where x is."""
    if not (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2):
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index)


# Layers that write zero whatever they read once their parameters are zero: what runs before one in a branch
# (ConvNeXt V2's GRN before its second Linear) need only stay finite.
_ZEROING_LAYERS = (*CONVS, nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                   nn.InstanceNorm3d, nn.BatchNorm1d, nn.BatchNorm2d, *last_axis.RMS_NORM_MODULES)


def _zero_when_layers_are(end: fx.Node, side: set[fx.Node], modules: dict) -> bool:
    """Whether the branch's output `end` is exactly zero once every parameter of its layers is: walking back
    from it, each op keeps zero zero (a sum of zeros, a product with a zero factor, an activation of zero)
    until a layer that writes zero whatever it reads."""
    memo: dict[fx.Node, bool] = {}

    def zero(v) -> bool:
        if not isinstance(v, fx.Node):
            return isinstance(v, (int, float)) and v == 0
        if v not in side:
            return False  # the trunk, or a parameter read outside a layer (a layer scale): not zero
        if v not in memo:
            memo[v] = zero_of_op(v)
        return memo[v]

    def zero_of_op(v: fx.Node) -> bool:
        if v.op == "call_module":
            mod = modules[str(v.target)]
            if isinstance(mod, _ZEROING_LAYERS) and any(True for _ in mod.parameters(recurse=False)):
                # zero whatever it reads, unless a norm lacks a scale or shift (or is eval-mode BN without)
                return _branch_op_ok(v, modules, side)
            return _branch_op_ok(v, modules, side) and bool(v.args) and zero(v.args[0])
        if last_axis.is_product(v):
            return any(zero(a) for a in v.args[:2])
        if (v.op == "call_function" and v.target in _SUM_FUNCTIONS) or \
                (v.op == "call_method" and v.target in _SUM_METHODS):
            return all(zero(a) for a in v.args[:2])
        if v.op == "get_attr":
            return False
        return _branch_op_ok(v, modules, side) and bool(v.args) and zero(v.args[0])

    return zero(end)


_DIVISIONS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, aten.div.Tensor}
_INVERSES = {torch.reciprocal, torch.rsqrt, torch.log, aten.reciprocal.default, aten.rsqrt.default,
             aten.log.default, "reciprocal", "rsqrt", "log"}
_POSITIVE = {torch.exp, torch.sigmoid, torch.nn.functional.softplus, aten.exp.default, aten.sigmoid.default,
             "exp", "sigmoid"}
_ROOTS = {torch.sqrt, aten.sqrt.default, "sqrt"}
# Views of a divisor keep it away from zero (F.normalize's `x / norm.clamp_min(eps).expand_as(x)`).
_BROADCASTS = {aten.expand.default, aten.expand_as.default, aten.view.default, aten.reshape.default,
               aten.unsqueeze.default, "expand", "expand_as", "view", "reshape", "unsqueeze"}
_CLAMPS = {torch.clamp, torch.clamp_min, aten.clamp.default, aten.clamp_min.default, "clamp", "clamp_min"}


def _may_blow_up(node: fx.Node) -> bool:
    """A division (or reciprocal, rsqrt, log) by a value that is not kept away from zero: zero layers before it
    could make it infinite, and a zero layer after it then writes NaN, not zero. `x / (norm + eps)` is safe."""
    target = node.target if node.op in ("call_function", "call_method") else None
    if target in _DIVISIONS or (node.op == "call_method" and target in ("div", "div_", "true_divide")):
        return len(node.args) > 1 and not _away_from_zero(node.args[1])
    if target in _INVERSES:
        return not _away_from_zero(node.args[0]) if node.args else True
    return False


def _away_from_zero(v, depth: int = 0) -> bool:
    if not isinstance(v, fx.Node):
        return isinstance(v, (int, float)) and v != 0
    if depth > 8 or v.op not in ("call_function", "call_method"):
        return False
    if v.target in _POSITIVE:
        return True
    if v.target in _ROOTS or v.target in _BROADCASTS:
        return bool(v.args) and _away_from_zero(v.args[0], depth + 1)
    if v.target in _CLAMPS:
        low = v.args[1] if len(v.args) > 1 else v.kwargs.get("min")
        return isinstance(low, (int, float)) and low > 0
    if v.target in _SUM_FUNCTIONS or v.target in ("add", "add_"):
        # x + eps: the norms, variances and means of norms a normalisation divides by are never negative
        return not _is_difference(v) and any(isinstance(a, (int, float)) and a > 0 for a in v.args[:2])
    return False


def _branch_op_ok(node: fx.Node, modules: dict, side: set[fx.Node] = frozenset()) -> bool:
    """A branch whose parameters are all zero must output exactly zero. A product is zero where a factor comes
    from the branch (a gated MLP's silu(gate(x)) * up(x))."""
    if last_axis.is_product(node) and any(a in side for a in node.args[:2] if isinstance(a, fx.Node)):
        return True
    if last_axis.is_split(node) or (node.op == "call_function" and node.target is operator.getitem and node.args
                           and isinstance(node.args[0], fx.Node) and last_axis.is_split(node.args[0])):
        return True  # the parts of zero are zero
    if last_axis.glu_dim(node, modules) is not None:
        return True  # 0 * sigmoid(0) = 0
    if node.op == "get_attr":
        return True  # a parameter read outside a module (a layer scale): the ops that use it are checked
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and not mod.affine and mod.track_running_stats:
            return False  # maps zero to -running_mean / std in eval mode
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
            # Its scale and shift zero, it writes zero whatever it reads (a pre-norm block's branch starts there).
            return mod.weight is not None and mod.bias is not None
        if isinstance(mod, last_axis.RMS_NORM_MODULES):
            return mod.weight is not None  # no shift: its scale zero, it writes zero
        return isinstance(mod, (*CONVS, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten)) \
            or _is_channelwise(mod)
    if node.op == "call_function":
        shape = _shape(node)
        return node.target in _ZERO_PRESERVING_FUNCTIONS or node.target in _FLATTEN_FUNCTIONS \
            or node.target in _LAYOUT_FUNCTIONS or _pads_space_with_zeros(node, len(shape) if shape else None) \
            or _slices_a_tensor(node)
    if node.op == "call_method":
        return node.target in _ZERO_PRESERVING_METHODS or node.target in _FLATTEN_METHODS \
            or node.target in _LAYOUT_METHODS
    return False
