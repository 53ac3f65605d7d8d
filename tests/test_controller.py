"""The budget controller's schedule and lambda updates."""

from __future__ import annotations

import pytest

from sslcompress.finetune.controller import BudgetController


def test_schedule_falls_linearly_to_the_target():
    c = BudgetController(target=0.2, epochs=10, ramp=0.5)
    assert c.wanted(0) == pytest.approx(1 - 0.8 * 1 / 5)
    assert c.wanted(4) == pytest.approx(0.2)
    assert c.wanted(9) == pytest.approx(0.2)


def test_lambda_rises_behind_schedule_and_never_falls_below_its_start():
    c = BudgetController(target=0.2, epochs=10, gain=2.0, ramp=0.5)
    lam = {"filter": 0.1}
    lam = c.update(0, 0.99, lam)  # behind: wanted 0.84
    assert lam == {"filter": 0.2}
    lam = c.update(1, 0.2, lam)  # far ahead of 0.68: halve, but not below the starting 0.1
    assert lam == {"filter": pytest.approx(0.1)}
    lam = c.update(2, 0.1, lam)
    assert lam == {"filter": pytest.approx(0.1)}
    assert c.met(0.2) and not c.met(0.2001)


def test_on_schedule_keeps_lambda():
    c = BudgetController(target=0.5, epochs=4, ramp=1.0)
    assert c.update(1, c.wanted(1) - 0.01, {"shape": 0.3}) == {"shape": 0.3}
