"""Learning-rate schedule as a pure function of training progress in epochs (robust to world-size changes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class EpochClock:
    """Fractional epochs completed; the trainer advances it before each optimizer step."""

    epochs: float = 0.0
    steps_per_epoch: int = 1  # set once the training loader exists


def lr_factor(optim: Any, clock: EpochClock) -> Callable[[int], float]:
    """Multiplier for LambdaLR: linear warm-up over ``optim.warmup_epochs``, then x gamma at each milestone epoch.

    The step argument LambdaLR passes is ignored: the factor depends on the clock, so a resume with another
    batch split (world size) keeps the schedule in epochs.
    """
    warm = float(optim.warmup_epochs)
    milestones = [float(m) for m in optim.milestones]

    def factor(_: int) -> float:
        e = clock.epochs
        if warm and e < warm:
            return min(1.0, (e + 1.0 / clock.steps_per_epoch) / warm)
        return float(optim.gamma) ** sum(e >= m for m in milestones)

    return factor
