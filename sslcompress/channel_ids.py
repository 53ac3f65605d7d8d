"""Channel ids with a union-find: the coupling bookkeeping of both the torch and the ONNX analyses.

Each channel gets an integer id; channels that must be deleted together (the summands of an Add)
are merged; a pinned id carries the reason it can never be deleted, which survives merges. Where
several reasons hold, the first one given stays, unless a later one is the defining one (`defining`:
LayerNorm's, which holds whatever else the stream meets), which then replaces it.
"""

from __future__ import annotations


class ChannelIds:
    def __init__(self, parent: list[int] | None = None, pinned: dict[int, str] | None = None) -> None:
        self.parent: list[int] = parent if parent is not None else []
        self.pinned: dict[int, str] = pinned if pinned is not None else {}  # root -> reason
        self.defining: set[int] = set()  # roots whose reason is the defining one

    def fresh(self, n: int, pinned: str | None = None) -> list[int]:
        start = len(self.parent)
        ids = list(range(start, start + n))
        self.parent.extend(ids)
        if pinned:
            for i in ids:
                self.pinned[i] = pinned
        return ids

    def root(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra == rb:
            return
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        reason = self.pinned.pop(hi, None)
        defining = hi in self.defining
        self.defining.discard(hi)
        if reason and (lo not in self.pinned or (defining and lo not in self.defining)):
            self.pinned[lo] = reason
            if defining:
                self.defining.add(lo)

    def pin(self, ids: list[int], reason: str, *, defining: bool = False) -> None:
        for i in ids:
            r = self.root(i)
            if r not in self.pinned or (defining and r not in self.defining):
                self.pinned[r] = reason
                if defining:
                    self.defining.add(r)
