"""Predicted against measured: the compact model an export wrote, timed in the session its latency budget
was predicted for, beside the uncut model in the same rounds (so the machine's drift falls on both)."""

from __future__ import annotations

from typing import Any

import onnx

from .key import TableKey, current_key
from .profile import time_sessions

ROUNDS = 20


def batch_fits(proto: onnx.ModelProto, batch: int) -> bool:
    """Whether the model's first input takes `batch` images (a dynamic batch, or that static one)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return bool(dims) and (not dims[0].HasField("dim_value") or dims[0].dim_value == batch)


def other_host(latency: dict[str, Any], here: TableKey) -> str | None:
    """How the host the row's table was profiled on differs from this one (CPU, cores, ORT, channel block), or
    None where they agree or the row does not say (a checkpoint older than the key in its row)."""
    if not latency.get("table_key"):
        return None
    there = TableKey.from_dict(latency["table_key"])
    fields = (("machine", "CPU"), ("cpus", "cores"), ("ort_version", "onnxruntime"), ("block", "channel block"))
    differ = [f"{label} {getattr(there, f)} there, {getattr(here, f)} here" for f, label in fields
              if getattr(there, f) != getattr(here, f)]
    return "; ".join(differ) or None


def measure_against_prediction(uncut: onnx.ModelProto, compact: onnx.ModelProto, latency: dict[str, Any],
                               input_shape: tuple[int, ...], rounds: int = ROUNDS) -> dict[str, Any]:
    """`latency` is a finetune report's latency row (session, dense and predicted ms). Returns the row with
    the measured ms of both models and predicted over measured, absolute and relative to the dense model; a
    note where the table is another host's (the comparison is then across machines), or instead of the figures
    where this onnxruntime cannot run the row's provider (the export itself does not depend on it)."""
    from ..runtime.providers import ProviderUnavailableError

    key = current_key(latency["provider"], latency["threads"], latency["batch"])
    x_shape = (latency["batch"], *input_shape[1:])
    try:
        ms = time_sessions({"uncut": uncut, "compact": compact}, x_shape, key, rounds)
    except ProviderUnavailableError as exc:
        return {**latency, "note": f"not measured: {str(exc).split(';')[0]}"}
    predicted, dense = latency["predicted_ms"], latency["dense_ms"]
    row = {**latency, "measured_ms": ms["compact"], "uncut_measured_ms": ms["uncut"],
           "predicted_over_measured": predicted / ms["compact"],
           # Drift since profiling cancels: the prediction's share of the dense prediction against the measured
           # share of the uncut model timed in the same rounds.
           "relative_predicted_over_measured": (predicted / dense) / (ms["compact"] / ms["uncut"])}
    differ = other_host(latency, key)
    if differ:
        row["note"] = f"the table was profiled on another host ({differ}): predicted and measured are two machines'"
    return row
