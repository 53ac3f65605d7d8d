"""The structures SSL can learn, by name: what options and recipes accept, without importing torch."""

from __future__ import annotations

from .errors import ConfigError

KINDS = ("filter", "channel", "shape", "depth", "kernel_row", "kernel_col", "neuron", "head")


def parse_kinds(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'filter,channel' -> ('filter', 'channel'); 'all' -> every kind."""
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",")]
    elif isinstance(text, (tuple, list)) and all(isinstance(t, str) for t in text):
        items = [t.strip() for t in text]
    else:
        raise ConfigError(f"structures must be names such as 'filter,channel' or a list of them, got {text!r}")
    if items == ["all"]:
        return KINDS
    bad = [t for t in items if t not in KINDS]
    if bad or not items:
        raise ConfigError(f"unknown group kind(s) {', '.join(bad) or '(none)'}; choose from {', '.join(KINDS)}")
    return tuple(dict.fromkeys(items))
