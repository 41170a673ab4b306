"""A pool of spawned processes forming one gloo process group, reused across tests.

Starting processes is the slow part of a distributed test (each imports torch), so a pool is
started once per world size and runs test functions on demand: ``pool.run(fn, *args)`` calls
``fn(rank, world_size, *args)`` on every rank and returns the results in rank order. ``fn`` must be
importable by name in the children (a module-level function) and must not import open_clip
(9 s per import). Each process uses one thread.
"""

import datetime
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_TIMEOUT_S = 120


class GlooPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        context = mp.get_context("spawn")
        self._tasks = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        port = _free_port()
        self._processes = [
            context.Process(target=_worker, args=(rank, world_size, port, self._tasks[rank], self._results), daemon=False)  # ranks start data-loader workers
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()

    def run(self, fn, *args):
        for task_queue in self._tasks:
            task_queue.put((fn, args))
        results = [None] * self.world_size
        failures = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=_TIMEOUT_S)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{fn.__name__} did not finish on all ranks within {_TIMEOUT_S} s") from None
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            self.close()  # other ranks may be stuck in a collective
            raise RuntimeError("\n".join(failures))
        return results

    def alive(self) -> bool:
        return all(process.is_alive() for process in self._processes)

    def close(self):
        for task_queue, process in zip(self._tasks, self._processes):
            if process.is_alive():
                task_queue.put(None)
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, tasks, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=_TIMEOUT_S)
    )
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except Exception:
            results.put((rank, False, traceback.format_exc()))
    results.close()
    results.join_thread()
    os._exit(0)  # skip interpreter teardown, where the process group's destructor waits for peers
