"""Submit a training run to Slurm through submitit: one task (rank) per GPU, requeued after preemption.

    python -m tuneclip_ds.submit --config CONFIG [key.sub=value ...] --nodes N --gpus-per-node G [--partition P ...]
    python -m tuneclip_ds.submit --config CONFIG [key.sub=value ...] --gpus-per-node 2 --local

Each task reads its rank, local rank, world size and master address from the
Slurm environment and trains exactly as ``python -m tuneclip_ds.train`` does.
On Slurm's warning signal before a time limit or a preemption, the run saves a
checkpoint after the step in flight and the job requeues itself, resuming from
that checkpoint (``--max-requeues`` times at most). ``--local`` runs the same
job on this machine (submitit's LocalExecutor, nodes x G tasks on the CPU) and
waits for it.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from tuneclip_ds import preemption, train
from tuneclip_ds.config import Config
from tuneclip_ds.errors import InputError, command

# The signal submitit's jobs get before a time limit (sbatch --signal), and its handler's.
SUBMITIT_SIGNAL = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


class SlurmError(InputError):
    """A request that this cluster cannot run, found before anything is queued."""


@dataclass
class Node:
    cpus: int
    gpus: int


class TrainingJob:
    """What every task of the job runs: one rank of the training run.

    After a preemption stop (the checkpoint is saved), rank 0 hands over to
    submitit, which calls ``checkpoint`` for the job to requeue and requeues it.
    """

    def __init__(self, config: Config, max_requeues: int, requeues: int = 0):
        self.config = config
        self.max_requeues = max_requeues
        self.requeues = requeues

    def __call__(self) -> None:
        # submitit's own handler would call checkpoint() and requeue at once, before the (collective) save:
        # ours replaces it, and rank 0 calls it once the checkpoint is written.
        requeue = signal.getsignal(SUBMITIT_SIGNAL)
        preemption.install(preemption.SIGNALS + (SUBMITIT_SIGNAL,))
        # The job's CUDA_VISIBLE_DEVICES stays: each rank takes the GPU of its local rank.
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        status = train.train(self.config)
        if status == train.PREEMPTED and env.rank == 0:
            self.config = resuming(self.config)  # what checkpoint() hands on to the requeued job
            requeue(SUBMITIT_SIGNAL, None)  # checkpoint(), scontrol requeue (which ends every task), exit
        elif status not in (0, train.PREEMPTED):
            raise RuntimeError(f"training ended with exit status {status}: see the error above in this log")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """submitit's hook on preemption and time-out: the job to requeue, or None past the requeue limit."""
        if self.requeues >= self.max_requeues:
            print(f"not requeued: the job was requeued {self.requeues} times (--max-requeues {self.max_requeues}); "
                  "submit it again with checkpoint.resume=latest to go on", file=sys.stderr)
            return None
        return submitit.helpers.DelayedSubmission(TrainingJob(self.config, self.max_requeues, self.requeues + 1))


def resuming(config: Config) -> Config:
    """``config`` resuming from the run's latest checkpoint."""
    return replace(config, checkpoint=replace(config.checkpoint, resume="latest"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tuneclip_ds.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_config_arguments(parser)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1,
                        help="tasks (ranks) per node, one per GPU; CPU tasks on a partition without GPUs")
    parser.add_argument("--partition", help="default: the cluster's default partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--time", default="60", help="time limit: minutes, or [D-]HH:MM:SS (default: 60)")
    parser.add_argument("--constraint", help="node features, as sbatch --constraint")
    parser.add_argument("--mem", help="memory per node, as sbatch --mem (e.g. 400G)")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per rank (default: a node's CPUs shared by its "
                        "GPUs, or by the tasks on a partition without GPUs): an explicit data.num_workers + 1 or more; "
                        "the automatic data.num_workers uses them less one")
    parser.add_argument("--job-name", help="default: the config's run_name")
    parser.add_argument("--exclusive", action="store_true", help="whole nodes, shared with no other job")
    parser.add_argument("--max-requeues", type=int, default=3, help="requeues after preemption or time limit")
    parser.add_argument("--signal-delay", type=int, default=90,
                        help="seconds between the warning signal and the time limit: enough to save a checkpoint")
    parser.add_argument("--local", action="store_true",
                        help="run nodes x gpus-per-node tasks on this machine, on the CPU, and wait for them")
    return parser.parse_intermixed_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = train.resolve_config(args)
    minutes = time_limit_minutes(args.time)
    executor = local_executor(args, config, minutes) if args.local else slurm_executor(args, config, minutes)
    try:
        job = executor.submit(TrainingJob(config, args.max_requeues))
    except FailedJobError as error:  # sbatch refused the job; its message says why
        raise InputError(f"the job was not queued: {error}") from None
    report(job, config)
    return wait_for(job) if args.local else 0


def time_limit_minutes(text: str) -> int:
    """``90`` or ``[D-]HH:MM:SS`` as whole minutes (rounded up)."""
    match = re.fullmatch(r"(\d+)|(?:(\d+)-)?(\d+):(\d+):(\d+)", text)
    if match is None:
        raise InputError(f"--time {text}: give minutes (90) or [D-]HH:MM:SS (1-12:00:00)")
    if match[1]:
        return int(match[1])
    days, hours, minutes, seconds = (int(group or 0) for group in match.groups()[1:])
    return ((days * 24 + hours) * 60 + minutes) + math.ceil(seconds / 60)


def log_folder(config: Config) -> Path:
    return (config.run_dir / "submitit").resolve()


def slurm_executor(args: argparse.Namespace, config: Config, minutes: int) -> submitit.SlurmExecutor:
    partition, nodes = partition_nodes(args.partition)
    gpus = gpus_per_node(nodes, partition, args.nodes, args.gpus_per_node, args.cpus_per_task or 1)
    cpus = args.cpus_per_task or default_cpus_per_task(nodes, args.nodes, args.gpus_per_node, gpus)
    warn_if_data_starved(cpus, config.data.num_workers)
    executor = submitit.SlurmExecutor(folder=log_folder(config), max_num_timeout=args.max_requeues)
    executor.update_parameters(
        job_name=args.job_name or config.run_name, nodes=args.nodes, ntasks_per_node=args.gpus_per_node,
        gpus_per_node=gpus or None, cpus_per_task=cpus, time=minutes, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, exclusive=args.exclusive or None,
        signal_delay_s=args.signal_delay,
        srun_args=["--cpus-per-task", str(cpus)],  # srun does not inherit it from sbatch (Slurm 22.05 and later)
        # --mem goes as it is: submitit would read it as a number of GB
        additional_parameters={"requeue": True, **({"mem": args.mem} if args.mem else {})},
    )
    return executor


def local_executor(args: argparse.Namespace, config: Config, minutes: int) -> submitit.LocalExecutor:
    executor = submitit.LocalExecutor(folder=log_folder(config), max_num_timeout=args.max_requeues)
    executor.update_parameters(tasks_per_node=args.nodes * args.gpus_per_node, timeout_min=minutes,
                               signal_delay_s=args.signal_delay)
    return executor


def partition_nodes(partition: str | None) -> tuple[str, list[Node]]:
    """The partition (the default one when None) and the CPUs and GPUs of each of its nodes, from sinfo."""
    if shutil.which("sinfo") is None:
        raise SlurmError("Slurm's sinfo is not on PATH: submit from a Slurm login node, or run here with --local")
    listing = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%P|%c|%G"], capture_output=True, text=True)
    if listing.returncode != 0:
        raise SlurmError(f"sinfo failed, is Slurm up? {listing.stderr.strip()}")
    rows = [line.split("|") for line in listing.stdout.splitlines()]
    names = sorted({name.rstrip("*") for name, _, _ in rows})
    default = next((name.rstrip("*") for name, _, _ in rows if name.endswith("*")), None)
    chosen = partition or default
    if chosen not in names:
        wanted = f"partition {partition} does not exist" if partition else "there is no default partition"
        raise SlurmError(f"{wanted}: give --partition, one of {', '.join(names)}")
    return chosen, [Node(int(cpus), gpu_count(gres)) for name, cpus, gres in rows if name.rstrip("*") == chosen]


def gpu_count(gres: str) -> int:
    """The GPUs in a node's generic resources, e.g. ``gpu:a100:4(S:0-1),nvme:1`` -> 4."""
    return sum(int(count) for count in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def gpus_per_node(nodes: list[Node], partition: str, count: int, tasks_per_node: int, cpus_per_task: int) -> int:
    """GPUs to ask for per node: one per task, or none on a partition without GPUs (CPU tasks).

    Raises SlurmError when fewer than ``count`` nodes of the partition can hold the tasks.
    """
    with_gpus = any(node.gpus for node in nodes)
    if with_gpus:
        capacity, need = [node.gpus for node in nodes], tasks_per_node
        what = f"{need} GPUs"
    else:
        capacity, need = [node.cpus for node in nodes], tasks_per_node * cpus_per_task
        what = f"{need} CPUs ({tasks_per_node} tasks x {cpus_per_task} CPUs; the partition has no GPUs)"
    fitting = sum(have >= need for have in capacity)
    if fitting < count:
        raise SlurmError(f"partition {partition}: the job asks for {count} node(s) with {what}, {fitting} have "
                         f"that many (the most on a node: {max(capacity)})")
    return tasks_per_node if with_gpus else 0


def default_cpus_per_task(nodes: list[Node], count: int, tasks_per_node: int, gpus: int) -> int:
    """CPUs per task when --cpus-per-task is not given (Slurm's own default, one, starves the data loader): a
    node's CPUs shared by its GPUs, one task each (the job takes its GPUs' share of the node), or by the tasks on
    a partition without GPUs; on the ``count``-th best of the nodes that hold the job, so that ``count`` fit."""
    shares = [node.cpus // (node.gpus if gpus else tasks_per_node) for node in nodes if node.gpus >= gpus]
    return max(1, sorted(shares, reverse=True)[count - 1])


def warn_if_data_starved(cpus_per_task: int, num_workers: int | None) -> None:
    """An explicit ``data.num_workers`` the CPUs cannot run beside the rank (the automatic one adapts to them)."""
    if num_workers is not None and num_workers + 1 > cpus_per_task:
        print(f"warning: {cpus_per_task} CPU(s) per task for data.num_workers={num_workers} data-loading workers "
              "and the rank itself: the GPUs may wait for data; give --cpus-per-task "
              f"{num_workers + 1} or more, or lower data.num_workers", file=sys.stderr)


def report(job, config: Config) -> None:
    first = job.task(0).paths
    print(f"job {job.job_id}: {job.num_tasks} task(s)")
    print(f"run directory: {config.run_dir.resolve()}")
    print(f"logs: {first.stdout} and {first.stderr} (rank 0; rank N writes {job.job_id}_N_log.*)")


def wait_for(job) -> int:
    """Wait for a local job; its exit status."""
    try:
        job.results()
    except KeyboardInterrupt:
        job.cancel()
        return 130
    except UncompletedJobError as error:
        print(f"error: the job failed: {error}", file=sys.stderr)
        return 1
    print("job finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
