"""What the CPU is: its model name and the vector extensions that decide ORT's kernels.

INT8 speed-ups differ by far more between CPUs than float ones: with VNNI (AVX-512 or AVX) ORT's integer
kernels multiply-add u8 by s8 in one instruction, without it they take three and must keep weights to 7 bits.
Benchmark records carry these so that figures from different hosts are not read as one.
"""

from __future__ import annotations

import platform

# The extensions ORT's MLAS dispatches on, in the order /proc/cpuinfo names them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform says."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    return name or platform.processor() or platform.machine() or "unknown"


def cpu_isa(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The extensions of ISA_FLAGS the first CPU lists (empty where /proc/cpuinfo is not there: not x86 Linux)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    line = next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith("flags")), "")
    present = set(line.split())
    return tuple(f for f in ISA_FLAGS if f in present)


def has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has a u8 x s8 dot-product instruction (AVX-512 VNNI or AVX-VNNI)."""
    return any("vnni" in f for f in cpu_isa(cpuinfo))
