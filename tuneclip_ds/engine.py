"""The one place that builds the DeepSpeed engine: config JSON, parameter groups, optimizer, schedule."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from tuneclip_ds.config import Config, ConfigError
from tuneclip_ds.distributed import on_cpu, start_deepspeed_comm
from tuneclip_ds.optim import StageClock, build_optimizer, lr_lambda, param_groups
from tuneclip_ds.optim.osr import reset_moments

logger = logging.getLogger(__name__)

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
_AUTO = "auto"
# On CPUs glibc maps a buffer over its mmap threshold (32 MiB at most) afresh at each allocation and the kernel
# faults its pages in at first touch: DeepSpeed's gradient buckets (5e8 elements by default), made in every
# backward, then cost more than the reduction itself. Buckets of this many elements are reused from the heap.
# GPUs keep DeepSpeed's defaults: their caching allocator reuses any bucket.
CPU_BUCKET_ELEMENTS = 5_000_000


def default_ds_config_path(zero_stage: int, offload_optimizer: bool) -> Path:
    return DS_CONFIG_DIR / f"zero{zero_stage}{'_offload' if offload_optimizer else ''}.json"


def ds_config_path(config: Config) -> Path:
    """``train.deepspeed_config``, or the shipped JSON for the ZeRO stage and offload."""
    train = config.train
    return Path(train.deepspeed_config or default_ds_config_path(train.zero_stage, train.offload_optimizer))


def read_ds_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist (train.deepspeed_config)") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from None


def build_ds_config(config: Config, world_size: int) -> dict:
    """The DeepSpeed JSON with batch, precision and clipping filled in from the experiment config.

    A value the JSON sets (other than "auto") that differs from the experiment
    config is a contradiction and raises ``ConfigError`` listing every one.
    """
    path = ds_config_path(config)
    ds = read_ds_json(path)
    owned = [key for key in ("optimizer", "scheduler") if key in ds]
    if owned:
        raise ConfigError(
            f"DeepSpeed config {path} has a {' and a '.join(repr(k) for k in owned)} section, but the experiment "
            "config's optim section chooses them (optim.implementation: torch|deepspeed, optim.schedule): "
            "remove the section"
        )
    conflicts: list[str] = []
    for dotted, value, experiment_key in _experiment_values(config, world_size):
        _fill(ds, dotted, value, experiment_key, conflicts)
    if conflicts:
        raise ConfigError(
            f"DeepSpeed config {path} contradicts the experiment config:\n  "
            + "\n  ".join(conflicts)
            + "\nRemove the key from the JSON (or set it to \"auto\"), or change the experiment config."
        )
    if on_cpu():
        _fill_cpu_defaults(ds.setdefault("zero_optimization", {}))
    return ds


def _fill_cpu_defaults(zero: dict) -> None:
    """Settings for CPU ranks (gloo) where the JSON leaves them to DeepSpeed."""
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        zero.setdefault(key, CPU_BUCKET_ELEMENTS)
    if zero.get("stage") == 3:
        # ZeRO-3 gathers several parameters at once (those kept whole between steps, after each step) by
        # launching one asynchronous all-gather per parameter and waiting for the last: on gloo, whose threads
        # run collectives side by side, the others may still be writing, and a forward can read a half-gathered
        # parameter. One synchronous all-gather per parameter instead (nccl orders them on its stream).
        zero.setdefault("stage3_allgather_sequential", True)


def _gather_in_buckets(groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor,
                       allgather_bucket_size) -> None:
    """ZeRO-1/2's gather of the updated parameters after a step (DeepSpeed's ``all_gather_dp_groups``, same
    arguments), in pieces of ``allgather_bucket_size`` elements, for CPU ranks.

    DeepSpeed gathers each flat group with one ``all_gather_into_tensor`` whenever torch has it, whatever the
    bucket size; gloo does that through a temporary of the whole group (4 bytes a parameter in fp32) and a copy
    of the rank's partition, which a CPU rank faults in at its first step and keeps as its peak memory after.
    In buckets (DeepSpeed's own way where ``all_gather_into_tensor`` is missing) the temporaries are a bucket's
    size and reused. GPUs keep the single call: nccl gathers in place.
    """
    from deepspeed import comm

    for partitions, group in zip(partitioned_param_groups, dp_process_group):
        world, rank = comm.get_world_size(group=group), comm.get_rank(group=group)
        if world == 1:
            continue
        size = partitions[rank].numel()  # every rank's partition has this size (DeepSpeed pads the group)
        bucket = max(1, int(allgather_bucket_size) // world)
        for start in range(0, size, bucket):
            length = min(bucket, size - start)
            pieces = [partition.narrow(0, start, length) for partition in partitions]
            comm.all_gather(pieces, pieces[rank], group=group)


def _experiment_values(config: Config, world_size: int) -> list[tuple[str, Any, str]]:
    train = config.train
    offload = "cpu" if train.offload_optimizer else "none"
    return [
        ("train_micro_batch_size_per_gpu", train.batch_size, "train.batch_size"),
        ("gradient_accumulation_steps", train.grad_accum, "train.grad_accum"),
        ("train_batch_size", train.batch_size * train.grad_accum * world_size,
         "train.batch_size x train.grad_accum x world size"),
        ("gradient_clipping", train.grad_clip, "train.grad_clip"),
        ("bf16.enabled", train.precision == "bf16", "train.precision"),
        ("fp16.enabled", train.precision == "fp16", "train.precision"),
        ("zero_optimization.stage", train.zero_stage, "train.zero_stage"),
        ("zero_optimization.offload_optimizer.device", offload, "train.offload_optimizer"),
    ]


def _fill(ds: dict, dotted: str, value: Any, experiment_key: str, conflicts: list[str]) -> None:
    *parents, leaf = dotted.split(".")
    node = ds
    for name in parents:
        node = node.setdefault(name, {})
    current = node.get(leaf, _AUTO)
    if current != _AUTO and current != value:
        conflicts.append(f"{dotted} = {current!r} but {experiment_key} gives {value!r}")
    node[leaf] = value


def _check_precision_supported(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[precision]:
        raise ConfigError(
            f"train.precision={precision} is not supported by DeepSpeed on this "
            f"{accelerator.device_name()} accelerator; use "
            + " or ".join(p for p, ok in supported.items() if ok)
        )


def build_engine(config: Config, model: torch.nn.Module, total_steps: int, clock: StageClock | None = None):
    """``deepspeed.initialize`` for every ZeRO stage, offload and precision; returns the engine.

    ``total_steps`` is the length of stage II, whose start ``clock`` holds.
    """
    import deepspeed

    _check_precision_supported(config.train.precision)
    world_size = torch.distributed.get_world_size()
    ds_config = build_ds_config(config, world_size)
    optimizer = build_optimizer(param_groups(model, config.optim), config.optim, config.train.offload_optimizer)
    schedule = lr_lambda(config.optim, total_steps, clock)
    # The schedule multiplies each group's own base rate ("initial_lr").
    # DeepSpeed's ZeRO-0 bf16/fp16 wrapper takes one optimizer step with zero gradients when it is built:
    # at rate 0 it applies no weight decay, and the step it counted is forgotten below, so that training
    # starts exactly where a fresh AdamW would.
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = group["lr"], 0.0
    start_deepspeed_comm()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config,
        # a callable: DeepSpeed hands it the optimizer it wraps (ZeRO or not)
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    reset_moments(engine)
    if on_cpu() and config.train.zero_stage in (1, 2):
        from deepspeed.runtime.zero import stage_1_and_2

        stage_1_and_2.all_gather_dp_groups = _gather_in_buckets
    if config.train.zero_stage == 0:  # DeepSpeed reduces stage 0's gradients in buckets of a fixed 5e8 elements
        engine.allreduce_gradients = functools.partial(engine.allreduce_gradients,
                                                       bucket_size=engine.zero_reduce_bucket_size())
    logger.info(
        "DeepSpeed engine: ZeRO stage %d%s, %s, micro-batch %d x accumulation %d x %d ranks",
        config.train.zero_stage, " + CPU offload" if config.train.offload_optimizer else "",
        config.train.precision, config.train.batch_size, config.train.grad_accum, world_size,
    )
    return engine
