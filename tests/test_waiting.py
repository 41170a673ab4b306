"""Ranks that wait while rank 0 works alone: for longer than the collectives' timeout, and told of its failures."""

import contextlib
import datetime
import time
from pathlib import Path

import pytest
import torch

from gloo_pool import _TIMEOUT_S as POOL_TIMEOUT_S
from tuneclip_ds.errors import InputError

COLLECTIVE_TIMEOUT_S = 2  # stands for the 10 minutes after which NCCL's watchdog ends a GPU job's rank
RANK0_WORK_S = 2 * COLLECTIVE_TIMEOUT_S


@contextlib.contextmanager
def collective_timeout(seconds: float):
    """The default process group's timeout, for the block (torch has no public way to change it)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=seconds))
    try:
        yield
    finally:
        _set_pg_timeout(datetime.timedelta(seconds=POOL_TIMEOUT_S))


def slowly(work):
    def run(*args, **kwargs):
        time.sleep(RANK0_WORK_S)
        return work(*args, **kwargs)

    return run


def slow_rank0_phases(rank, world_size, root: Path):
    """Rank 0 writes the synthetic corpus, then converts a checkpoint for another world size, each for longer than
    the collectives' timeout; returns how long this rank took, the shards and whether the conversion is there."""
    from tuneclip_ds import checkpoint
    from tuneclip_ds.builders import ensure_synthetic_corpus
    from tuneclip_ds.config import load_config
    from tuneclip_ds.data import synthetic

    data = load_config(None, ["train.steps=1", f"data.train_shards={root / 'train'}", "data.synthetic.num_samples=4",
                              "data.synthetic.samples_per_shard=4", "data.synthetic.image_size=16"]).data
    with pytest.MonkeyPatch.context() as patch, collective_timeout(COLLECTIVE_TIMEOUT_S):
        patch.setattr(synthetic, "write_synthetic_corpus", slowly(synthetic.write_synthetic_corpus))
        patch.setattr(checkpoint, "convert_to_universal",
                      slowly(lambda folder, workers: (folder / checkpoint.UNIVERSAL).mkdir()))
        started = time.monotonic()
        ensure_synthetic_corpus(data)
        universal = checkpoint.to_universal(root / "step_00000003")
        torch.distributed.barrier()  # the training's process group is still usable
        took = time.monotonic() - started
    return took, sorted(path.name for path in (root / "train").iterdir()), universal.is_dir()


def test_rank0_work_outlasts_the_collective_timeout(pool, tmp_path):
    (tmp_path / "step_00000003").mkdir()
    results = pool.run(slow_rank0_phases, tmp_path)
    for took, shards, converted in results:
        assert took > 2 * RANK0_WORK_S  # rank 1 waited for both, far past the collectives' timeout
        assert shards == ["train-000000.tar"] and converted


def failing_rank0_work(rank, world_size) -> list[str]:
    from tuneclip_ds.distributed import wait_for_rank0

    raised = []
    for error in (InputError("the weights file is damaged"), OSError("disk full")):
        def fail(error=error):
            raise error

        try:
            wait_for_rank0(fail)
        except Exception as caught:
            raised.append(f"{type(caught).__name__}: {caught}")
    return raised


def test_a_failure_of_rank0_reaches_every_rank(pool):
    on_rank0, on_rank1 = pool.run(failing_rank0_work)
    assert on_rank0 == ["InputError: the weights file is damaged", "OSError: disk full"]
    # Bad input stays one clear message on every rank; anything else names the rank that failed.
    assert on_rank1 == ["InputError: the weights file is damaged", "RuntimeError: rank 0 failed: OSError: disk full"]
