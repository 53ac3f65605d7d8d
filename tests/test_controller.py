"""The budget controller's schedule and lambda updates, the budget of two metrics, and when it is checked."""

from __future__ import annotations

import pytest

from sslcompress.finetune.controller import (
    CHECK_EVERY,
    Budget,
    BudgetController,
    check_interval,
    next_interval,
)


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


def test_schedule_is_continuous_and_a_stretch_gets_its_share_of_the_gain():
    c = BudgetController(target=0.2, epochs=10, gain=2.0, ramp=0.5)
    assert c.wanted_at(1.0) == pytest.approx(c.wanted(0))
    assert c.wanted(0) < c.wanted_at(0.5) < 1.0
    # Four stretches of a quarter epoch behind schedule compound to one epoch's gain.
    lam = {"filter": 0.1}
    for k in range(1, 5):
        lam = c.scaled(lam, c.factor(k / 4, 0.99, span=0.25))
    assert lam["filter"] == pytest.approx(0.2)
    assert c.factor(1.0, c.wanted(0) - 0.01, span=0.25) == 1.0


def test_budget_of_two_metrics_is_met_when_both_are():
    b = Budget({"macs": 0.5, "params": 0.4})
    assert b.slack({"macs": 0.45, "params": 0.42}) == pytest.approx(0.02)
    assert b.binding({"macs": 0.45, "params": 0.42}) == "params"
    assert not b.met({"macs": 0.45, "params": 0.42})
    assert b.met({"macs": 0.45, "params": 0.395}) and not b.undershot({"macs": 0.45, "params": 0.395})
    assert b.undershot({"macs": 0.45, "params": 0.3})  # every metric more than a point below
    assert b.describe() == "MACs <= 50.0% and parameters <= 40.0%"


def test_checks_come_every_few_dozen_steps_and_close_in_near_the_target():
    assert check_interval(782, None) == CHECK_EVERY
    assert check_interval(30, None) == 7  # at least four checks an epoch
    assert check_interval(2, None) == 1
    assert check_interval(30, 100) == 30 and check_interval(782, 10) == 10
    # 0.2 to go at 0.01 a step: 20 steps away, next check in 10; no progress: the longest interval.
    assert next_interval(0.3, 0.2, 10, 25) == 10
    assert next_interval(0.3, 0.001, 10, 25) == 1
    assert next_interval(0.2, 0.2, 10, 25) == 25


def test_the_schedule_asks_for_the_target_itself_once_it_ends():
    # Not 1 - (1 - 0.3): pace lands the budget only when the schedule asks for the target exactly.
    for target in (0.3, 0.1, 0.7, 0.55):
        c = BudgetController(target, epochs=1)  # the schedule spans at least the first epoch
        assert c.wanted_at(1.0) == target and c.wanted_at(5.0) == target
        assert c.wanted_at(0.6) > target
