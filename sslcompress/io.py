"""Files written whole or not at all, and the litter a killed process leaves behind cleared.

Atomic writes: a temporary file in the target folder, then a rename, so no reader ever sees half a file.
Temporary files and folders carry the writer's process id (`.NAME.PID.XXXX.tmp`), so whoever writes the same
output next removes those of processes that no longer run (a SIGKILL leaves them; nothing else does).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporary files of dead writers in `folder` (of output `name` only, when given)."""
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_FILE.match(entry.name)
        if m is None or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def _temp_for(path: Path) -> tuple[int, str]:
    remove_stale_temps(path.parent, path.name)
    return tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)


def _write_temp(path: Path, write, mode: str) -> Path:
    """`write(file)` into a temporary file beside `path`, synced, with the mode a plain open() would give;
    returns its path. On failure the temporary file is gone and an OSError names `path`, not it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_for(path)
    try:
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # name the output the user gave, not our temporary file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _atomic(path: str | Path, write, mode: str) -> None:
    path = Path(path)
    tmp = _write_temp(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    # Serialised in memory first: torch's zip writer turns a failed write (a full disk) into a RuntimeError
    # that hides the errno; a plain write of the bytes raises the OSError the CLI reports in one line.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic(path, lambda f: f.write(buffer.getbuffer()), "wb")


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
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in items:
            path = Path(path)
            temps.append((_write_temp(path, lambda f, data=data: f.write(data), "wb"), path))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise


_TEMP_DIR = re.compile(r"^(?P<prefix>.+)-(?P<pid>\d+)-[^-]+$")


@contextlib.contextmanager
def private_temp_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder `PREFIX-PID-XXXX`, removed on exit; folders of the same prefix whose process is gone
    (killed before it could clean up) are removed first."""
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            m = _TEMP_DIR.match(entry.name)
            if m and m["prefix"] == prefix and entry.is_dir() and not _alive(int(m["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


LOCK_NAME = ".sslcompress.lock"


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder` for one run: a second run into the same folder is refused while this one lives.

    An advisory lock (flock) on FOLDER/.sslcompress.lock: the kernel drops it when the process dies, however it
    dies, so a killed run never blocks the next. The file is removed when the run ends.
    """
    from .errors import ConfigError

    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not guarded against each other there
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"another sslcompress run (process {holder}) is writing to {folder}; wait for it "
                              "to finish or give another --out") from None
        # The holder before us may have removed the file between our open and our lock: lock the file that is
        # there now, or try again.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        remove_stale_temps(folder)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:  # a run refused before it wrote anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
