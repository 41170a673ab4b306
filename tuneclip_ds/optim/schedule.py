"""The learning-rate schedule of stage II: linear warm-up, then cosine (or constant)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tuneclip_ds.config import OptimConfig


@dataclass
class StageClock:
    """Where stage II began, in optimizer steps (``None`` during stage I).

    The schedule counts from there, so warm-up and cosine are those of stage II
    whatever the length of stage I (which may end early on convergence).
    """

    stage2_start: int | None = 0

    def stage2_position(self, step: int) -> int:
        return 0 if self.stage2_start is None else step - self.stage2_start


def lr_lambda(optim: OptimConfig, total_steps: int, clock: StageClock | None = None) -> Callable[[int], float]:
    """Multiplier of the base lr after ``step`` optimizer steps (LambdaLR's convention).

    ``total_steps`` is the length of stage II. During stage I the multiplier
    stays at its stage-II starting value; the rate applied there is frozen at
    zero by ``StatisticsRecovery``, whatever a scheduler sets.
    """
    clock = clock or StageClock()

    def factor(step: int) -> float:
        step = clock.stage2_position(step)
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine

    return factor
