"""Process-group set-up shared by every launcher (deepspeed, torchrun, Slurm, a plain python)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess

import torch

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Start the process group from the launcher's environment; return (rank, world size).

    A plain ``python -m tuneclip_ds.train`` runs as a world of one. The backend
    is DeepSpeed's choice for the accelerator (nccl on GPUs, gloo on CPU).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        # A task that srun started; a job's batch script has SLURM_PROCID too, but runs as a single process.
        srun_task = "SLURM_STEP_ID" in os.environ
        os.environ.update(_slurm_environment() if srun_task else _single_process_environment())
    _limit_cpu_threads()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank)
    deepspeed.init_distributed()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _single_process_environment() -> dict[str, str]:
    return {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port())),
    }


def _slurm_environment() -> dict[str, str]:
    """torch.distributed's variables from a task that ``srun`` started (one task per GPU).

    The master is the job's first node, on a port derived from the job id, unless the job script chose.
    """
    here = tasks_on_node(os.environ["SLURM_STEP_TASKS_PER_NODE"], int(os.environ["SLURM_NODEID"]))
    return {
        "RANK": os.environ["SLURM_PROCID"],
        "LOCAL_RANK": os.environ["SLURM_LOCALID"],
        "WORLD_SIZE": os.environ["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": str(here),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or _first_host(os.environ["SLURM_STEP_NODELIST"]),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000),
    }


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """The task count of node ``node`` in Slurm's compressed per-node counts, e.g. ``"4(x2),3"``."""
    counts = []
    for group in tasks_per_node.split(","):
        count, _, repeat = group.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[node]


def _first_host(nodelist: str) -> str:
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def _limit_cpu_threads() -> None:
    """Share the cores between the ranks of a node unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, ranks_here)))
