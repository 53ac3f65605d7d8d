"""The key of a latency table: the machine, runtime and session settings its figures hold for.

A table file holds one key. Its default place is the user's cache,
``~/.cache/sslcompress/latency/<slug>-<hash>.json`` (``$SSLCOMPRESS_CACHE_DIR/latency/...`` where that is
set): the slug makes the file readable in a listing, the short hash of the whole key keeps two machines whose
slugs agree (the same CPU model, other core counts) apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..runtime.cpu import cpu_model
from .block import nchwc_block

CACHE_ENV = "SSLCOMPRESS_CACHE_DIR"


@dataclass(frozen=True)
class TableKey:
    """What a latency depends on apart from the layer: CPU, core count, ORT version, provider, threads, batch,
    and the channel block of ORT's blocked convs on this CPU (block.py: two hosts with one CPU name can differ)."""

    machine: str
    cpus: int
    ort_version: str
    provider: str
    threads: int
    batch: int
    block: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableKey:
        try:
            return cls(str(d["machine"]), int(d["cpus"]), str(d["ort_version"]), str(d["provider"]),
                       int(d["threads"]), int(d["batch"]), int(d["block"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a latency table key needs machine, cpus, ort_version, provider, threads, batch "
                              f"and block ({exc})") from exc

    def digest(self) -> str:
        """A short hash of every field: two keys share a file only when they are equal."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def slug(self) -> str:
        """A readable file name stem: CPU, provider, threads, batch and ORT version."""
        cpu = re.sub(r"\((?:R|TM)\)|\bCPU\b|@.*$", "", self.machine, flags=re.IGNORECASE)
        cpu = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")[:40] or "cpu"
        return f"{cpu}-{self.provider}-t{self.threads}-b{self.batch}-ort{self.ort_version}"


def current_key(provider: str = "cpu", threads: int = 1, batch: int = 1) -> TableKey:
    """The key of this machine and onnxruntime for the given session settings."""
    import onnxruntime as ort

    if provider not in ("cpu", "cuda"):
        raise ConfigError(f"unknown provider {provider!r}; choose from cpu, cuda")
    for name, value in (("threads", threads), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return TableKey(cpu_model(), os.cpu_count() or 1, ort.__version__, provider, threads, batch,
                    nchwc_block(provider))


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "sslcompress"
    return base / "latency"


def default_path(key: TableKey, folder: str | Path | None = None) -> Path:
    """Where the table of `key` lives: in `folder` if given, else in the cache."""
    where = Path(folder) if folder is not None else cache_dir()
    return where / f"{key.slug()}-{key.digest()}.json"
