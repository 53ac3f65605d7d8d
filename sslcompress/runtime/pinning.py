"""Where a timed session's threads run: the calling thread and the pool's workers pinned to fixed CPUs.

Unpinned, the scheduler keeps each session's worker threads on the core where they first ran; on a machine
where another process holds a core, one variant's workers can sit on it for the whole run and another's
not, a bias that interleaving rounds cannot cancel (seen here: the same model 1x and 2.5x apart at 2
threads on 2 busy cores). Every variant timed together therefore gets the same placement.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return []


def placement(threads: int) -> tuple[int, list[int]] | None:
    """(CPU of the calling thread, CPUs of the pool's workers) for a pinned run; None where there are too few."""
    cpus = usable_cpus()
    if len(cpus) < threads:
        return None
    return cpus[0], cpus[1:threads]


@contextmanager
def calling_thread_on(cpu: int | None) -> Iterator[None]:
    """Pin the calling thread to one CPU for the duration (its workers are pinned by the session)."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
