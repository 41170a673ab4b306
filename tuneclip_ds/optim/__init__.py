"""AdamW and its parameter groups, the stage-II schedule, and stage I (optimizer statistics recovery)."""

from tuneclip_ds.optim.adamw import build_optimizer, group_options, param_groups, tower_mean_rates
from tuneclip_ds.optim.osr import StatisticsRecovery
from tuneclip_ds.optim.schedule import StageClock, lr_lambda

__all__ = ["StageClock", "StatisticsRecovery", "build_optimizer", "group_options", "lr_lambda", "param_groups",
           "tower_mean_rates"]
