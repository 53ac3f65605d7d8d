"""Resident-set figures of this process (Linux), for the benchmarks' peak-memory numbers.

Imports nothing of sslcompress, so a child running another revision of the package can use it.
"""

from __future__ import annotations


def status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` entry in KiB (VmRSS, VmHWM), None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0), so a peak read later is that of what ran since."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kib(reset_ok: bool) -> int:
    """The high-water mark since the reset, or the whole process's where it could not be reset."""
    import resource

    hwm = status_kib("VmHWM") if reset_ok else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
