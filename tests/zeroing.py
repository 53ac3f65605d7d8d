"""Whole parameter groups set to zero in a test model, as a finished sparsification leaves them."""

from __future__ import annotations

import torch
from torch import nn


def zero_groups(model: nn.Module, groups, rows_and_columns_only: bool = False) -> None:
    """Every slice of each group set to zero: rows ("out"), columns ("in"), whole parameters ("all", a depth
    group's) and kernel rows and columns ("row", "col": a Conv1d's taps are its columns); with
    `rows_and_columns_only`, any but the first two is a test's mistake (a head or neuron group holds rows and
    columns only)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in groups:
            for s in g.slices:
                t = params[s.param]
                if s.axis == "out":
                    t[list(s.index)] = 0
                elif s.axis == "in":
                    t[:, list(s.index)] = 0
                elif s.axis == "all" and not rows_and_columns_only:
                    t.zero_()
                elif s.axis == "row" and not rows_and_columns_only:
                    t[:, :, list(s.index)] = 0
                elif s.axis == "col" and not rows_and_columns_only:
                    t[..., list(s.index)] = 0
                else:
                    raise AssertionError(f"a slice this helper does not zero: {s}")
