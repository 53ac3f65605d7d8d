"""Budget controller: adjusts lambda during sparsify until the remaining MACs meet a target.

Sparsity answers lambda with a delay, so the controller follows a schedule: the fraction it
wants falls linearly from 1 to the target over the first `ramp` of the sparsify epochs. Behind
schedule, lambda grows by `gain`; well ahead of it, lambda shrinks, which spares accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BudgetController:
    target: float
    epochs: int
    gain: float = 1.5
    ramp: float = 0.6
    slack: float = 0.05
    floor_factor: float = 1.0  # lambda never falls below this times its starting value
    start: dict[str, float] = field(default_factory=dict)  # the starting lambdas (first update's)

    def wanted(self, epoch: int) -> float:
        """The MAC fraction the schedule asks for at the end of `epoch` (0-based)."""
        span = max(1.0, self.ramp * self.epochs)
        progress = min(1.0, (epoch + 1) / span)
        return 1.0 - (1.0 - self.target) * progress

    def met(self, fraction: float) -> bool:
        return fraction <= self.target

    def update(self, epoch: int, fraction: float, lambdas: dict[str, float]) -> dict[str, float]:
        """New lambdas after an epoch that ended at `fraction` of the dense MACs."""
        want = self.wanted(epoch)
        if fraction > want:
            factor = self.gain
        elif fraction < want - self.slack:
            factor = 1.0 / self.gain
        else:
            factor = 1.0
        if not self.start:
            self.start = dict(lambdas)
        # Never below the starting lambda: with a decaying lr the late epochs prune little, and a
        # lambda lowered early on would leave the target to the forced zeroing at the end.
        return {k: max(v * factor, self.floor_factor * self.start.get(k, v)) for k, v in lambdas.items()}
