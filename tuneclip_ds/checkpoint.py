"""Crash-safe DeepSpeed checkpoints with the trainer's own state.

Layout of ``RUN_DIR/checkpoints``::

    step_00000100/            engine.save_checkpoint(...) files (model, ZeRO partitions)
        trainer_rank00000.pt  per-rank state: data position, RNG states, loss estimator shard
        complete.json         written by rank 0 once every rank has finished writing
    latest                    the tag of the newest complete checkpoint (replaced atomically)

A save interrupted at any point leaves no ``complete.json`` and does not touch
``latest``: the previous checkpoint stays the one resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneclip_ds.errors import InputError

logger = logging.getLogger(__name__)

COMPLETE = "complete.json"
LATEST = "latest"


class CheckpointError(InputError):
    """A checkpoint that is missing, incomplete, or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"trainer_rank{rank:05d}.pt"


def save(engine, root: Path, step: int, metadata: dict, rank_state: dict, keep_last: int) -> Path:
    """Write a checkpoint from every rank; it becomes ``latest`` only when all ranks have written it."""
    tag = tag_for(step)
    checkpoint = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    _write_atomically(rank_file(checkpoint, engine.global_rank), lambda path: torch.save(rank_state, path))
    torch.distributed.barrier()  # every rank's files are on disk
    if engine.global_rank == 0:
        record = dict(metadata, step=step, world_size=engine.dp_world_size, saved_at=time.time())
        _write_atomically(checkpoint / COMPLETE, lambda path: Path(path).write_text(json.dumps(record, indent=1)))
        _write_atomically(root / LATEST, lambda path: Path(path).write_text(tag))
        _prune(root, keep_last)
        logger.info("saved checkpoint %s", checkpoint)
    torch.distributed.barrier()
    return checkpoint


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(str(partial))
    os.replace(partial, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    found = [p for p in root.glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(resume: str, root: Path) -> Path | None:
    """The checkpoint directory that ``checkpoint.resume`` names, or None to start fresh."""
    if resume == "":
        return None
    if resume in ("latest", "auto"):
        latest = _latest(root)
        if latest is None and resume == "latest":
            raise CheckpointError(
                f"checkpoint.resume=latest but {root} holds no complete checkpoint: "
                "start without resume, use resume=auto (fresh when none), or give a checkpoint path"
            )
        return latest
    return _checked(Path(resume))


def _latest(root: Path) -> Path | None:
    pointer = root / LATEST
    candidates = complete_checkpoints(root)
    chosen = root / pointer.read_text().strip() if pointer.is_file() else (candidates[-1] if candidates else None)
    if chosen is None:
        return None
    for interrupted in sorted(p for p in root.glob("step_*") if p.name > chosen.name and p not in candidates):
        logger.warning("ignoring %s: its save did not complete (interrupted job); resuming from %s",
                       interrupted, chosen)
    return _checked(chosen)


def _checked(checkpoint: Path) -> Path:
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist: give a step_* directory of a run's "
                              "checkpoints/ folder, or resume=latest")
    if not (checkpoint / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete (no {COMPLETE}: its save was interrupted "
                              "or it was copied partly); resume from an earlier one")
    return checkpoint


def read_metadata(checkpoint: Path) -> dict:
    return json.loads((checkpoint / COMPLETE).read_text())


def check_compatible(metadata: dict, expected: dict, checkpoint: Path) -> None:
    """Every key of ``expected`` must equal the checkpoint's value (model, ZeRO stage, ...)."""
    conflicts = [f"{k}: checkpoint has {metadata.get(k)!r}, this run {v!r}"
                 for k, v in expected.items() if metadata.get(k) != v]
    if conflicts:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit this run's config:\n  " + "\n  ".join(conflicts)
            + "\nResume with the config it was written with, or export its weights "
            "(python -m tuneclip_ds.export) and start a new run from them (model.pretrained)"
        )


def load_engine(engine, checkpoint: Path) -> None:
    path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {checkpoint}: the folder is damaged")


def load_rank_state(checkpoint: Path, rank: int) -> dict:
    path = rank_file(checkpoint, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is damaged; resume from an earlier one")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
