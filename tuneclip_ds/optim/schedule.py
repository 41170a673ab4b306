"""The learning-rate schedule of stage II: linear warm-up, then cosine (or constant)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tuneclip_ds.config import OptimConfig


@dataclass
class StageClock:
    """Where stage II began (``None`` during stage I), counted two ways: ``stage2_start`` in the run's steps
    (DeepSpeed's ``global_steps``, one per global batch) and ``schedule_start`` in the updates the optimizer
    applied (the scheduler's own count). They differ by the steps DeepSpeed skipped on non-finite gradients
    (an fp16 overflow; bf16 at ZeRO-1/2), which advance ``global_steps`` and not the scheduler.

    The schedule counts from ``schedule_start``, so warm-up and cosine are those of stage II whatever the
    length of stage I (which may end early on convergence), and a skipped update delays the schedule by one.
    """

    stage2_start: int | None = 0
    schedule_start: int | None = 0

    def begin_stage2(self, step: int, updates: int) -> None:
        self.stage2_start, self.schedule_start = step, updates

    def stage2_position(self, step: int) -> int:
        """Steps of stage II after the run's ``step``."""
        return 0 if self.stage2_start is None else step - self.stage2_start

    def schedule_position(self, updates: int) -> int:
        """Updates of stage II after ``updates`` in all (the scheduler's count)."""
        return 0 if self.schedule_start is None else updates - self.schedule_start


def lr_lambda(optim: OptimConfig, total_steps: int, clock: StageClock | None = None) -> Callable[[int], float]:
    """Multiplier of the base lr after ``updates`` applied optimizer steps (LambdaLR's convention).

    ``total_steps`` is the length of stage II. During stage I the multiplier
    stays at its stage-II starting value; the rate applied there is frozen at
    zero by ``StatisticsRecovery``, whatever a scheduler sets.
    """
    clock = clock or StageClock()

    def factor(updates: int) -> float:
        step = clock.schedule_position(updates)
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine

    return factor
