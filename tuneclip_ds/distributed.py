"""Process-group set-up shared by every launcher (deepspeed, torchrun, Slurm, a plain python)."""

from __future__ import annotations

import logging
import os
import socket

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
        os.environ.update(_slurm_environment() if "SLURM_PROCID" in os.environ else _single_process_environment())
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

    MASTER_ADDR / MASTER_PORT must be exported by the job script (see slurm/train.sbatch).
    """
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"{name} is not set: export it in the job script before srun (see slurm/train.sbatch)")
    return {
        "RANK": os.environ["SLURM_PROCID"],
        "LOCAL_RANK": os.environ["SLURM_LOCALID"],
        "WORLD_SIZE": os.environ["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
    }


def _limit_cpu_threads() -> None:
    """Share the cores between the ranks of a node unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, ranks_here)))
