"""Memory planner: per-GPU memory of a training run, the ring loss's traffic and its time per step
(``python -m tuneclip_ds.plan``; see the README's "Memory planner")."""

from tuneclip_ds.plan.estimate import (Plan, Setup, ZeroSettings, activation_bytes, make_plan, model_states,
                                       ring_traffic)
from tuneclip_ds.plan.loss_time import OPS_PER_HOP, HopOps, Links, LossTime, loss_times
from tuneclip_ds.plan.shape import ModelShape, Tower, model_shape

__all__ = ["OPS_PER_HOP", "HopOps", "Links", "LossTime", "ModelShape", "Plan", "Setup", "Tower", "ZeroSettings",
           "activation_bytes", "loss_times", "make_plan", "model_shape", "model_states", "ring_traffic"]
