"""TuneCLIP stage I, Optimizer Statistics Recovery: normal training steps with the rate frozen at 0.

Every stage-I step runs forward, loss, backward, gradient reduction, clipping
and the optimizer's step, so Adam's moments, its step counter and the loss's
per-sample estimators update from real gradients; the learning rate of every
param group is 0 during the optimizer's own ``step()``, so every parameter
(and its fp32 master) stays bit-identical.

The freeze is a step pre-hook on the optimizer that DeepSpeed steps (the
client optimizer, or DeepSpeed's own Adam, inside any ZeRO stage, the bf16 or
fp16 wrapper, or offload): a scheduler may set any rate between steps, and the
step still sees 0. Stage II starts from the recovered state, or from the part of it
that ``osr.recover`` names (m, v, u); the rest starts fresh.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch

from tuneclip_ds.config import OSRConfig
from tuneclip_ds.optim.schedule import StageClock
from tuneclip_ds.optim.state import iter_full_parameters, state_is_partitioned, stepped_optimizers

logger = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")


class ParametersChangedError(RuntimeError):
    """A parameter changed during stage I, whose learning rate is frozen at 0."""


def applied_updates(engine) -> int:
    """The optimizer steps DeepSpeed applied: the scheduler advances at those only. A step it skips on
    non-finite gradients (an fp16 overflow; bf16 at ZeRO-1/2) changes no moment and advances
    ``engine.global_steps`` alone."""
    return engine.lr_scheduler.last_epoch


@dataclass
class ConvergenceMonitor:
    """Counts the consecutive steps at which every watched statistic changed by less than ``tolerance``
    (relative change per step)."""

    tolerance: float | None
    patience: int
    previous: dict[str, float] = field(default_factory=dict)
    settled_steps: int = 0

    def observe(self, values: dict[str, float]) -> dict[str, float]:
        """Relative change of each value since the last step (none at the first)."""
        changes = {
            name: abs(value - self.previous[name]) / max(abs(self.previous[name]), 1e-30)
            for name, value in values.items()
            if name in self.previous
        }
        self.previous = dict(values)
        settled = bool(changes) and self.tolerance is not None and max(changes.values()) < self.tolerance
        self.settled_steps = self.settled_steps + 1 if settled else 0
        return changes

    @property
    def converged(self) -> bool:
        return self.tolerance is not None and self.settled_steps >= self.patience

    def state_dict(self) -> dict:
        return {"previous": dict(self.previous), "settled_steps": self.settled_steps}

    def load_state_dict(self, state: dict) -> None:
        self.previous, self.settled_steps = dict(state["previous"]), state["settled_steps"]


class StatisticsRecovery:
    """Stage I for a DeepSpeed engine: the frozen rate, its diagnostics and its end.

    ``clock.stage2_start`` is ``None`` while stage I runs; ``begin_stage2``
    sets it, after checking that no parameter changed. Stage I's length counts
    the updates DeepSpeed applied: a skipped step recovers nothing.
    """

    def __init__(self, engine, clock: StageClock, osr: OSRConfig, max_steps: int):
        self.engine = engine
        self.clock = clock
        self.config = osr
        self.max_steps = max_steps
        self.monitor = ConvergenceMonitor(osr.until_converged, osr.patience)
        self.start_digest: str | None = None
        self._saved_rates: dict[int, list[float]] = {}
        for optimizer in stepped_optimizers(engine):
            optimizer.register_step_pre_hook(self._freeze_rates)
            optimizer.register_step_post_hook(self._restore_rates)

    @property
    def active(self) -> bool:
        return self.clock.stage2_start is None

    def _freeze_rates(self, optimizer, args, kwargs) -> None:
        if self.active:
            self._saved_rates[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = 0.0

    def _restore_rates(self, optimizer, args, kwargs) -> None:
        """Leave the scheduler's rates in place, so that stage II starts where its schedule says."""
        for group, rate in zip(optimizer.param_groups, self._saved_rates.pop(id(optimizer), ())):
            group["lr"] = rate

    def begin(self) -> None:
        """Start stage I (collective): fingerprint the parameters it must leave unchanged."""
        self.start_digest = parameter_digest(self.engine)
        logger.info("stage I (optimizer statistics recovery): up to %d steps with the learning rate frozen at 0; "
                    "parameter digest %s", self.max_steps, self.start_digest[:16])

    def done(self) -> bool:
        """Stage I is over: its step limit, or settled statistics (not before ``osr.min_steps``)."""
        updates = applied_updates(self.engine)
        enough = updates >= self.config.min_steps and self.monitor.converged
        return updates >= self.max_steps or enough

    def observe(self, loss_fn) -> dict[str, float]:
        """This step's diagnostics (collective): moment norms, Adam's step, with GCL/HGCL the mean of the
        estimators ``u`` over the whole table, and the relative change per step of each. Nothing for a step
        that DeepSpeed skipped: its moments did not change, which is no sign of convergence."""
        if not self.engine.was_step_applied():  # the same on every rank: DeepSpeed agrees on skipping
            return {}
        diagnostics = moment_norms(self.engine)
        watched = {key: diagnostics[key] for key in ("exp_avg_norm", "exp_avg_sq_norm")}
        if hasattr(loss_fn, "estimators"):
            log_mean = loss_fn.estimators.log_mean_u(loss_fn.group_info(), self.engine.device)
            diagnostics["estimator_log_mean_u"] = log_mean
            watched["estimator_mean_u"] = math.exp(log_mean)  # below exp's range limit: |log u| <= scale * (2 + m)^2
        changes = self.monitor.observe(watched)
        return {**diagnostics, **{f"{name}_change": value for name, value in changes.items()}}

    def begin_stage2(self, step: int, loss_fn) -> str:
        """End stage I (collective): check the parameters, start the stage-II clock, forget the statistics
        that ``osr.recover`` leaves out. Returns the parameters' digest."""
        digest = parameter_digest(self.engine)
        if digest != self.start_digest:
            raise ParametersChangedError(
                f"parameters changed during stage I (digest {self.start_digest[:16]} -> {digest[:16]}); "
                "the learning rate was not frozen at 0: is a parameter changed outside the optimizer's step?"
            )
        updates = applied_updates(self.engine)
        logger.info("stage I ended after %d steps, %d of them skipped on non-finite gradients (%s); parameters "
                    "unchanged (digest %s); stage II begins", step, step - updates,
                    "converged" if updates < self.max_steps else "step limit", digest[:16])
        self.clock.begin_stage2(step, updates)
        recover = self.config.recover
        forget_statistics(self.engine, keep_m="m" in recover, keep_v="v" in recover)
        has_estimators = hasattr(loss_fn, "estimators")
        if "u" not in recover and has_estimators:
            loss_fn.estimators.reset()
        carried = [name for name, kept in [("m (exp_avg)", "m" in recover), ("v (exp_avg_sq)", "v" in recover),
                                           ("Adam's step", "m" in recover or "v" in recover),
                                           ("u (estimators)", "u" in recover and has_estimators)] if kept]
        logger.info("stage II starts from the recovered %s (osr.recover=%s)%s",
                    ", ".join(carried) or "nothing (a fresh Adam)", list(recover),
                    "" if has_estimators else "; this loss has no estimators")
        return digest

    def state_dict(self) -> dict:
        return {"stage2_start": self.clock.stage2_start, "schedule_start": self.clock.schedule_start,
                "start_digest": self.start_digest, "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.clock.stage2_start = state["stage2_start"]
        # checkpoints written before skipped steps were told apart: exact unless a step was skipped
        self.clock.schedule_start = state.get("schedule_start", state["stage2_start"])
        self.start_digest = state["start_digest"]
        self.monitor.load_state_dict(state["monitor"])


def _optimizer_states(engine):
    for optimizer in stepped_optimizers(engine):
        yield from (state for state in optimizer.state.values() if MOMENTS[0] in state)


def moment_norms(engine) -> dict[str, float]:
    """L2 norms of the full ``exp_avg`` and ``exp_avg_sq`` and Adam's step count (collective under ZeRO:
    each rank sums the squares of its own partition; padding holds zeros)."""
    squares = torch.zeros(2, dtype=torch.float64, device=engine.device)
    adam_step = 0
    for state in _optimizer_states(engine):
        for i, key in enumerate(MOMENTS):
            # the norm reduces in place: no float64 copy of the partition at every stage-I step
            squares[i] += torch.linalg.vector_norm(state[key]).double().square().to(engine.device)
        adam_step = max(adam_step, int(state["step"]))
    if state_is_partitioned(engine):
        torch.distributed.all_reduce(squares)
    return {"exp_avg_norm": squares[0].sqrt().item(), "exp_avg_sq_norm": squares[1].sqrt().item(),
            "adam_step": float(adam_step)}


def forget_statistics(engine, keep_m: bool, keep_v: bool) -> None:
    """Zero ``exp_avg`` unless ``keep_m`` and ``exp_avg_sq`` unless ``keep_v``, in every (local partition of
    the) state the stepped optimizers hold, at any ZeRO stage, precision or offload. Adam's step counters
    stay while either moment does (bias correction continues from them); with neither, they are zeroed
    too and the optimizer is as if new. Local: no collective."""
    forget = {key for key, keep in zip(MOMENTS, (keep_m, keep_v)) if not keep}
    if not keep_m and not keep_v:
        forget.add("step")
    if not forget:
        return
    for optimizer in stepped_optimizers(engine):
        for state in optimizer.state.values():
            for key, value in state.items():
                if key in forget:
                    state[key] = value.zero_() if isinstance(value, torch.Tensor) else 0
        if "step" in forget:
            for group in optimizer.param_groups:
                if "step" in group:  # DeepSpeed's FusedAdam counts per group
                    group["step"] = 0


def reset_moments(engine) -> None:
    """Zero the moments and the step counters, as if the optimizer were new."""
    forget_statistics(engine, keep_m=False, keep_v=False)


def parameter_digest(engine) -> str:
    """SHA-256 over every full fp32 parameter in name order (collective under ZeRO; the same on every
    rank and for any world size)."""
    digest = hashlib.sha256()
    for name, tensor in iter_full_parameters(engine):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
