"""The channel step a provider likes, read from a latency table: what `--align auto` aligns widths to.

Two effects show in a CPU table, with b the channel block of ORT's blocked convs on the table's CPU (its key;
8 with AVX2, 16 with AVX-512F; 8 is read where the key has no block). Off the blocks: a conv whose input
width is one below a multiple of b leaves ORT's blocked layout and runs slower than at that multiple (the table
measures both, signature.py). Padding: where the kernels work on two blocks at a time, a width of 2bm + b
costs about what 2bm + 2b costs, not the midway between 2bm and 2bm + 2b that linear scaling gives. The step
is 2b where the widths at 2bm + b sit in the upper quarter between their neighbours, b where only the
off-block widths are slower, 1 where neither shows (no alignment pays; a provider without channel blocks).
Positions are read only between convs whose neighbours differ by MIN_SPAN_MS or more; without one, the
padding is not assumed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .table import LatencyTable

OFF_BLOCK_SLOWER = 1.05  # median off-block over on-block latency above which the blocks matter
PADDED_TO_TWO = 0.75  # median position of a 2bm + b width between 2bm and 2bm + 2b above which 2b is the step
# A position is read only where its neighbours lie this far apart: ORT's profiler counts whole microseconds,
# so between convs of a few microseconds the position is mostly rounding (on a CIFAR ResNet at batch 1 it
# read 96% in one profile and 57% in another).
MIN_SPAN_MS = 0.02


@dataclass(frozen=True)
class ChannelStep:
    step: int
    off_block_ratio: float | None  # median latency at bk - 1 over bk input channels
    midway_position: float | None  # median (t(2bm + b) - t(2bm)) / (t(2bm + 2b) - t(2bm))
    samples: int
    block: int = 8  # b

    def describe(self) -> str:
        b = self.block
        parts = []
        if self.off_block_ratio is not None:
            parts.append(f"input widths one below a multiple of {b} run {self.off_block_ratio:.2f}x as long")
        if self.midway_position is not None:
            parts.append(f"a width of {2 * b}m + {b} costs {self.midway_position:.0%} of the way from {2 * b}m to "
                         f"{2 * b}m + {2 * b}")
        return f"channel step {self.step} ({'; '.join(parts) or 'no conv widths to read'}, {self.samples} samples)"


def channel_step(table: LatencyTable) -> ChannelStep:
    """The step from every dense conv entry of the table, at its full output width."""
    b = table.key.block if table.key.block > 1 else 8
    offs, positions = [], []
    for entry in table.entries.values():
        sig = entry.signature
        if not sig.blockable or sig.groups != 1:
            continue
        t = {i: ms for (i, o), ms in entry.points.items() if o == sig.out_full}
        for w, ms in t.items():
            if w % b == 0 and w - 1 > b and w - 1 in t:
                offs.append(t[w - 1] / ms)
            if w % (2 * b) == b and w > b and w - b in t and w + b in t and t[w + b] - t[w - b] >= MIN_SPAN_MS:
                positions.append((ms - t[w - b]) / (t[w + b] - t[w - b]))
    off = statistics.median(offs) if offs else None
    mid = statistics.median(positions) if positions else None
    if mid is not None and mid > PADDED_TO_TWO:
        step = 2 * b
    elif off is not None and off > OFF_BLOCK_SLOWER:
        step = b
    else:
        step = 1
    return ChannelStep(step, off, mid, len(offs) + len(positions), b)
