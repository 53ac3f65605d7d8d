"""Atomic writes: a temporary file in the target folder, then a rename, so no reader ever sees half a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _atomic(path: str | Path, write, mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_json(obj: Any, path: str | Path) -> None:
    _atomic(path, lambda f: json.dump(obj, f, indent=2), "w")


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    _atomic(path, lambda f: f.write(data), "wb")


def _same_file_key(path: str | Path) -> Any:
    """What identifies a file: its inode when it exists (hard links, symlinks), else its resolved path."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError:
        return ("path", str(p))
    return ("inode", st.st_dev, st.st_ino)


def check_distinct_paths(outputs: Sequence[tuple[str, str | Path | None]],
                         inputs: Sequence[tuple[str, str | Path | None]] = ()) -> None:
    """Refuse one file in two roles: an output that is an input or another output (symlinks resolved).

    Each entry is (the option's name, the path or None); inputs may share a file with each other.
    Raises ConfigError naming both options and the path, before anything is read or written.
    """
    from .errors import ConfigError

    seen: dict[Any, str] = {}
    for role, path in inputs:
        if path is not None:
            seen.setdefault(_same_file_key(path), role)
    for role, path in outputs:
        if path is None:
            continue
        key = _same_file_key(path)
        if key in seen:
            raise ConfigError(f"{seen[key]} and {role} are the same file ({path}); "
                              "give each its own path so no file is overwritten")
        seen[key] = role


def atomic_write_group(items: Sequence[tuple[str | Path, bytes]]) -> None:
    """Write several files all-or-nothing: every one to a temporary file in its own folder first, then
    rename them together. If a write fails, every temporary file is removed and every old file stays."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:  # name the output the user gave, not our temporary file
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
