"""One rule per ONNX op type: forward channel states, coupling, backward needs and the rewrite."""

from __future__ import annotations

# attention imports layers and shape itself, so its MatMul and Reshape rules are registered after theirs (and win).
from . import (  # noqa: F401
    attention,
    dims,
    elementwise,
    fused_attention,
    layers,
    layout,
    normalization,
    pooling,
    quant,
    shape,
)
from .base import (  # noqa: F401
    CONSTANT,
    LIVE,
    ZERO,
    Channels,
    Decline,
    Keep,
    OpRule,
    PassThrough,
    attr_value,
    channel_axis,
    channel_count,
    const_array,
    handled_ops,
    register,
    register_rule,
    rule_for,
)
from .elementwise import Unary  # noqa: F401
