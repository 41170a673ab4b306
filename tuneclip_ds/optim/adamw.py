"""AdamW parameter groups and the optimizer class: torch's, or DeepSpeed's own."""

from __future__ import annotations

import torch

from tuneclip_ds.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, embeddings' class token, logit scale and bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partitioned parameter's data is empty
        exempt = ndim < 2 or name.endswith("bias") or "logit_scale" in name or "logit_bias" in name
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(groups: list[dict], optim: OptimConfig, offload: bool) -> torch.optim.Optimizer:
    """``optim.implementation``: ``torch`` (torch.optim.AdamW) or ``deepspeed`` (FusedAdam, compiled on
    first use). ZeRO-Offload always steps on the CPU with DeepSpeed's vectorised Adam."""
    kwargs = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if optim.implementation == "deepspeed":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
