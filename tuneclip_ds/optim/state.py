"""What the optimizer of a DeepSpeed engine holds, read whole at any ZeRO stage, precision or offload:
the optimizers it steps, the full fp32 parameters (masters) and Adam's moments."""

from __future__ import annotations

import torch


def stepped_optimizers(engine) -> list[torch.optim.Optimizer]:
    """The optimizers whose ``step()`` applies the update (and keeps the moments), under any wrapper."""
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    wrapper = engine.optimizer
    if not isinstance(wrapper, DeepSpeedOptimizer):
        return [wrapper]  # ZeRO-0 in fp32: the client optimizer itself
    # ZeRO-3 with a partial optimizer offload also steps a second, on-device optimizer.
    return [opt for opt in (wrapper.optimizer, getattr(wrapper, "backup_optimizer", None)) if opt is not None]


def iter_full_parameters(engine):
    """``(name, full fp32 copy on the CPU)`` per parameter, one at a time (a collective under ZeRO).

    The fp32 master copy where DeepSpeed keeps one, else the parameter itself
    (ZeRO-0 in fp32; a frozen parameter, gathered from its partitions at ZeRO-3).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _zero0_masters(engine)
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        full = masters.get(id(param), full)
        if full is None:
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full = param.detach().clone()
        yield name, full.detach().float().cpu().clone()


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """Every full fp32 parameter by name, on every rank (see ``iter_full_parameters``)."""
    return dict(iter_full_parameters(engine))


def full_optimizer_states(engine, key: str) -> dict[str, torch.Tensor]:
    """Full fp32 Adam state ``key`` ("exp_avg", "exp_avg_sq") per trained parameter (a collective under ZeRO).

    ZeRO 1-3 and DeepSpeed's bf16 optimizer keep it in partitioned fp32
    buffers; ZeRO-0 keeps it in the client optimizer, keyed by the parameter
    (fp32) or by its fp32 master (bf16/fp16).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    _relink_optimizer_state_fragments(engine.optimizer)
    masters = _zero0_masters(engine)
    client = stepped_optimizers(engine)[0]
    states = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue  # frozen: no optimizer state
        full = safe_get_full_optimizer_state(param, key)
        if full is None:
            full = client.state[masters.get(id(param), param)][key]
        states[name] = full.detach().float().cpu().clone()
    return states


def _zero0_masters(engine) -> dict[int, torch.Tensor]:
    """ZeRO-0 in bf16/fp16: DeepSpeed's wrapper keeps a whole fp32 master per parameter (by parameter id)."""
    wrapper = engine.optimizer
    pairs = zip(getattr(wrapper, "fp16_groups", ()), getattr(wrapper, "fp32_groups", ()))
    return {id(low): high for lows, highs in pairs for low, high in zip(lows, highs)
            if isinstance(low, torch.Tensor)}


def _relink_optimizer_state_fragments(optimizer) -> None:
    """Point every parameter's ZeRO-1/2 (and bf16) fragment at its current Adam state.

    DeepSpeed 0.19.7 links the fragments once, right after the first param
    group's step, before the other groups have any state: with several groups
    (decay / no decay) the later groups' fragments stay empty and reading
    their moments fails. Linking again is local and cheap.
    """
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
