"""An exponential moving average (EMA) of the weights over stage II, sharded like the optimizer.

Each rank averages only the fp32 masters it owns (``local_masters``): its ZeRO-1/2 fragments, its ZeRO-3
partitions. The EMA costs one fp32 copy of the rank's partition and no rank ever holds one of the whole
model. At ZeRO-0 every rank holds the whole model and optimizer anyway, so each keeps the whole EMA too
(the same on every rank: evaluating it needs no gather, and rank 0 alone saves it).

The EMA starts from the weights at the start of stage II. It is made when the run is built: stage I
leaves every weight bit-identical (checked at its end), so the weights then are those stage II starts
from. It follows each stage-II step that DeepSpeed applied (a skipped step changed no weight): a copy
before ``ema.start_step``, then every ``ema.every`` steps ``ema <- ema + (1 - decay_t) * (weights - ema)``
(a lerp: ``decay_t * ema + (1 - decay_t) * weights``), over all the rank's fragments in one foreach call.

A checkpoint holds one file per rank, ``ema_rankNNNNN.pt``: ``{"updates": t, "fragments": {name: (start,
values)}}``, ``values`` being the flattened parameter's elements from ``start``. A resume on another world
size, and the export, copy the ranges of the saved fragments that overlap the fragments they want.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from tuneclip_ds import checkpoint
from tuneclip_ds.checkpoint import CheckpointError
from tuneclip_ds.config import EMAConfig
from tuneclip_ds.optim.state import Fragment, local_masters, state_is_partitioned

logger = logging.getLogger(__name__)


class ShardedEMA:
    """The EMA of this rank's fp32 master fragments (see the module's docstring)."""

    def __init__(self, engine, config: EMAConfig):
        self.engine = engine
        self.config = config
        self.partitioned = state_is_partitioned(engine)
        self.masters = local_masters(engine)
        self.device = _ema_device(config, self.masters, engine.device)
        self.averages = {name: Fragment(master.start, _allocate(master.values, self.device))
                         for name, master in self.masters.items()}
        # With ema.device=cpu and masters on an accelerator, each update first copies them into pinned memory.
        staged = any(master.values.device != self.device for master in self.masters.values())
        self.staging = [_allocate(master.values, self.device) for master in self.masters.values()] if staged else None
        self.updates = 0
        self.reset()
        count = sum(fragment.values.numel() for fragment in self.averages.values())
        logger.info("EMA of the weights: decay %g, every %d stage-II steps from step %d%s; %.2fM fp32 values on "
                    "this rank (%s)", config.decay, config.every, config.start_step,
                    ", with warm-up" if config.warmup else "", count / 1e6, self.device)

    def decay(self) -> float:
        """The decay of the next update: ``ema.decay``, with warm-up at most (1 + t) / (10 + t) after t updates."""
        if self.config.warmup:
            return min(self.config.decay, (1 + self.updates) / (10 + self.updates))
        return self.config.decay

    def after_step(self, stage2_step: int) -> None:
        """Follow stage-II step ``stage2_step`` (counted from 1), if DeepSpeed applied it."""
        if not self.engine.was_step_applied():
            return  # no weight changed
        start, every = self.config.start_step, self.config.every
        if stage2_step < start:
            torch._foreach_copy_(self._values(), self._weights())
        elif (stage2_step - start) % every == 0:
            torch._foreach_lerp_(self._values(), self._weights(), 1.0 - self.decay())
            self.updates += 1

    def reset(self) -> None:
        """Start the average again from the current weights."""
        self.masters = local_masters(self.engine)  # a checkpoint load may have relinked them
        torch._foreach_copy_(self._values(), self._weights())
        self.updates = 0

    def _values(self) -> list[torch.Tensor]:
        return [average.values for average in self.averages.values()]

    def _weights(self) -> list[torch.Tensor]:
        """The current fp32 masters, in the order of ``averages``, on the EMA's device."""
        weights = [self.masters[name].values for name in self.averages]
        if self.staging is None:
            return weights
        torch._foreach_copy_(self.staging, weights, non_blocking=True)  # into pinned memory: one wait for all
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()
        return self.staging

    def record(self) -> dict:
        """What a checkpoint's metadata says of its EMA (the export reads it)."""
        return {**dataclasses.asdict(self.config), "updates": self.updates}

    def state_to_save(self) -> dict | None:
        """This rank's file of a checkpoint; None at ZeRO-0 but on rank 0 (every rank holds the same)."""
        if not self.partitioned and self.engine.global_rank != 0:
            return None
        return {"updates": self.updates,
                "fragments": {name: (average.start, average.values) for name, average in self.averages.items()}}

    def load(self, folder: Path, saved_world_size: int) -> None:
        """Restore the EMA saved in the checkpoint ``folder`` by ``saved_world_size`` ranks: this rank's own
        file when the ranks are the same, else the overlapping ranges of every rank's (after ``load_engine``)."""
        self.masters = local_masters(self.engine)  # the load may have relinked them
        own = checkpoint.ema_file(folder, self.engine.global_rank)
        same_ranks = saved_world_size == self.engine.dp_world_size and own.is_file()
        self.updates = _fill(self.averages, folder, [own] if same_ranks else checkpoint.ema_files(folder))

    def full_averages(self) -> dict[str, torch.Tensor]:
        """Every averaged parameter whole, fp32 on the CPU, on every rank (a collective at ZeRO 1-3)."""
        return {name: self._gathered(name, param).cpu() for name, param in self._trained()}

    def _trained(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, param) for name, param in self.engine.module.named_parameters() if param.requires_grad]

    def _gathered(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        """The whole fp32 EMA of ``param`` on the accelerator (a collective at ZeRO 1-3)."""
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 parameters are empty outside forward
        buffer = torch.zeros(shape.numel(), device=self.engine.device)
        if name in self.averages:
            _copy_overlap(Fragment(0, buffer), self.averages[name])
        if self.partitioned:
            torch.distributed.all_reduce(buffer)  # each element is held by one rank, zeros elsewhere
        return buffer.view(shape)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside the block the module's trained parameters hold the EMA (in their own precision), after it their
        own values again, bit for bit: to evaluate the EMA through the engine. Collective at ZeRO 1-3.

        Keeps a copy of what it replaces: the trained parameters at ZeRO 0-2 (whole on every rank), the
        rank's partitions at ZeRO-3 (at ZeRO-3 in fp32 they are the masters themselves)."""
        trained = self._trained()
        zero3 = any(hasattr(param, "ds_id") for _, param in trained)
        with torch.no_grad():
            replaced = self._swap_into_partitions(trained) if zero3 else self._swap_into_parameters(trained)
        try:
            yield
        finally:
            with torch.no_grad():
                for target, original in replaced:
                    target.copy_(original)
                if zero3:
                    _regather(self.engine.module)

    def _swap_into_parameters(self, trained) -> list[tuple[torch.Tensor, torch.Tensor]]:
        replaced = []
        for name, param in trained:
            replaced.append((param.data, param.data.clone()))
            param.data.copy_(self._gathered(name, param))
        return replaced

    def _swap_into_partitions(self, trained) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each rank's partition of a parameter takes the rank's fragment of the EMA: the same elements."""
        replaced = []
        for name, param in trained:
            partition = param.ds_tensor.data
            replaced.append((partition, partition.clone()))
            if name in self.averages:
                average = self.averages[name].values
                partition.narrow(0, 0, average.numel()).copy_(average)
        _regather(self.engine.module)
        return replaced


def _regather(module: torch.nn.Module) -> None:
    """At ZeRO-3, gather again from their partitions the parameters kept whole between steps (those under
    DeepSpeed's persistence threshold), as DeepSpeed does after each step (collective)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    whole = [param for param in module.parameters() if param.ds_status == ZeroParamStatus.AVAILABLE]
    if whole:
        whole[0].partition(param_list=whole)  # frees the whole copies; the partitions stay as they are
        whole[0].all_gather(param_list=whole)


def _ema_device(config: EMAConfig, masters: dict[str, Fragment], default: torch.device) -> torch.device:
    """Where the masters are (all on one device: the accelerator, or the CPU with offload), or the CPU."""
    if config.device == "cpu":
        return torch.device("cpu")
    return next(iter(masters.values())).values.device if masters else default


def _allocate(like: torch.Tensor, device: torch.device) -> torch.Tensor:
    pinned = device.type == "cpu" and like.device.type != "cpu"  # for non-blocking copies from the accelerator
    return torch.empty(like.shape, dtype=torch.float32, device=device, pin_memory=pinned)


def build_ema(config: EMAConfig, engine) -> ShardedEMA | None:
    """The EMA of the weights, when ``ema.decay`` is set."""
    return ShardedEMA(engine, config) if config.decay is not None else None


def read_averages(folder: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The whole EMA of each parameter the checkpoint ``folder`` averaged, shaped as in ``shapes``."""
    paths = checkpoint.ema_files(folder)
    names = {name for path in paths for name in _read(path)["fragments"]}  # memory-mapped: no values read
    targets = {name: Fragment(0, torch.empty(shapes[name].numel())) for name in sorted(names)}
    _fill(targets, folder, paths)
    return {name: target.values.view(shapes[name]) for name, target in targets.items()}


def _read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _fill(targets: dict[str, Fragment], folder: Path, paths: list[Path]) -> int:
    """Copy into each of ``targets`` the ranges of the fragments saved in ``paths`` that overlap it (whatever
    the world size that wrote them); every element must be covered. Returns the saved update count."""
    if not paths:
        raise CheckpointError(f"checkpoint {folder} records an EMA of the weights but holds no ema_rank*.pt file: "
                              "it is damaged; resume from an earlier one")
    covered = dict.fromkeys(targets, 0)
    for path in paths:
        saved = _read(path)
        for name, (start, values) in saved["fragments"].items():
            if name in targets:
                covered[name] += _copy_overlap(targets[name], Fragment(start, values))
    incomplete = [name for name, target in targets.items() if covered[name] != target.values.numel()]
    if incomplete:
        raise CheckpointError(
            f"the EMA files (ema_rank*.pt) of checkpoint {folder} do not cover every element of "
            f"{', '.join(incomplete[:3])}{' and others' if len(incomplete) > 3 else ''}: a file is missing, or the "
            "run that wrote them trained other parameters (model.lock_image, model.lock_text, "
            "model.freeze_logit_scale); resume with the same trainable parameters, or from another checkpoint")
    return saved["updates"]


def _copy_overlap(target: Fragment, source: Fragment) -> int:
    """Copy the elements ``source`` and ``target`` both cover into ``target``; returns their number."""
    low = max(target.start, source.start)
    high = min(target.start + target.values.numel(), source.start + source.values.numel())
    if high <= low:
        return 0
    target.values[low - target.start:high - target.start].copy_(source.values[low - source.start:high - source.start])
    return high - low
