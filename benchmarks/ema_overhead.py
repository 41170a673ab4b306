"""What the EMA of the weights adds to a training step: steps with and without its update, in one run.

    .venv/bin/python benchmarks/ema_overhead.py                      # tiny-ViT, 2 CPU ranks, ZeRO-2, fp32
    .venv/bin/python benchmarks/ema_overhead.py --zero 3 --precision bf16 --rounds 20

One trainer, built as ``python -m tuneclip_ds.train`` builds it (``ema.decay`` set), on ``--ranks``
gloo processes fed fixed random batches (no data loading). Its steps alternate in blocks of
``--block`` steps: ``train_step()`` alone (EMA off), then ``train_step()`` and the EMA's update
(``ema.after_step``, as the trainer calls it: on), ``--rounds`` times after ``--warmup`` steps. The
table gives the median wall-clock time of a step of each arm on rank 0 (the ranks move in lockstep),
their ratio (the target is at most 1.05), and the median time of the update alone.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOBAL_BATCH_SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-ViT")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--image-size", type=int, default=32, help="the model's input size")
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--block", type=int, default=5, help="steps of one arm before the other")
    parser.add_argument("--rounds", type=int, default=10, help="blocks of each arm")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="torch threads per rank")
    return parser.parse_args(argv)


def fixed_batches(args, rank: int):
    """This rank's share of an endless stream of random global batches."""
    generator = torch.Generator().manual_seed(GLOBAL_BATCH_SEED + rank)
    while True:
        yield {"image": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator),
               "text": torch.randint(1, 49407, (args.batch_size, 32), generator=generator),
               "sample_id": torch.arange(args.batch_size)}


def time_arms(trainer, args) -> dict[str, list[float]]:
    """Seconds per step of each arm, and of the EMA update alone."""
    timings = {"off": [], "on": [], "update": []}

    def step(ema_on: bool) -> None:
        began = time.perf_counter()
        trainer.train_step()
        stepped = time.perf_counter()
        if ema_on:
            trainer.ema.after_step(trainer.stage2_step)
        done = time.perf_counter()
        timings["on" if ema_on else "off"].append(done - began)
        if ema_on:
            timings["update"].append(done - stepped)

    for _ in range(args.warmup):
        trainer.train_step()
    for _ in range(args.rounds):
        for ema_on in (False, True):
            for _ in range(args.block):
                step(ema_on)
    return timings


def run_rank(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.ranks), LOCAL_WORLD_SIZE=str(args.ranks))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    import tuneclip_ds  # noqa: F401  (torchvision on a CPU-only torch, before open_clip)
    from tuneclip_ds.builders import build_run
    from tuneclip_ds.config import load_config

    steps = args.warmup + 2 * args.rounds * args.block
    config = load_config(None, [
        f"model.name={args.model}", f"train.steps={steps}", f"train.batch_size={args.batch_size}",
        f"train.zero_stage={args.zero}", f"train.precision={args.precision}", f"ema.decay={args.decay}",
        "optim.lr=1e-4", "checkpoint.save_at_end=false", "output_dir=/tmp/ema_overhead", "log.every=1000000",
    ])
    trainer = build_run(config, rank, args.ranks, batches=fixed_batches(args, rank))
    timings = time_arms(trainer, args)
    if rank == 0:
        print(report(args, timings, sum(a.values.numel() for a in trainer.ema.averages.values())))
    dist.destroy_process_group()


def report(args, timings: dict[str, list[float]], values: int) -> str:
    off, on, update = (statistics.median(timings[arm]) for arm in ("off", "on", "update"))
    return "\n".join([
        f"{args.model}, {args.ranks} ranks, ZeRO-{args.zero}, {args.precision}, batch {args.batch_size} per rank; "
        f"EMA of {values / 1e6:.2f}M values on rank 0; {args.rounds} rounds of {args.block} steps per arm",
        "",
        "| EMA off, s/step | EMA on, s/step | on / off | update alone, ms | update / step off |",
        "|---|---|---|---|---|",
        f"| {off:.4f} | {on:.4f} | {on / off:.3f} | {1000 * update:.2f} | {update / off:.3%} |",
    ])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    mp.spawn(run_rank, args=(args, free_port()), nprocs=args.ranks)


if __name__ == "__main__":
    main()
