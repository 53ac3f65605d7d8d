"""The latency table's CUDA path (`profile --provider cuda`, `--latency-provider cuda`), run here on the CPU provider
standing in for CUDA: what differs on CUDA is the profile's logic (one pass, each op timed as a session call, no
profiler floor, no channel blocks or layout reorders), and that logic must hold before a GPU machine runs it."""

from __future__ import annotations

import pytest
import torch

import sslcompress.runtime as runtime
import sslcompress.runtime.sessions as sessions
from sslcompress.finetune.counting import Counter
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.structure import analyze
from sslcompress.latency import current_key, predict, predict_dense, profile_model
from sslcompress.latency.profile import ProfileEvent
from sslcompress.models import ModelSpec, build_model

SHAPE = (1, 1, 28, 28)


@pytest.fixture()
def cpu_as_cuda(monkeypatch):
    """Sessions asked for CUDA are CPU sessions, and their runners the CPU's: only the provider's name differs."""
    real_check, real_runner = sessions.check_provider, runtime.runner

    def check(provider: str) -> str:
        return real_check("cpu" if provider == "cuda" else provider)

    def run(sess, x, provider):
        return real_runner(sess, x, "cpu" if provider == "cuda" else provider)

    monkeypatch.setattr(sessions, "check_provider", check)
    monkeypatch.setattr(runtime, "check_provider", check)
    monkeypatch.setattr(runtime, "runner", run)


def test_a_cuda_table_is_one_pass_of_session_calls_without_blocks(cpu_as_cuda):
    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", 10, 1, (28, 28))).eval()
    key = current_key("cuda", 1, 1)
    assert key.provider == "cuda" and key.block == 1
    events: list[ProfileEvent] = []
    table = profile_model(model, SHAPE, key, step=250, on_progress=events.append, rounds=1)
    points = sum(len(e.points) for e in table.entries.values())
    # One pass over the grid (the CPU reads each point in several), then the whole models once.
    assert events[-1].total == points + 1 and events[-1].done == events[-1].total
    assert table.reorder_curves == {}  # no blocked layout on CUDA, so no reorders to read
    for entry in table.entries.values():
        assert all(ms > 0 for ms in entry.points.values())
        assert all(r == (0.0, 0.0) for r in entry.reorders.values())
    structure = analyze(model, SHAPE)
    dense = predict_dense(table, structure)
    # Half of fc1's neurons zeroed (500 -> 250, a grid width): the prediction falls below the dense one.
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in [g for g in build_groups(model, SHAPE, ("filter",), structure)
                  if g.removable and g.slices[0].param == "fc1.weight"][:250]:
            for s in g.slices:
                params[s.param].index_fill_(0 if s.axis == "out" else 1, torch.tensor(s.index), 0.0)
    thinner = predict(table, structure, Counter(model, SHAPE, structure).count())
    assert 0 < thinner < dense
