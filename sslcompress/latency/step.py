"""The channel step a provider likes, read from a latency table: what `--align auto` aligns widths to.

Two effects show in a CPU table. Off the blocks: a conv whose input width is one below a multiple of 8 leaves
ORT's blocked layout and runs slower than at that multiple (the table measures both, signature.py). Padding:
where ORT pads channels to blocks of 16, a width of 16m + 8 costs about what 16m + 16 costs, not the midway
between 16m and 16m + 16 that linear scaling gives. The step is 16 where the widths at 16m + 8 sit in the upper
quarter between their neighbours, 8 where only the off-block widths are slower, 1 where neither shows (no
alignment pays; a provider without channel blocks).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .table import LatencyTable

OFF_BLOCK_SLOWER = 1.05  # median off-block over on-block latency above which blocks of 8 matter
PADDED_TO_16 = 0.75  # median position of a 16m + 8 width between 16m and 16m + 16 above which 16 is the step


@dataclass(frozen=True)
class ChannelStep:
    step: int
    off_block_ratio: float | None  # median latency at 8k - 1 over 8k input channels
    midway_position: float | None  # median (t(16m + 8) - t(16m)) / (t(16m + 16) - t(16m))
    samples: int

    def describe(self) -> str:
        parts = []
        if self.off_block_ratio is not None:
            parts.append(f"input widths one below a multiple of 8 run {self.off_block_ratio:.2f}x as long")
        if self.midway_position is not None:
            parts.append(f"a width of 16m + 8 costs {self.midway_position:.0%} of the way from 16m to 16m + 16")
        return f"channel step {self.step} ({'; '.join(parts) or 'no conv widths to read'}, {self.samples} samples)"


def channel_step(table: LatencyTable) -> ChannelStep:
    """The step from every dense conv entry of the table, at its full output width."""
    offs, positions = [], []
    for entry in table.entries.values():
        sig = entry.signature
        if sig.kind != "conv" or sig.groups != 1:
            continue
        t = {i: ms for (i, o), ms in entry.points.items() if o == sig.out_full}
        for w, ms in t.items():
            if w % 8 == 0 and w - 1 in t:
                offs.append(t[w - 1] / ms)
            if w % 16 == 8 and w > 8 and w - 8 in t and w + 8 in t and t[w + 8] > t[w - 8]:
                positions.append((ms - t[w - 8]) / (t[w + 8] - t[w - 8]))
    off = statistics.median(offs) if offs else None
    mid = statistics.median(positions) if positions else None
    if mid is not None and mid > PADDED_TO_16:
        step = 16
    elif off is not None and off > OFF_BLOCK_SLOWER:
        step = 8
    else:
        step = 1
    return ChannelStep(step, off, mid, len(offs) + len(positions))
