"""Memory planner: per-GPU memory of a training run and the ring loss's traffic
(``python -m tuneclip_ds.plan``; see the README's "Memory planner")."""

from tuneclip_ds.plan.estimate import (Plan, Setup, ZeroSettings, activation_bytes, make_plan, model_states,
                                       ring_traffic)
from tuneclip_ds.plan.shape import ModelShape, Tower, model_shape

__all__ = ["ModelShape", "Plan", "Setup", "Tower", "ZeroSettings", "activation_bytes", "make_plan", "model_shape",
           "model_states", "ring_traffic"]
