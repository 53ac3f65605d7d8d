"""Latency as a budget: a per-layer latency table measured in ONNX Runtime, and a predictor over it.

    key = current_key(provider="cpu", threads=1, batch=1)     what the table's figures hold for
    table = profile_model(model, input_shape, key)            measure what the cached table lacks
    save_table(table, default_path(key))                      ~/.cache/sslcompress/latency/<slug>-<hash>.json
    predict(table, structure, count)                          ms of the compact model a count describes

Modules: key (the machine and runtime a table holds for, its cache path), signature (what fixes a layer's
speed apart from its widths, and the width grid), ops (one-node ONNX models), table (the table and its JSON),
profile (measuring), predict (bilinear interpolation and the whole-model calibration).
"""

from __future__ import annotations

from .key import TableKey, current_key, default_path
from .predict import predict, predict_dense
from .profile import ProfileEvent, load_or_new, profile_model
from .signature import Signature, default_step, signatures_of, width_grid
from .table import LatencyTable, load_table, save_table

__all__ = [
    "LatencyTable", "ProfileEvent", "Signature", "TableKey", "current_key", "default_path", "default_step",
    "load_or_new", "load_table", "predict", "predict_dense", "profile_model", "save_table", "signatures_of",
    "width_grid",
]
