"""Process-group set-up shared by every launcher (deepspeed, torchrun, Slurm, a plain python), and the way
ranks wait while one of them works alone."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import subprocess
from datetime import timedelta
from typing import Callable, TypeVar

import torch

from tuneclip_ds.config import WAIT_TIMEOUT_MINUTES
from tuneclip_ds.errors import InputError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(world_size: int, worker: Callable[..., T], *args, backend: str = "gloo") -> list[T]:
    """``worker(rank, world_size, None, *args)`` (``None``: the world's group) on each of ``world_size`` fresh
    processes forming a process group on this machine, one torch thread each (``backend`` gloo: on the CPU; nccl:
    rank r on GPU r); their results in rank order. A rank's error is raised here (the others are ended).
    For measurements and tools, not training."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    ranks = mp.spawn(_spawned_rank, args=(world_size, free_port(), backend, results, worker, args), nprocs=world_size,
                     join=False)
    outcomes, done = {}, False
    while not done:
        done = ranks.join(timeout=0.1)  # raises if a rank failed
        while not results.empty():  # read as they come: a rank writing a large result waits for the reader
            rank, result = results.get()
            outcomes[rank] = result
    return [outcomes[rank] for rank in range(world_size)]


def _spawned_rank(rank: int, world_size: int, port: int, backend: str, results, worker, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=5))
    results.put((rank, worker(rank, world_size, None, *args)))
    torch.distributed.barrier()  # no rank leaves the group while another still talks to it
    torch.distributed.destroy_process_group()


def init_distributed() -> tuple[int, int]:
    """Start the process group from the launcher's environment; return (rank, world size).

    A plain ``python -m tuneclip_ds.train`` runs as a world of one. The backend
    is DeepSpeed's choice for the accelerator (nccl on GPUs, gloo on CPU).
    """
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        # A task that srun started; a job's batch script has SLURM_PROCID too, but runs as a single process.
        srun_task = "SLURM_STEP_ID" in os.environ
        os.environ.update(_slurm_environment() if srun_task else _single_process_environment())
    _limit_cpu_threads()
    if on_cpu():
        keep_freed_memory()
    else:
        get_accelerator().set_device(local_rank())
    start_deepspeed_comm()
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def on_cpu() -> bool:
    """Whether DeepSpeed's accelerator is the CPU (gloo ranks) rather than a GPU."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def start_deepspeed_comm() -> None:
    """DeepSpeed's communication backend, over the process group when one is started (else it starts one);
    nothing when DeepSpeed has it already.

    On CPUs DeepSpeed builds and loads a C++ shared-memory all-reduce when the backend starts: about 20 s
    of compilation in a fresh environment (and again whenever another environment built it last in the
    shared extension cache), 4 s to load it otherwise. Only its tensor-parallel inference calls that
    all-reduce, never training, so it is left out.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if on_cpu():
        shared_memory_op = get_accelerator().get_op_builder("ShareMemCommBuilder")
        if shared_memory_op is not None:
            deepspeed.ops.__compatible_ops__[shared_memory_op.NAME] = False
    deepspeed.init_distributed()


def local_rank() -> int:
    """This rank's place on its node (the launcher's LOCAL_RANK; 0 for a single process)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def shutdown() -> None:
    """End the process group (and the waiting group with it)."""
    global _waiting_group
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _waiting_group = None


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


def ranks_per_node() -> int:
    """As torchrun and the Slurm mapping (LOCAL_WORLD_SIZE) or DeepSpeed's launcher (LOCAL_SIZE) set it; 1 if
    neither does."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity, which Slurm's --cpus-per-task and taskset bound."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpus_per_rank() -> int:
    """This rank's share of the CPUs: an affinity narrower than the node is taken as the rank's own (srun
    binds each task to its --cpus-per-task); the whole node is shared by the ranks on it."""
    available = available_cpus()
    if available < (os.cpu_count() or available):
        return available
    return max(1, available // max(1, ranks_per_node()))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
_KEEP_BELOW = 1 << 30  # bytes: buffers up to this size come from the process's heap
_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for the next allocation of this process (a CPU rank); whether it could.

    By default glibc maps each buffer over 32 MiB afresh and hands it back to the kernel when it is freed, so
    that the next one's pages are faulted in again: DeepSpeed makes several such buffers in every step (ZeRO-2's
    flat gradient partition, its flattened copy, the gathered parameters), which cost a CPU rank more system time
    than the gradient reduction itself. (PyTorch's CPU tuning guide swaps in tcmalloc or jemalloc for the same
    reason.) Every thread allocates from the one heap: a buffer over 64 MiB that gloo's threads make (ZeRO-2's
    gathered parameters, where a JSON's ``allgather_bucket_size`` asks for large pieces) is otherwise mapped
    afresh in a thread's own arena whatever the threshold, since those arenas hold nothing that large. The
    resident memory keeps its peak instead of shrinking after it. A user's own ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_ARENA_MAX`` leaves all three as they are; call this before the process
    group starts its threads."""
    if any(name in os.environ for name in _MALLOC_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(parameter, value) for parameter, value in
                   [(_M_MMAP_THRESHOLD, _KEEP_BELOW), (_M_TRIM_THRESHOLD, _KEEP_BELOW), (_M_ARENA_MAX, 1)])
    except (OSError, AttributeError):  # not glibc
        return False


def _limit_cpu_threads() -> None:
    """Share the cores between the ranks of a node unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, available_cpus() // max(1, ranks_per_node())))


# Ranks waiting for one rank's long work (a checkpoint conversion, a model load) must not sit in a collective
# of the training's process group: on GPUs NCCL's watchdog ends a rank after that group's timeout (DeepSpeed's
# default: 10 minutes). They wait in a gloo group of their own, made on first use, whose timeout is this.
_wait_minutes = WAIT_TIMEOUT_MINUTES
_waiting_group = None


def set_wait_timeout(minutes: float) -> None:
    """How long ``wait_for`` lets ranks wait (``train.wait_timeout_minutes``)."""
    global _wait_minutes, _waiting_group
    if minutes != _wait_minutes:
        _wait_minutes, _waiting_group = minutes, None


def wait_for(work: Callable[[], T], here: bool) -> T | None:
    """Run ``work`` on the ranks where ``here`` is true while the others wait; its result where it ran.

    Collective: every rank calls it at the same point. A failure reaches every rank: the failed rank raises its
    own error, the others one with its message (an ``InputError`` for bad input), instead of waiting on.
    """
    if _world_size() == 1:
        return work() if here else None
    group = _waiting()
    result, failure = None, None
    if here:
        try:
            result = work()
        except Exception as error:  # the others hear of it below
            failure = error
    outcomes = [None] * _world_size()
    torch.distributed.all_gather_object(outcomes, _outcome(failure), group=group)
    if failure is not None:
        raise failure
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            bad_input, message = outcome
            raise InputError(message) if bad_input else RuntimeError(f"rank {rank} failed: {message}")
    return result


def _waiting():
    """The waiting group (collective the first time)."""
    global _waiting_group
    if _waiting_group is None:
        _waiting_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(minutes=_wait_minutes))
    return _waiting_group


def wait_for_rank0(work: Callable[[], T]) -> T | None:
    """``work`` on rank 0 while the other ranks wait (see ``wait_for``); its result on rank 0."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return wait_for(work, here=rank == 0)


def once_per_node(work: Callable[[], T]) -> T:
    """``work`` on each node's local rank 0 while the others wait (see ``wait_for``); every rank gets the result
    of its node's (something small: it is sent to every rank)."""
    first = local_rank() == 0
    result = wait_for(work, here=first)
    if _world_size() == 1:
        return result
    node = socket.gethostname()
    shared = [None] * _world_size()
    torch.distributed.all_gather_object(shared, (node, first, result), group=_waiting())
    return next(theirs for host, by_first, theirs in shared if host == node and by_first)


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _outcome(failure: Exception | None) -> tuple[bool, str] | None:
    if failure is None:
        return None
    if isinstance(failure, InputError):
        return True, str(failure)
    return False, f"{type(failure).__name__}: {failure}"
