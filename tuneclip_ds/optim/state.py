"""What the optimizer of a DeepSpeed engine holds, read whole at any ZeRO stage, precision or offload:
the optimizers it steps, the full fp32 parameters (masters) and Adam's moments."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch


def stepped_optimizers(engine) -> list[torch.optim.Optimizer]:
    """The optimizers whose ``step()`` applies the update (and keeps the moments), under any wrapper."""
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    wrapper = engine.optimizer
    if not isinstance(wrapper, DeepSpeedOptimizer):
        return [wrapper]  # ZeRO-0 in fp32: the client optimizer itself
    # ZeRO-3 with a partial optimizer offload also steps a second, on-device optimizer.
    return [opt for opt in (wrapper.optimizer, getattr(wrapper, "backup_optimizer", None)) if opt is not None]


def state_is_partitioned(engine) -> bool:
    """ZeRO 1-3 and DeepSpeed's bf16 optimizer shard the masters and moments over the data-parallel ranks."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    return isinstance(engine.optimizer, ZeROOptimizer)


def iter_full_parameters(engine):
    """``(name, full fp32 copy on the CPU)`` per parameter, one at a time (a collective under ZeRO).

    The fp32 master copy where DeepSpeed keeps one, else the parameter itself
    (ZeRO-0 in fp32; a frozen parameter, gathered from its partitions at ZeRO-3).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _zero0_masters(engine)
    for name, param in engine.module.named_parameters():
        if id(param) in masters:
            full = masters[id(param)].value()
        else:
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full = param.detach().clone()
        yield name, full.detach().float().cpu().clone()


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """Every full fp32 parameter by name, on every rank (see ``iter_full_parameters``)."""
    return dict(iter_full_parameters(engine))


class Fragment(NamedTuple):
    """Part of a parameter: ``values`` (1-D) are its flattened elements ``start`` to ``start + len(values)``."""

    start: int
    values: torch.Tensor


def local_masters(engine) -> dict[str, Fragment]:
    """This rank's part of every trained parameter's fp32 master, by name: detached views, no copy (the
    optimizer changes them in place). A parameter none of whose elements this rank holds is left out.

    ZeRO-3: the rank's partition, at rank x partition size (its padding cut off); ZeRO-1/2 and DeepSpeed's
    bf16 optimizer: the fragment of the rank's flat partition linked to the parameter (``_hp_mapping``);
    ZeRO-0: the whole master, or the parameter itself in fp32.
    """
    masters = _zero0_masters(engine)
    fragments = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue  # frozen: no master
        if hasattr(param, "ds_id"):
            fragment = _zero3_master(param)
        elif hasattr(param, "_hp_mapping"):
            mapping = param._hp_mapping
            fragment = None if mapping is None else Fragment(mapping.lp_fragment_address.start, mapping.hp_fragment)
        else:
            master = masters[id(param)].value() if id(param) in masters else param
            fragment = Fragment(0, master.view(-1))
        if fragment is not None:  # DeepSpeed's masters require gradients: no autograd history for their readers
            fragments[name] = Fragment(fragment.start, fragment.values.detach())
    return fragments


def _zero3_master(param) -> Fragment | None:
    """The rank's fp32 partition of a ZeRO-3 parameter, where DeepSpeed keeps it (on the CPU with offload):
    DeepSpeed's ``safe_get_local_fp32_param`` without its copy to the accelerator."""
    optimizer = param._z3_optimizer
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=True)
    start = optimizer._get_param_partition_rank(param) * partition.numel()
    length = min(partition.numel(), param.ds_numel - start)  # the last partitions hold padding
    return Fragment(start, partition.narrow(0, 0, length)) if length > 0 else None


def full_optimizer_states(engine, key: str) -> dict[str, torch.Tensor]:
    """Full fp32 Adam state ``key`` ("exp_avg", "exp_avg_sq") per trained parameter (a collective under ZeRO).

    ZeRO 1-3 and DeepSpeed's bf16 optimizer keep it in partitioned fp32
    buffers; ZeRO-0 keeps it in the client optimizer, keyed by the parameter
    (fp32) or by the fp32 master it is part of (bf16/fp16).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    _relink_optimizer_state_fragments(engine.optimizer)
    masters = _zero0_masters(engine)
    client = stepped_optimizers(engine)[0]
    states = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue  # frozen: no optimizer state
        if id(param) in masters:
            full = masters[id(param)].state(client, key)
        else:
            full = safe_get_full_optimizer_state(param, key)
        if full is None:
            full = client.state[param][key]
        states[name] = full.detach().float().cpu().clone()
    return states


class Master(NamedTuple):
    """A parameter's fp32 master at ZeRO-0 in bf16/fp16: ``flat[offset:offset + numel]`` shaped like the
    parameter, where ``flat`` is the tensor DeepSpeed's wrapper hands its optimizer (which keys its state by it)."""

    flat: torch.Tensor
    offset: int
    shape: torch.Size

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """This parameter's part of ``flat``, or of a tensor laid out like it (an Adam moment)."""
        return flat.view(-1).narrow(0, self.offset, self.shape.numel()).view(self.shape)

    def value(self) -> torch.Tensor:
        return self.of(self.flat)

    def state(self, optimizer: torch.optim.Optimizer, key: str) -> torch.Tensor:
        return self.of(optimizer.state[self.flat][key])


def _zero0_masters(engine) -> dict[int, Master]:
    """ZeRO-0 in bf16/fp16, by parameter id: DeepSpeed's unfused wrapper (around torch's AdamW) keeps an fp32
    master per parameter in ``fp32_groups``, its fused one (around its FusedAdam) one flat fp32 master per
    param group in ``fp32_groups_flat``, laid out as the group's parameters one after the other."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = engine.optimizer
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        return {id(low): Master(high, 0, high.shape) for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                for low, high in zip(lows, highs)}
    if isinstance(wrapper, FP16_Optimizer):
        return {id(low): master for lows, flat in zip(wrapper.fp16_groups, wrapper.fp32_groups_flat)
                for low, master in zip(lows, flat_layout(flat, [low.shape for low in lows]))}
    return {}


def flat_layout(flat: torch.Tensor, shapes: list[torch.Size]) -> list[Master]:
    """Where each of ``shapes`` lies in ``flat``, which holds them one after the other (as DeepSpeed flattens)."""
    offsets = itertools.accumulate((shape.numel() for shape in shapes), initial=0)
    return [Master(flat, offset, shape) for offset, shape in zip(offsets, shapes)]


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
