"""Peak memory of a model in ONNX Runtime, measured in a fresh process of its own.

One process per variant, because peak RSS is a per-process high-water mark: in the bench's own process it
would hold torch, the other variants' sessions and whatever ran before. The probe imports numpy and
onnxruntime, builds the input, resets the kernel's peak-RSS counter (Linux: /proc/self/clear_refs), then
creates the session (CPU provider, the given threads) and runs it `runs` times. Reported:

    baseline_bytes  RSS just before the session is created (Python, numpy, onnxruntime, the input)
    peak_bytes      the highest RSS while creating the session and running it
    growth_bytes    peak - baseline: what this model costs in host memory (weights after ORT's layout
                    transforms and pre-packing, the arena, the largest activations at this batch)

Where the peak cannot be reset (not Linux), the process's lifetime peak (ru_maxrss) stands in, which can
only overstate the peak. GPU memory is not measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import SSLCompressError


@dataclass(frozen=True)
class MemoryUse:
    baseline_bytes: int
    peak_bytes: int
    growth_bytes: int
    threads: int
    batch: int
    runs: int
    method: str  # "VmHWM after clear_refs" or "ru_maxrss"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryUse:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def measure(model_path: str | Path, shape: tuple[int, ...], *, threads: int, runs: int = 3,
            timeout: float = 300) -> MemoryUse:
    """Run the probe on one ONNX file in a new Python process, for an input of `shape` (batch first; just the
    batch for a model that is not one image input: a seeded value of each of its inputs)."""
    cmd = [sys.executable, "-m", "sslcompress.bench.memory", str(model_path), "x".join(map(str, shape)),
           str(threads), str(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(Path(__file__).resolve().parents[2]), preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired as exc:
        raise SSLCompressError(f"the memory probe of {model_path} ran past {timeout:.0f} s") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise SSLCompressError(f"the memory probe of {model_path} failed: {last}")
    return MemoryUse(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _die_with_parent() -> None:
    """In the child, before the probe starts: the kernel kills it when the bench dies (Linux), so a killed
    bench leaves no probe running on."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- the probe (runs in the child)
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _probe(path: str, shape: tuple[int, ...], threads: int, runs: int) -> dict[str, Any]:
    import resource

    import numpy as np

    from ..runtime.binding import runner
    from ..runtime.sessions import create_session

    if len(shape) == 1:  # a model that is not one image input: a seeded value of every input at this batch
        import onnx

        from .variants import random_feed

        x = random_feed(onnx.load(path), shape[0], 0)
    else:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    hwm = _reset_peak() and _status_kib("VmHWM") is not None
    baseline = (_status_kib("VmRSS") or 0) * 1024
    sess = create_session(path, threads=threads)
    run = runner(sess, x, "cpu")
    for _ in range(runs):
        run()
    if hwm:
        peak, method = (_status_kib("VmHWM") or 0) * 1024, "VmHWM after clear_refs"
    else:
        scale = 1 if sys.platform == "darwin" else 1024
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"
    return {"baseline_bytes": baseline, "peak_bytes": peak, "growth_bytes": max(0, peak - baseline),
            "threads": threads, "batch": shape[0], "runs": runs, "method": method}


if __name__ == "__main__":  # python -m sslcompress.bench.memory MODEL BxCxHxW|B THREADS RUNS
    dims = tuple(int(d) for d in sys.argv[2].split("x"))
    print(json.dumps(_probe(sys.argv[1], dims, int(sys.argv[3]), int(sys.argv[4]))))
