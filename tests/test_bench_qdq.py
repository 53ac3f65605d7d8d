"""The bench on a quantized (QDQ) model: weights counted through DequantizeLinear, and an unstructured
variant it cannot build is refused in one sentence, never reported as zero weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_qdq_surgery import _qdq_net

from sslcompress.bench.variants import build_variants, layer_nonzeros, nonzero_weights
from sslcompress.errors import ConfigError
from sslcompress.surgery.compress import compress


def _dequantized_nonzeros(proto: onnx.ModelProto, layer: str) -> int:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    q, zp = inits[f"{layer}.wq"].astype(np.int64), inits[f"{layer}.wzp"].astype(np.int64)
    return int(np.count_nonzero(q - zp.reshape((-1,) + (1,) * (q.ndim - 1))))


def test_quantized_weights_are_counted_as_their_values():
    proto = _qdq_net()
    counts = layer_nonzeros(proto)
    assert counts == {name: _dequantized_nonzeros(proto, name) for name in ("c0", "c1", "fc")}
    assert counts["c0"] <= 6 * 27 and counts["c1"] <= 6 * 72  # two zero filters each
    assert nonzero_weights(proto) == sum(counts.values()) > 0
    cut = compress(proto).model
    assert nonzero_weights(cut) <= nonzero_weights(proto)
    assert layer_nonzeros(cut)["c0"] == counts["c0"]  # the zero filters held no nonzero weight


def test_the_unstructured_variant_of_a_quantized_model_is_refused(tmp_path):
    path = tmp_path / "qdq.onnx"
    onnx.save(_qdq_net(), str(path))
    with pytest.raises(ConfigError, match="quantized weights.*--unstructured"):
        build_variants(path)
    # Given by hand, it is taken as it is.
    variants = build_variants(path, unstructured=path)
    assert variants.structured.model.graph.node and variants.unstructured.model is not None
