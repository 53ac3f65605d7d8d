"""Sizes given on the command line: --input-shape (C,H,W or CxHxW) and --dim NAME=SIZE, one clear error each."""

from __future__ import annotations


def parse_sizes(text: str, count: int | None = None, flag: str = "--input-shape") -> tuple[int, ...]:
    """Positive sizes separated by ',' or 'x' (e.g. 3,640,640 or 3x32x32); `count` of them where it is given."""
    from ..errors import ConfigError

    try:
        values = tuple(int(p.strip()) for p in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1 or (count is not None and len(values) != count):
        want = "three positive integers C,H,W such as 3,32,32" if count == 3 else \
            f"{count} positive sizes" if count else "positive sizes such as 3,640,640"
        raise ConfigError(f"{flag} wants {want}, got {text!r}")
    return values


def named_sizes(given: tuple[str, ...], flag: str = "--dim") -> tuple[tuple[str, int], ...]:
    """Each NAME=SIZE as (name, size)."""
    from ..errors import ConfigError

    out = []
    for text in given:
        name, _, size = text.partition("=")
        try:
            value = int(size)
        except ValueError:
            value = 0
        if not name.strip() or value < 1:
            raise ConfigError(f"{flag} wants NAME=SIZE with a positive size, got {text!r}")
        out.append((name.strip(), value))
    return tuple(out)
