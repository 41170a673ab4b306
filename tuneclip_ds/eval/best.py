"""Which evaluation was the best so far, by one metric: to keep the best checkpoint."""

from __future__ import annotations

import logging
import math
from typing import Literal, Mapping

from tuneclip_ds.errors import InputError

logger = logging.getLogger(__name__)


class BestTracker:
    """The best value of ``metric`` over evaluations, and the step it came from.

        tracker = BestTracker("imagenet/top1")
        if tracker.update(results, step):   # True: these results are the best so far
            ...save the checkpoint as the best one...
        checkpoint_state["best"] = tracker.state_dict()   # so a resumed run keeps its best

    Only a strict improvement counts (on a tie the earlier checkpoint stays), and NaN never does.
    """

    def __init__(self, metric: str, mode: Literal["max", "min"] = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metric = metric
        self.mode = mode
        self.best: float | None = None
        self.best_step: int | None = None

    def update(self, results: Mapping[str, float], step: int) -> bool:
        if self.metric not in results:
            raise InputError(f"the metric {self.metric!r} chosen to select the best checkpoint is not among the "
                             f"evaluation results: {', '.join(sorted(results))}")
        value = float(results[self.metric])
        if math.isnan(value) or not self._improves(value):
            return False
        self.best, self.best_step = value, step
        return True

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a saved best; one saved for another metric or mode is ignored (with a warning)."""
        if (state["metric"], state["mode"]) != (self.metric, self.mode):
            logger.warning("the saved best checkpoint was chosen by %s (%s), now by %s (%s): starting over",
                           state["metric"], state["mode"], self.metric, self.mode)
            return
        self.best, self.best_step = state["best"], state["best_step"]
