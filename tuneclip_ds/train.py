"""Entry point: ``deepspeed|torchrun|python -m tuneclip_ds.train --config FILE [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from tuneclip_ds import preemption
from tuneclip_ds.config import Config, ConfigError, load_config, save_config
from tuneclip_ds.errors import InputError


# Exit statuses besides 0 (done) and 2 (bad input, before or while building the run):
NONFINITE_LOSS = 3  # stopped on a NaN/inf loss (train.on_nonfinite_loss, train.max_skipped_steps)
PREEMPTED = 75  # stopped by a preemption signal after its checkpoint (sysexits' "try again later")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tuneclip_ds.train", description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser.parse_args(argv)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that name the experiment (shared with tuneclip_ds.submit)."""
    parser.add_argument("--config", help="experiment YAML (see configs/)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", help="DeepSpeed JSON (default: ds_configs/)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as optim.lr=1e-5 train.steps=100")


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    return load_config(args.config, overrides)


def setup_logging(rank: int) -> None:
    """Our progress on rank 0; warnings and errors from every rank and library (open_clip's own progress
    goes to the root logger at INFO: it would bury ours)."""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    logging.getLogger("tuneclip_ds").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = resolve_config(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    preemption.install()
    return train(config)


def train(config: Config) -> int:
    """Train as one rank of the world the launcher's environment describes; returns the exit status."""
    from tuneclip_ds.distributed import init_distributed, shutdown
    from tuneclip_ds.trainer import NonFiniteLossError

    rank, world_size = init_distributed()
    setup_logging(rank)
    try:
        trainer = run(config, rank, world_size)
        # No rank leaves before all are done (rank 0's last TensorBoard events included): srun, torchrun and
        # deepspeed kill the other ranks when one exits with a nonzero status such as PREEMPTED.
        torch.distributed.barrier()
    except (InputError, NonFiniteLossError) as error:  # bad input found while building, or a NaN/inf loss (the
        # global batch's: every rank stops at the same step): a message, no traceback
        logging.getLogger("tuneclip_ds").error("%s", error)
        return NONFINITE_LOSS if isinstance(error, NonFiniteLossError) else 2
    finally:
        shutdown()
    if trainer.stop_requested:
        return PREEMPTED
    history = trainer.history
    if rank == 0 and history.losses:
        print(f"run directory: {config.run_dir}")
        print(f"loss: {history.losses[0]:.4f} at the first step -> {history.losses[-1]:.4f} at the last")
    return 0


def run(config: Config, rank: int, world_size: int):
    """Build the run and train it; returns the trainer."""
    from tuneclip_ds.builders import build_run

    if rank == 0:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, config.run_dir / "config.yaml")
    trainer = build_run(config, rank, world_size)
    trainer.run()
    return trainer


if __name__ == "__main__":
    sys.exit(main())
