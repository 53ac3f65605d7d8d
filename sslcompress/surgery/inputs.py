"""Inputs to verify a compact model on: what the model takes, seeded random feeds, real images.

A model is described before any surgery pass runs (:func:`describe_inputs`, :func:`check_verifiable`),
so a model that cannot be verified is refused first, in one sentence, not after the passes.

Every graph input that is not an initializer is fed with its declared element type and shape, one
feed being a dict ``{input name: array}``:

- float inputs (float32, float16, float64) from a seeded standard normal, which drives every
  channel, so any change of the function shows;
- integer inputs (token ids, indices, lengths) from the seeded range [0, INT_HIGH) = [0, 8): small
  enough to be a valid index into any table of 8 or more entries, varied enough to exercise them;
- bool inputs from seeded coin flips.

One generator, seeded once, draws the feeds in order and, within a feed, the inputs in graph order;
for a model with one float32 input this is the stream of the earlier single-array batches. A
symbolic dimension gets one size wherever its name appears: a leading (batch) dimension, or any
dimension whose name is a leading one somewhere, gets ``batch``; any other dynamic dimension is
taken from the real inputs, and without them the model is refused (no size can be guessed).

Real images (``--data SPEC``) feed a model with exactly one float image input (N, C, H, W); they
check the function where it is used and make the top-1 agreement meaningful. bfloat16 inputs are
refused: ONNX Runtime's Python API takes no bfloat16 array (ml_dtypes' type is not recognised).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import DataError, UnsupportedModelError

REAL_BATCH = 16  # images per real batch when the model's batch dimension is dynamic
INT_HIGH = 8  # integer inputs are drawn from [0, INT_HIGH)
MAX_RANDOM_ELEMENTS = 2**28  # one random input (batch included) holds at most this many elements

Feed = dict[str, np.ndarray]
# What the verification functions take as one input: a feed, or one array for a single-input model.
FeedLike = Mapping[str, np.ndarray] | np.ndarray

# Element types a feed or an output can have: those numpy holds and ONNX Runtime's Python API reads.
NUMPY_TYPES: dict[int, np.dtype] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.INT32: np.dtype(np.int32),
    TensorProto.INT64: np.dtype(np.int64),
    TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.UINT16: np.dtype(np.uint16),
    TensorProto.UINT32: np.dtype(np.uint32),
    TensorProto.UINT64: np.dtype(np.uint64),
    TensorProto.BOOL: np.dtype(np.bool_),
}


@dataclass(frozen=True)
class InputSpec:
    """One graph input as declared: ``shape`` has None for each symbolic or unknown dimension, and is
    None as a whole when the rank is not declared; ``symbols`` gives each dimension's symbolic name
    (None for a fixed or unnamed one)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None
    symbols: tuple[str | None, ...]

    @property
    def image_like(self) -> bool:
        """A float input of rank 4: what real images (N, C, H, W) can feed."""
        return self.dtype.kind == "f" and self.shape is not None and len(self.shape) == 4

    def describe(self) -> str:
        return f"{self.name!r} ({self.dtype.name}, {_fmt(self.shape) if self.shape is not None else 'rank unknown'})"


def _fmt(shape: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def _type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"element type {elem_type}"


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (IR < 4 lists every initializer as an input too)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _kind(t: onnx.TypeProto) -> str:
    return t.WhichOneof("value") or "no type"


def describe_inputs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The model's inputs in graph order; UnsupportedModelError for one verification cannot feed."""
    specs = []
    for value in _graph_inputs(model):
        kind = _kind(value.type)
        if kind != "tensor_type":
            what = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional value",
                    "sparse_tensor_type": "a sparse tensor"}.get(kind, "not typed as a tensor")
            raise UnsupportedModelError(
                f"Input {value.name!r} is {what}; verification feeds dense numeric tensors only, "
                "so this model cannot be verified.")
        tensor = value.type.tensor_type
        if tensor.elem_type not in NUMPY_TYPES:
            why = ("ONNX Runtime's Python API takes no bfloat16 array" if tensor.elem_type == TensorProto.BFLOAT16
                   else "it makes float, integer and bool inputs only")
            raise UnsupportedModelError(
                f"Input {value.name!r} holds {_type_name(tensor.elem_type)} elements, which verification cannot "
                f"feed ({why}), so this model cannot be verified.")
        if tensor.HasField("shape"):
            dims = tensor.shape.dim
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
            symbols = tuple(d.dim_param if d.HasField("dim_param") and d.dim_param else None for d in dims)
        else:
            shape, symbols = None, ()
        specs.append(InputSpec(value.name, NUMPY_TYPES[tensor.elem_type], shape, symbols))
    return tuple(specs)


def _check_outputs(model: onnx.ModelProto) -> None:
    """Every output must come back from ONNX Runtime as a numpy array the comparison reads."""
    for value in model.graph.output:
        kind = _kind(value.type)
        if kind == "no type":
            continue  # ORT infers it
        if kind != "tensor_type":
            raise UnsupportedModelError(
                f"Output {value.name!r} is not a tensor ({kind.removesuffix('_type')}); verification compares "
                "tensors only, so this model cannot be verified.")
        elem = value.type.tensor_type.elem_type
        if elem != TensorProto.UNDEFINED and elem not in NUMPY_TYPES:
            raise UnsupportedModelError(
                f"Output {value.name!r} has element type {_type_name(elem)}, which ONNX Runtime's Python API "
                "cannot return as a numpy array, so this model cannot be verified.")


def _specs(model_or_specs: onnx.ModelProto | Sequence[InputSpec]) -> tuple[InputSpec, ...]:
    if isinstance(model_or_specs, onnx.ModelProto):
        return describe_inputs(model_or_specs)
    return tuple(model_or_specs)


def as_feed(model_or_specs: onnx.ModelProto | Sequence[InputSpec], x: FeedLike) -> Feed:
    """One input as a feed of the model's inputs, each array in its declared dtype (contiguous).

    A single array is taken for a model with one input. A feed must name every input and nothing
    else; its arrays are cast to the declared dtype within their kind (float64 to float32, int32 to
    int64), while a cast across kinds (float to int) or a shape against a fixed dimension is a DataError.
    """
    specs = _specs(model_or_specs)
    names = [s.name for s in specs]
    if not isinstance(x, Mapping):
        if len(specs) != 1:
            raise DataError(f"An input given as one array feeds a model with exactly one input, this one has "
                            f"{len(specs)} ({', '.join(map(repr, names))}); give feeds {{name: array}}.")
        x = {specs[0].name: x}
    unknown = [k for k in x if k not in names]
    missing = [n for n in names if n not in x]
    if unknown or missing:
        parts = ([f"names {', '.join(map(repr, unknown))}, which the model does not take"] if unknown else []) + (
            [f"lacks {', '.join(map(repr, missing))}"] if missing else [])
        raise DataError(f"A feed {' and '.join(parts)}; the model's inputs are {', '.join(map(repr, names))}.")
    feed: Feed = {}
    for spec in specs:
        value = np.asarray(x[spec.name])
        if value.dtype != spec.dtype:
            if not np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
                raise DataError(f"The input given for {spec.name!r} is {value.dtype.name}, the model takes "
                                f"{spec.dtype.name}; give it as {spec.dtype.name}.")
            value = value.astype(spec.dtype)
        if spec.shape is not None and (value.ndim != len(spec.shape) or any(
                want is not None and want != got for want, got in zip(spec.shape, value.shape))):
            raise DataError(f"The input given for {spec.name!r} has shape {_fmt(value.shape)}, the model's input "
                            f"is {_fmt(spec.shape)}; give inputs of the model's shape.")
        feed[spec.name] = np.ascontiguousarray(value)
    return feed


def as_feeds(model_or_specs: onnx.ModelProto | Sequence[InputSpec], inputs: Sequence[FeedLike] | None) -> list[Feed]:
    """:func:`as_feed` of each input (arrays and feeds may be mixed)."""
    specs = _specs(model_or_specs)
    return [as_feed(specs, x) for x in (inputs or [])]


class UnsizedInputError(UnsupportedModelError):
    """An input dimension random feeds cannot be given a size for; `which` names it ("Input 'x' has a dynamic
    dimension 2 ('h')"), for callers that advise otherwise than the surgery does."""

    def __init__(self, which: str, how: str) -> None:
        super().__init__(f"{which}, so no random inputs can be made for it; {how}.")
        self.which = which


def _dynamic(spec: InputSpec, i: int | None, specs: Sequence[InputSpec]) -> UnsizedInputError:
    what = "has no declared shape" if i is None else (
        f"has a dynamic dimension {i}" + (f" ({spec.symbols[i]!r})" if spec.symbols[i] else ""))
    if len(specs) == 1 and spec.dtype.kind == "f" and (spec.shape is None or len(spec.shape) == 4):
        how = ("verify it on real inputs (--data SPEC) or give random ones a size (--input-shape C,H,W or --dim "
               "NAME=SIZE; compress(sizes={name: size}) from Python)")
    else:
        how = ("give its size (--dim NAME=SIZE; compress(sizes={name: size}) from Python), or real feeds "
               "{name: array} from Python (--data feeds only a model with one float image input, which this is not)")
    return UnsizedInputError(f"Input {spec.name!r} {what}", how)


def _shapes(specs: Sequence[InputSpec], real: Feed | None, batch: int,
            given: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Each input's concrete shape for random feeds: fixed dims as declared, leading dims and their
    names ``batch``, other dynamic dims from ``given`` (symbol -> size), else from the first real feed (by
    name across inputs)."""
    sizes: dict[str, int] = dict(given or {})
    for s in specs:
        if s.shape and s.shape[0] is None and s.symbols[0] and s.symbols[0] not in sizes:
            sizes[s.symbols[0]] = batch
    for s in specs:
        x = real.get(s.name) if real else None
        if x is None or s.shape is None or x.ndim != len(s.shape):
            continue
        for i, (d, sym) in enumerate(zip(s.shape, s.symbols)):
            if d is None and i > 0 and sym and sym not in sizes:
                sizes[sym] = int(x.shape[i])
    shapes = {}
    for s in specs:
        x = real.get(s.name) if real else None
        if s.shape is None:
            if x is None:
                raise _dynamic(s, None, specs)
            shapes[s.name] = tuple(int(n) for n in x.shape)
            continue
        dims = []
        for i, (d, sym) in enumerate(zip(s.shape, s.symbols)):
            if d is not None:
                dims.append(d)
            elif i == 0:
                dims.append(sizes.get(sym, batch) if sym else batch)
            elif sym and sym in sizes:
                dims.append(sizes[sym])
            elif x is not None and x.ndim == len(s.shape):
                dims.append(int(x.shape[i]))
            else:
                raise _dynamic(s, i, specs)
        shapes[s.name] = tuple(dims)
    for name, shape in shapes.items():
        count = math.prod(shape)
        if count > MAX_RANDOM_ELEMENTS:
            raise UnsupportedModelError(
                f"Input {name!r} would be {_fmt(shape)} = {count} elements per random input, over the limit of "
                f"{MAX_RANDOM_ELEMENTS}; a declared shape that large cannot be verified with random inputs.")
    return shapes


def check_verifiable(model: onnx.ModelProto, real: Sequence[FeedLike] | None = None,
                     *, batch: int = 2, sizes: Mapping[str, int] | None = None) -> tuple[InputSpec, ...]:
    """Refuse, before any surgery pass runs, a model whose verification could not run.

    UnsupportedModelError for an input or output type that cannot be fed or read, or a dynamic
    dimension that no real input sizes; DataError for real inputs that do not fit the model. Returns
    the inputs' description.
    """
    specs = describe_inputs(model)
    _check_outputs(model)
    feeds = as_feeds(specs, real)
    _shapes(specs, feeds[0] if feeds else None, batch, sizes)
    return specs


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """One random input of ``dtype``: standard normal floats, integers in [0, INT_HIGH), coin-flip bools."""
    if dtype.kind == "f":
        if dtype == np.float64:
            return np.asarray(rng.standard_normal(shape))
        return np.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype, copy=False)
    if dtype.kind in "iu":
        return np.asarray(rng.integers(0, INT_HIGH, size=shape, dtype=dtype))
    return np.asarray(rng.integers(0, 2, size=shape, dtype=np.uint8)).astype(np.bool_)


def random_batches(
    model: onnx.ModelProto,
    real: Sequence[FeedLike] | None = None,
    *,
    n_random: int = 4,
    batch: int = 2,
    seed: int = 0,
    sizes: Mapping[str, int] | None = None,
) -> list[Feed]:
    """``n_random`` seeded random feeds, every input in its declared dtype and shape (module docstring).

    A symbolic batch dimension becomes ``batch``; any other symbolic dimension is taken from ``sizes``
    (symbol -> size), else from the first real input, and without either the model cannot be verified
    (UnsupportedModelError).
    The stream is the one :func:`sslcompress.surgery.verify.compare` draws.
    """
    if n_random <= 0:
        return []
    specs = describe_inputs(model)
    given = as_feeds(specs, real)
    shapes = _shapes(specs, given[0] if given else None, batch, sizes)
    rng = np.random.default_rng(seed)
    return [{s.name: random_array(rng, s.dtype, shapes[s.name]) for s in specs} for _ in range(n_random)]


def _image_input(model: onnx.ModelProto) -> InputSpec:
    """The one float image input real images feed; DataError for any other model."""
    specs = describe_inputs(model)
    if len(specs) == 1 and specs[0].dtype.kind == "f":
        spec = specs[0]
        if spec.shape is None or len(spec.shape) != 4:
            rank = "an undeclared number of" if spec.shape is None else str(len(spec.shape))
            raise DataError(
                f"Real images have the shape (N, C, H, W), but the model's input {spec.name!r} has {rank} "
                f"dimensions ({_fmt(spec.shape or ())}).")
        return spec
    raise DataError(
        "Real images (--data) feed a model with exactly one float image input, but this one takes "
        + (", ".join(s.describe() for s in specs) or "no input") + ".")


def declared_shape(model: onnx.ModelProto) -> tuple[int | None, ...]:
    """The single input's declared shape, None for each symbolic or unknown dimension (() if undeclared)."""
    specs = describe_inputs(model)
    if len(specs) != 1:
        names = f" ({', '.join(repr(s.name) for s in specs)})" if specs else ""
        raise UnsupportedModelError(f"A single input shape needs a model with exactly one input, this one has "
                                    f"{len(specs)}{names}.")
    return specs[0].shape if specs[0].shape is not None else ()


def with_input_size(model: onnx.ModelProto, dims: Sequence[int], flag: str = "--input-shape") -> onnx.ModelProto:
    """A copy of the model whose single input has `dims` after its batch dimension (in the model's own order:
    C,H,W, or H,W,C for a channels-last input): a model exported with a dynamic height and width, fixed at one
    size. A declared size it contradicts, or a rank it lacks, is one sentence (ConfigError)."""
    name = _check_input_size(model, dims, flag)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    value = next(v for v in out.graph.input if v.name == name)
    for d, want in zip(list(value.type.tensor_type.shape.dim)[1:], dims, strict=True):
        d.Clear()
        d.dim_value = int(want)
    del out.graph.value_info[:]  # intermediate shapes of the dynamic model: inferred again from the fixed input
    return out


def _check_input_size(model: onnx.ModelProto, dims: Sequence[int], flag: str) -> str:
    """The single input's name, where `dims` fit its rank and declared sizes after the batch; one sentence
    (ConfigError) where they do not."""
    from ..errors import ConfigError

    shape = declared_shape(model)
    name = describe_inputs(model)[0].name
    shown = "x".join("?" if d is None else str(d) for d in shape[1:])
    if len(shape) != len(dims) + 1:
        raise ConfigError(f"{flag} {'x'.join(map(str, dims))} gives {len(dims)} sizes, but input {name!r} has "
                          f"{max(len(shape) - 1, 0)} after its batch ({shown or 'no shape'})")
    if any(have is not None and have != want for have, want in zip(shape[1:], dims, strict=True)):
        raise ConfigError(f"{flag} {'x'.join(map(str, dims))} does not fit input {name!r}, which is {shown}")
    return name


def set_symbol_sizes(model: onnx.ModelProto, sizes: Mapping[str, int]) -> bool:
    """Give the inputs' dimensions named in `sizes` those sizes, in place, and drop the intermediate shapes
    inferred for the dynamic model where any changed (to be inferred again); whether any did."""
    touched = False
    for value in model.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in sizes:
                d.dim_value = int(sizes[d.dim_param])  # the oneof drops the name
                touched = True
    if touched:
        del model.graph.value_info[:]
    return touched


def check_dim_names(model: onnx.ModelProto, names: Sequence[str], flag: str = "--dim") -> None:
    """One sentence (ConfigError) for a name no input's dimension has, listing the inputs' dimensions."""
    from ..errors import ConfigError

    specs = describe_inputs(model)
    named = {sym for s in specs for sym in s.symbols if sym}
    unknown = [n for n in names if n not in named]
    if unknown:
        dims = ", ".join(f"{s.name!r} [{', '.join(sym or ('?' if d is None else str(d)) for sym, d in zip(s.symbols, s.shape or ()))}]"
                         for s in specs)
        raise ConfigError(f"{flag} {unknown[0]}: no input has a dimension of that name (the model's inputs: {dims})")


def with_named_sizes(model: onnx.ModelProto, sizes: Mapping[str, int], flag: str = "--dim") -> onnx.ModelProto:
    """A copy of the model whose inputs have the dimensions named in `sizes` fixed at those sizes (a transformer's
    sequence length, a detector's height and width), wherever they appear; a name no input has is one sentence
    (ConfigError)."""
    check_dim_names(model, list(sizes), flag)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    set_symbol_sizes(out, sizes)
    return out


def input_size_symbols(model: onnx.ModelProto, dims: Sequence[int], flag: str = "--input-shape") -> dict[str, int]:
    """The sizes `dims` (after the batch, in the model's order) give the single input's symbolic dimensions, for
    random inputs of that size while the model keeps them dynamic; a declared size they contradict, or a rank
    they lack, is one sentence (ConfigError)."""
    from ..errors import ConfigError

    _check_input_size(model, dims, flag)
    spec = describe_inputs(model)[0]
    out = {}
    for sym, d, want in zip(spec.symbols[1:], (spec.shape or ())[1:], dims, strict=True):
        if d is not None:
            continue
        if not sym:
            raise ConfigError(f"{flag}: input {spec.name!r} has an unnamed dynamic size, which random inputs cannot "
                              "be given; verify it on real inputs (--data)")
        if out.get(sym, want) != want:
            raise ConfigError(f"{flag} gives {sym!r} two sizes ({out[sym]} and {want})")
        out[sym] = int(want)
    return out


def real_inputs(model: onnx.ModelProto, spec: str, *, limit: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Up to ``limit`` test images of data set ``spec``, normalized as in training, in batches the model takes.

    The model must take exactly one float image input (DataError otherwise); images come in its
    dtype. A static batch dimension B gives batches of exactly B images (a short remainder is
    dropped); a dynamic one gives batches of up to REAL_BATCH. An input of (batch, H, W, C) gets
    them channels last. Images of another shape than the model's input raise DataError:
    verification compares functions, it does not resize.
    """
    from ..data import load_data
    from ..data.layout import image_layout, to_layout

    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise DataError(f"The number of real images must be a positive integer, got {limit!r}.")
    image = _image_input(model)
    shape = image.shape
    assert shape is not None  # _image_input checked it
    name = image.name
    data = load_data(spec, limit_test=limit, seed=seed)
    images = tuple(int(d) for d in data.x_test.shape[1:])
    layout = image_layout(images, shape[1:])
    if layout is None:
        raise DataError(
            f"Data set {data.name} has {_fmt(images)} images but the model's input {name!r} is "
            f"{_fmt(shape[1:])} (CxHxW, or HxWxC channels last); give images of the model's input shape."
        )
    n = int(data.x_test.shape[0])
    static_batch = shape[0]
    if static_batch is not None and n < static_batch:
        raise DataError(
            f"The model takes batches of exactly {static_batch} images, but only {n} real images were loaded "
            f"from {data.name}; raise the limit or export with a dynamic batch."
        )
    size = static_batch if static_batch is not None else min(REAL_BATCH, n)
    return [to_layout(x.numpy(), layout).astype(image.dtype, copy=False)
            for x, _ in data.batches("test", size, drop_last=static_batch is not None)]
