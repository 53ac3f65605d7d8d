"""Budget controller: adjusts lambda during sparsify until the remaining MACs (and/or parameters) meet a target.

Sparsity answers lambda with a delay, so the controller follows a schedule: the fraction it
wants falls linearly from 1 to the target over the first `ramp` of the sparsify epochs. Behind
schedule, lambda grows by `gain` per epoch; well ahead of it, lambda shrinks, which spares accuracy.
The schedule is continuous in the epochs elapsed, so the budget watch of sparsify can update
lambda every few dozen steps with the part of an epoch's gain that the stretch covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How far below an asked fraction a run may land: a budget is met at or below it, and reached when
# at most this much below (in fractions of the dense model, 0.01 = one point).
LANDING = 0.01
METRICS = ("macs", "params", "latency")
# Optimizer steps between two budget checks unless the recipe sets budget_every: a MAC count costs
# about as much as a training step of a small model, and more than a few dozen steps of a strong
# lambda can remove many points of MACs.
CHECK_EVERY = 25


@dataclass
class BudgetController:
    target: float
    epochs: int
    gain: float = 1.5
    ramp: float = 0.6
    slack: float = 0.05
    floor_factor: float = 1.0  # lambda never falls below this times its starting value
    start: dict[str, float] = field(default_factory=dict)  # the starting lambdas (first update's)

    def wanted_at(self, elapsed: float) -> float:
        """The fraction the schedule asks for after `elapsed` epochs of sparsify (1.5 = halfway into the second)."""
        # Over the first `ramp` of sparsify, and at least its first epoch: on ResNet-20 / CIFAR-10 at 50% of the
        # MACs a one-epoch sparsify that reached the budget 60% in and trained the pruned model for the rest
        # ended 0.9 points worse (21.08% error) than one that spread the cuts over the whole epoch (20.17%).
        span = max(1.0, self.ramp * self.epochs)
        progress = max(0.0, elapsed) / span
        if progress >= 1.0:
            # The target itself: 1 - (1 - 0.3) is 0.30000000000000004, which pace would take as still on the way.
            return self.target
        return 1.0 - (1.0 - self.target) * progress

    def wanted(self, epoch: int) -> float:
        """The fraction the schedule asks for at the end of `epoch` (0-based)."""
        return self.wanted_at(epoch + 1)

    def met(self, fraction: float) -> bool:
        return fraction <= self.target

    def factor(self, elapsed: float, fraction: float, span: float = 1.0) -> float:
        """How much lambda should change after a stretch of `span` epochs ending `elapsed` epochs in at
        `fraction`: the epoch's gain, scaled down to the stretch so that many small updates compound to it."""
        want = self.wanted_at(elapsed)
        if fraction > want:
            return self.gain ** span
        if fraction < want - self.slack:
            return self.gain ** -span
        return 1.0

    def scaled(self, lambdas: dict[str, float], factor: float) -> dict[str, float]:
        if not self.start:
            self.start = dict(lambdas)
        # Never below the starting lambda: with a decaying lr the late epochs prune little, and a
        # lambda lowered early on would leave the target to the forced zeroing at the end.
        return {k: max(v * factor, self.floor_factor * self.start.get(k, v)) for k, v in lambdas.items()}

    def update(self, epoch: int, fraction: float, lambdas: dict[str, float]) -> dict[str, float]:
        """New lambdas after an epoch that ended at `fraction` of the dense MACs."""
        return self.scaled(lambdas, self.factor(epoch + 1, fraction))


@dataclass(frozen=True)
class Budget:
    """What a run asks for: at most `targets[m]` of the dense model for each metric m (macs, params, latency)."""

    targets: dict[str, float]
    tolerance: float = LANDING

    def gaps(self, fractions: dict[str, float]) -> dict[str, float]:
        return {m: fractions[m] - t for m, t in self.targets.items()}

    def slack(self, fractions: dict[str, float]) -> float:
        """How far the metric furthest from its target is above it (negative: every target met)."""
        return max(self.gaps(fractions).values())

    def binding(self, fractions: dict[str, float]) -> str:
        gaps = self.gaps(fractions)
        return max(gaps, key=gaps.__getitem__)

    def met(self, fractions: dict[str, float]) -> bool:
        return self.slack(fractions) <= 0

    def undershot(self, fractions: dict[str, float]) -> bool:
        """Met, but every metric lies more than the tolerance below its target: more was removed than asked."""
        return self.slack(fractions) < -self.tolerance

    def describe(self) -> str:
        names = {"macs": "MACs", "params": "parameters", "latency": "predicted latency"}
        return " and ".join(f"{names[m]} <= {t:.1%}" for m, t in self.targets.items())


def check_interval(steps_per_epoch: int, every: int | None) -> int:
    """Steps between budget checks: `every` when given, else CHECK_EVERY and at least four checks an epoch."""
    if every is not None:
        return max(1, min(every, steps_per_epoch))
    return max(1, min(CHECK_EVERY, steps_per_epoch // 4))


def next_interval(slack_before: float, slack_now: float, steps: int, longest: int) -> int:
    """Steps to the next check: half the steps the last stretch's pace needs to reach the target, so
    checks close in as the fraction nears it, and at most `longest`."""
    pace = (slack_before - slack_now) / max(1, steps)
    if pace <= 0:
        return longest
    return max(1, min(longest, int(slack_now / pace / 2)))
