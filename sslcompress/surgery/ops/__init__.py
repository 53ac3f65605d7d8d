"""One rule per ONNX op type: forward channel states, coupling, backward needs and the rewrite."""

from __future__ import annotations

from . import elementwise, layers, pooling, shape  # noqa: F401  (registration)
from .base import (  # noqa: F401
    CONSTANT,
    LIVE,
    ZERO,
    Channels,
    OpRule,
    attr_value,
    channel_count,
    const_array,
    handled_ops,
    rule_for,
)
