"""The forms of one model that the bench times side by side, found or built: three always, two more with --int8.

    dense         RUN/pretrained.pt exported; else the sparse checkpoint exported as it is (zeros inside)
    structured    the compact model: the surgery of the sparse checkpoint's export (zero channels deleted)
    unstructured  the dense model with as many nonzero weights as the structured model, layer by layer:
                  each Conv/ConvTranspose/Gemm/MatMul keeps its largest-magnitude weights, as many as the
                  structured model's layer of the same node name holds nonzero (a layer the surgery removed
                  keeps none); biases stay as they are
    dense-int8, structured-int8   (--int8, see int8.py) the dense and the structured model, each quantized
                  to INT8 (QDQ) by ORT's static quantization

Every model is exported with a dynamic batch, so one file serves every --batch. Any one of them can be
given as an ONNX file instead. A RUN_DIR_OR_CHECKPOINT may also be an ONNX file with exact zeros: it is
then the dense model, and its surgery the structured one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import CheckpointError, ConfigError, UnsupportedModelError, VerificationError
from ..magnitude import keep_largest

log = logging.getLogger(__name__)

DENSE, UNSTRUCTURED, STRUCTURED = "dense", "unstructured", "structured"
DENSE_INT8, STRUCTURED_INT8 = "dense-int8", "structured-int8"
VARIANTS = (DENSE, UNSTRUCTURED, STRUCTURED)  # what every bench of a model has
ORDER = (*VARIANTS, DENSE_INT8, STRUCTURED_INT8)  # how known variants are listed; others follow in their order
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Variant:
    name: str
    model: onnx.ModelProto
    source: str  # one phrase: where it came from
    quantized_from: str | None = None  # an INT8 variant: the name of the float variant it quantizes


@dataclass(frozen=True)
class LayerNonzeros:
    """One weight layer of the unstructured variant: what it kept, and the structured count it matches."""

    name: str
    op: str
    size: int  # weight elements of the dense layer
    dense: int  # nonzeros in the dense layer
    target: int  # nonzeros of the structured model's layer of this name (0: removed by the surgery)
    kept: int  # nonzeros now


@dataclass(frozen=True)
class VariantSet:
    """The variants in the order they are listed, dense first: every speed-up is over dense."""

    variants: tuple[Variant, ...]
    matching: tuple[LayerNonzeros, ...] = ()  # empty when --unstructured was given
    unmatched: tuple[str, ...] = ()  # structured layers with no dense layer of their name

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if not names or names[0] != DENSE or len(set(names)) != len(names):
            raise ValueError(f"variants must be uniquely named with dense first, got {names}")

    def __iter__(self):
        return iter(self.variants)

    def __len__(self) -> int:
        return len(self.variants)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants)

    def get(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def plus(self, *more: Variant) -> VariantSet:
        """The same set with `more` listed after the others."""
        return replace(self, variants=(*self.variants, *more))

    @property
    def dense(self) -> Variant:
        return self.get(DENSE)

    @property
    def unstructured(self) -> Variant:
        return self.get(UNSTRUCTURED)

    @property
    def structured(self) -> Variant:
        return self.get(STRUCTURED)


# ---------------------------------------------------------------- weights of a model
def weight_layers(proto: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """{node name: (op type, weight initializer name)} for nodes that multiply by a constant weight.

    A MatMul whose left operand is the constant (a conv lowered to im2col + MatMul by the surgery) counts too.
    """
    inits = {t.name for t in proto.graph.initializer}
    out: dict[str, tuple[str, str]] = {}
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        name = node.name or node.output[0]
        if node.input[1] in inits:
            out[name] = (node.op_type, node.input[1])
        elif node.op_type == "MatMul" and node.input[0] in inits:
            out[name] = (node.op_type, node.input[0])
    return out


def _arrays(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def _weight_values(proto: onnx.ModelProto) -> dict[str, tuple[object, np.ndarray]]:
    """{node name: (the weight's value, its numbers)} for every layer with a constant weight, read as
    the surgery reads it: an initializer, a Constant node, or a DequantizeLinear of constants (a QDQ
    model's weight, as the float values ONNX Runtime computes)."""
    import onnx_ir as ir

    from ..surgery.ops.base import const_tensor

    model = ir.serde.deserialize_model(proto)
    out: dict[str, tuple[object, np.ndarray]] = {}
    for node in model.graph:
        if node.op_type not in WEIGHT_OPS or len(node.inputs) < 2 or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.outputs[0].name
        for v in ((node.inputs[1], node.inputs[0]) if node.op_type == "MatMul" else (node.inputs[1],)):
            arr = const_tensor(v)
            if arr is not None:
                out[name] = (v, np.asarray(arr))
                break
    return out


def quantized_layers(proto: onnx.ModelProto) -> list[str]:
    """Layers whose weight is a DequantizeLinear of constants (a QDQ model)."""
    inits = {t.name for t in proto.graph.initializer}
    made_by = {o: n for n in proto.graph.node for o in n.output}
    found = []
    for node in proto.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] not in inits:
            producer = made_by.get(node.input[1])
            if producer is not None and producer.op_type == "DequantizeLinear":
                found.append(node.name or node.output[0])
    return found


def layer_nonzeros(proto: onnx.ModelProto) -> dict[str, int]:
    """Nonzero weights of each weight layer, by node name (biases not counted)."""
    return {name: int(np.count_nonzero(arr)) for name, (_, arr) in _weight_values(proto).items()}


def nonzero_weights(proto: onnx.ModelProto) -> int:
    """Nonzero weights over all weight layers, each shared weight counted once."""
    unique = {id(v): arr for v, arr in _weight_values(proto).values()}
    return int(sum(np.count_nonzero(arr) for arr in unique.values()))


def magnitude_match(dense: onnx.ModelProto, structured: onnx.ModelProto
                    ) -> tuple[onnx.ModelProto, tuple[LayerNonzeros, ...], tuple[str, ...]]:
    """The unstructured variant: dense weights pruned by magnitude, per layer, to the structured nonzero counts.

    Returns (model, per-layer counts, names of structured layers no dense layer matched).
    """
    target = layer_nonzeros(structured)
    out = _own_weights(dense)
    dense_layers = weight_layers(out)
    missing = sorted(set(target) - set(dense_layers))
    if missing:
        raise ConfigError("the structured model has layers the dense model has no layer (node) of that name for ("
                          + ", ".join(missing[:5]) + ("..." if len(missing) > 5 else "") + "), so the unstructured"
                          " variant cannot be matched to it layer by layer; give --unstructured too")
    inits = _arrays(out)
    per_init = {w: target.get(name, 0) for name, (_, w) in dense_layers.items()}
    pruned: dict[str, np.ndarray] = {}
    before: dict[str, int] = {}
    for w, k in per_init.items():
        arr = numpy_helper.to_array(inits[w])
        before[w] = int(np.count_nonzero(arr))
        pruned[w] = keep_largest(arr, k)
        inits[w].CopyFrom(numpy_helper.from_array(pruned[w].astype(arr.dtype), w))
    rows = tuple(LayerNonzeros(name, op, int(pruned[w].size), before[w], target.get(name, 0),
                               int(np.count_nonzero(pruned[w])))
                 for name, (op, w) in dense_layers.items())
    unmatched = tuple(sorted(set(target) - set(dense_layers)))
    short = [r.name for r in rows if r.kept < r.target]
    if short:
        log.warning("dense layers with fewer nonzeros than the structured model's: %s", ", ".join(short))
    return out, rows, unmatched


def lift_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes holding a tensor become initializers: every count here reads initializers."""
    if not any(n.op_type == "Constant" for n in proto.graph.node):
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    keep = []
    for node in out.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None:
            keep.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value.t)
        tensor.name = node.output[0]
        out.graph.initializer.append(tensor)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def _own_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which no two weight layers share an initializer, so each can keep its own count."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = _arrays(out)
    seen: set[str] = set()
    for node in out.graph.node:
        name = node.name or node.output[0]
        layer = weight_layers(out).get(name)
        if layer is None:
            continue
        w = layer[1]
        if w not in seen:
            seen.add(w)
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[w])
        copy.name = f"{w}.{name}"
        out.graph.initializer.append(copy)
        idx = list(node.input).index(w)
        node.input[idx] = copy.name
    return out


# ---------------------------------------------------------------- finding and building
@dataclass(frozen=True)
class Sources:
    """What a RUN_DIR_OR_CHECKPOINT holds."""

    sparse: Path | None  # a checkpoint whose export is cut into the structured model
    pretrained: Path | None  # the dense checkpoint, when there is one
    onnx: Path | None  # an uncut ONNX model given as the target
    unstructured: Path | None = None  # the trained unstructured baseline of a run folder, when there is one


def find_sources(target: str | Path | None) -> Sources:
    if target is None:
        return Sources(None, None, None)
    p = Path(target)
    if not p.exists():
        raise CheckpointError(f"{p} not found: give a run folder (with sparse.pt), a checkpoint or an ONNX file")
    if p.is_dir():
        sparse, pre = p / "sparse.pt", p / "pretrained.pt"
        if not sparse.is_file():
            raise CheckpointError(f"{p} holds no sparse.pt (run `sslcompress finetune --out {p}` first), or give"
                                  " a checkpoint file")
        from ..finetune.unstructured import UNSTRUCTURED as BASELINE

        unstructured = p / BASELINE
        return Sources(sparse, pre if pre.is_file() else None, None,
                       unstructured if unstructured.is_file() else None)
    if p.suffix.lower() == ".onnx":
        return Sources(None, None, p)
    return Sources(p, None, None)


def _export_at(path: Path, input_size: tuple[int, ...] | None = None):
    """The checkpoint's model in ONNX, at its own input size or at `input_size` (C,H,W)."""
    from ..finetune.checkpoint import load_checkpoint
    from ..surgery.export import export_onnx

    ckpt = load_checkpoint(path)
    model = ckpt.build()
    if not input_size:
        return export_onnx(model, ckpt.model.input_shape, dynamic_batch=True).model, ckpt
    import torch

    try:  # one forward pass first: a size the model cannot take is one sentence, not an exporter's trace
        with torch.no_grad():
            model.eval()(torch.zeros((1, *input_size)))
    except Exception as exc:  # noqa: BLE001 - whatever the model's forward raises at that size
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"the model of {path} cannot run at --input-shape {'x'.join(map(str, input_size))}: "
                          f"{first}") from exc
    return export_onnx(model, (1, *input_size), dynamic_batch=True).model, ckpt


def fixed_sizes(proto: onnx.ModelProto, input_size: tuple[int, ...] | None, dims: dict[str, int] | None,
                flag: str | None = None) -> onnx.ModelProto:
    """The model with its input's sizes after the batch (`input_size`) and the named dimensions (`dims`) fixed, as
    --input-shape and --dim ask; a size that does not fit is one sentence naming `flag`'s model."""
    from ..surgery.inputs import with_input_size, with_named_sizes

    try:
        if dims:
            proto = with_named_sizes(proto, dims)
        if input_size is not None:
            proto = with_input_size(proto, input_size)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}" if flag else str(exc)) from exc
    return proto


def _check_static_size(model: onnx.ModelProto, what: str) -> None:
    """The surgery verifies its cut on random inputs, which need every size but the batch."""
    if not image_input(model):
        _check_feedable(what, model)
        return
    _refuse_dynamic_size(what, input_shape(model))


def _refuse_dynamic_size(what: str, shape: tuple[int | None, ...]) -> None:
    """One image size per variant: the surgery verifies its cut on random inputs of it, and every variant is
    timed at it."""
    if not shape or any(d is None for d in shape[1:]):
        raise ConfigError(f"{what} takes inputs of a dynamic size ({'x'.join('?' if d is None else str(d) for d in shape)}"
                          "); give --input-shape with the size to bench it at (e.g. 3,224,224, in the model's order)")


def _cut(uncut: onnx.ModelProto, what: str) -> onnx.ModelProto:
    from ..surgery.compress import compress

    result = compress(uncut)
    if not result.verification.passed:
        v = result.verification
        raise VerificationError(f"the surgery of {what} does not match it (max abs difference {v.max_abs:.3g});"
                                " no structured model to time")
    return result.model


def load_override(path: str | Path, flag: str | None = None) -> onnx.ModelProto:
    """An ONNX model the user named; `flag` is the option that named it, said in the error (a positional
    target needs no prefix: the message already names the file)."""
    from ..surgery.export import load_onnx

    try:
        return load_onnx(path)
    except UnsupportedModelError as exc:
        if flag is not None:
            raise UnsupportedModelError(f"{flag}: {exc}") from exc
        raise


def build_variants(target: str | Path | None = None, *, dense: str | Path | None = None,
                   unstructured: str | Path | None = None, structured: str | Path | None = None,
                   say=None, input_size: tuple[int, ...] | None = None,
                   dims: dict[str, int] | None = None) -> VariantSet:
    """The three variants of every bench; an override path wins over what the target would give.

    `say(message)` is told each step that takes a while (exports, the surgery). `input_size`: the sizes after
    the batch dimension (the model's order) every variant is fixed at, for models of a dynamic size;
    checkpoints are exported at it. `dims`: named input dimensions (a sequence length) fixed at a size likewise.
    """
    say = say or (lambda _msg: None)

    def sized(proto: onnx.ModelProto, flag: str | None = None) -> onnx.ModelProto:
        return fixed_sizes(proto, input_size, dims, flag)

    given = {DENSE: dense, UNSTRUCTURED: unstructured, STRUCTURED: structured}
    models: dict[str, Variant] = {}
    for name, path in given.items():
        if path is not None:
            models[name] = Variant(name, sized(load_override(path, f"--{name}"), f"--{name}"), f"given: {path}")
    src = find_sources(target)
    need_cut = STRUCTURED not in models
    need_uncut = need_cut or (DENSE not in models and src.pretrained is None)
    uncut: onnx.ModelProto | None = None
    uncut_what = ""
    if need_uncut:
        if src.onnx is not None:
            uncut, uncut_what = sized(load_override(src.onnx)), f"{src.onnx}"
            _check_static_size(uncut, uncut_what)
        elif src.sparse is not None:
            say(f"exporting {src.sparse}")
            uncut, ckpt = _export_at(src.sparse, input_size)
            uncut_what = f"{src.sparse} ({ckpt.kind} checkpoint of {ckpt.model.name})"
        else:
            raise ConfigError("give a run folder, a checkpoint or an ONNX model to bench, or all of --dense"
                              " and --structured (--unstructured is built from them when not given)")
    if need_cut:
        assert uncut is not None
        say(f"cutting the zero channels out of {uncut_what}")
        models[STRUCTURED] = Variant(STRUCTURED, _cut(uncut, uncut_what), f"surgery of {uncut_what}")
    if DENSE not in models:
        if src.pretrained is not None:
            say(f"exporting {src.pretrained}")
            proto, _ = _export_at(src.pretrained, input_size)
            models[DENSE] = Variant(DENSE, proto, f"{src.pretrained} exported")
        else:
            assert uncut is not None
            models[DENSE] = Variant(DENSE, uncut, f"{uncut_what} uncut" + ("" if src.onnx else ", exported"))
    models = {k: replace(v, model=lift_constants(v.model)) for k, v in models.items()}
    matching: tuple[LayerNonzeros, ...] = ()
    unmatched: tuple[str, ...] = ()
    if UNSTRUCTURED not in models and src.unstructured is not None:
        say(f"exporting {src.unstructured}")
        proto, _ = _export_at(src.unstructured, input_size)
        models[UNSTRUCTURED] = Variant(UNSTRUCTURED, lift_constants(proto),
                                       f"{src.unstructured}: the structured nonzeros per layer, placed by magnitude,"
                                       " then fine-tuned")
    if UNSTRUCTURED not in models:
        quantized = quantized_layers(models[DENSE].model)
        if quantized:
            raise ConfigError(
                f"the unstructured variant zeroes float weights by magnitude, but {len(quantized)} layers of the "
                f"dense model read quantized weights (QDQ, e.g. {quantized[0]!r}); give --unstructured PATH, "
                "or bench the float model")
        say("placing the unstructured zeros by magnitude")
        proto, matching, unmatched = magnitude_match(models[DENSE].model, models[STRUCTURED].model)
        models[UNSTRUCTURED] = Variant(UNSTRUCTURED, proto, "dense, pruned by magnitude per layer to the"
                                                            " structured nonzero counts")
    check_compatible(models)
    return VariantSet(tuple(models[name] for name in VARIANTS), matching, unmatched)


def input_shape(proto: onnx.ModelProto) -> tuple[int | None, ...]:
    """The declared shape of the model's first input (the only one of an image model; () where undeclared). Every
    input of a model with several carries the batch first."""
    from ..surgery.inputs import describe_inputs

    specs = describe_inputs(proto)
    if not specs:
        raise UnsupportedModelError("the model takes no input")
    return specs[0].shape or ()


def image_input(proto: onnx.ModelProto) -> bool:
    """Whether the model takes one float input (images): the bench feeds it one seeded standard normal array,
    and only it can be scored on a data set; any other model gets a feed of every input (random_feed)."""
    from ..surgery.inputs import describe_inputs

    specs = describe_inputs(proto)
    return len(specs) == 1 and specs[0].dtype.kind == "f"


def require_image_input(proto: onnx.ModelProto, needs: str) -> None:
    """What `needs` says (an option's work: "--data scores") is done on models of one image input only: for any
    other model, one sentence naming its inputs."""
    if image_input(proto):
        return
    from ..surgery.inputs import describe_inputs

    raise UnsupportedModelError(f"{needs} models that take one image input; these take "
                                + ", ".join(s.describe() for s in describe_inputs(proto)))


def random_feed(proto: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    """One seeded random value of every input, in its declared type (the surgery's verification rules: floats
    standard normal, integers in [0, 8), booleans by coin flips), at this batch."""
    from ..surgery.inputs import random_batches

    return random_batches(proto, n_random=1, batch=batch, seed=seed)[0]


def _check_feedable(who: str, proto: onnx.ModelProto) -> None:
    """A model with several inputs, or one that is not a float: every size but the batch must be known."""
    from ..surgery.inputs import UnsizedInputError

    try:
        random_feed(proto, 1, 0)
    except UnsizedInputError as exc:
        raise UnsupportedModelError(f"{who}: {exc.which}; the bench feeds random inputs of one size: give it with "
                                    "--dim NAME=SIZE") from exc


def check_compatible(models: dict[str, Variant]) -> None:
    """Inputs of one static size per sample (but the batch), the same inputs and outputs for every variant: one
    float input (images, float32 or float16), or any inputs the surgery's verification can feed."""
    from ..surgery.inputs import describe_inputs

    shapes, kinds, signatures = {}, {}, {}
    for name, v in models.items():
        try:
            specs = describe_inputs(v.model)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"the {name} model: {exc}") from exc
        signatures[name] = specs
        if not image_input(v.model):
            _check_feedable(f"the {name} model", v.model)
            continue
        shape = specs[0].shape or ()
        _refuse_dynamic_size(f"the {name} model", shape)
        shapes[name] = shape
        if specs[0].dtype not in (np.float32, np.float16):
            raise UnsupportedModelError(f"the {name} model's input is not float32 or float16; the bench times models"
                                        " that take float images")
        kinds[name] = specs[0].dtype.name
    if len(set(kinds.values())) > 1:
        raise ConfigError("the variants take inputs of different types: "
                          + ", ".join(f"{n} {k}" for n, k in kinds.items()) + "; compare models of one precision")
    outputs = {name: tuple(tuple(d.dim_value if d.HasField("dim_value") else None
                                 for d in o.type.tensor_type.shape.dim)[1:] for o in v.model.graph.output)
               for name, v in models.items()}
    if len(set(outputs.values())) > 1:
        raise ConfigError("the variants give different outputs (per image: "
                          + ", ".join(f"{n} {list(o)}" for n, o in outputs.items()) + "); they must compute the"
                          " same function to be compared")
    per_image = {name: s[1:] for name, s in shapes.items()}
    if len(set(per_image.values())) > 1:
        raise ConfigError("the variants take inputs of different shapes: "
                          + ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in per_image.items()))
    # An image model's single input may be named anything (each session is fed by its own input's name); a model of
    # several inputs is fed by name, so the names must agree too.
    per_sample = {name: ("image",) if name in shapes else
                  tuple((s.name, s.dtype.name, None if s.shape is None else s.shape[1:]) for s in specs)
                  for name, specs in signatures.items()}
    if len(set(per_sample.values())) > 1:
        raise ConfigError("the variants take different inputs: "
                          + "; ".join(f"{n} {', '.join(s.describe() for s in specs)}" for n, specs in signatures.items()))
