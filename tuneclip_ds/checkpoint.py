"""Crash-safe DeepSpeed checkpoints with the trainer's own state.

Layout of ``RUN_DIR/checkpoints``::

    step_00000100/            engine.save_checkpoint(...) files (model, ZeRO partitions)
        trainer_rank00000.pt  per-rank state: data position, RNG states, loss estimator shard
        ema_rank00000.pt      with ema.decay: the rank's part of the EMA of the weights (ZeRO-0: rank 0's only)
        complete.json         written by rank 0 once every rank has finished writing
        universal/            DeepSpeed's universal form, made on the first resume on another world size
                              (or ahead of it: python -m tuneclip_ds.checkpoint convert CHECKPOINT)
    latest                    the tag of the newest complete checkpoint (replaced atomically)
    best                      the tag of the best-evaluated one (eval.select); pruning keeps it

A save interrupted at any point leaves no ``complete.json`` and does not touch
``latest``: the previous checkpoint stays the one resumed from.

On another number of ranks, ZeRO-1/2/3 partitions are converted once by rank 0
with DeepSpeed's ``ds_to_universal`` and loaded with its ``load_universal``
option; ZeRO-0 state is replicated and loads as it is. The per-rank trainer
state is rebuilt (``load_rank_state``).

    python -m tuneclip_ds.checkpoint convert RUN_DIR_OR_CHECKPOINT [--workers N]

converts ahead of the job, with N processes, instead of rank 0 alone while the
other ranks wait.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneclip_ds.distributed import wait_for_rank0
from tuneclip_ds.errors import InputError, command

logger = logging.getLogger(__name__)

COMPLETE = "complete.json"
LATEST = "latest"
BEST = "best"
UNIVERSAL = "universal"


class CheckpointError(InputError):
    """A checkpoint that is missing, incomplete, or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"trainer_rank{rank:05d}.pt"


def ema_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"ema_rank{rank:05d}.pt"


def ema_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("ema_rank*.pt"))


def save(engine, root: Path, step: int, metadata: dict, rank_state: dict, keep_last: int,
         ema_state: dict | None = None) -> Path:
    """Write a checkpoint from every rank; it becomes ``latest`` only when all ranks have written it."""
    tag = tag_for(step)
    checkpoint = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    write_atomically(rank_file(checkpoint, engine.global_rank), lambda path: torch.save(rank_state, path))
    if ema_state is not None:
        write_atomically(ema_file(checkpoint, engine.global_rank), lambda path: torch.save(ema_state, path))
    torch.distributed.barrier()  # every rank's files are on disk
    record = dict(metadata, step=step, world_size=engine.dp_world_size, saved_at=time.time())
    # Pruning old checkpoints can take long on a shared filesystem: the other ranks wait outside the collectives.
    wait_for_rank0(lambda: _complete(root, tag, record, keep_last))
    return checkpoint


def _complete(root: Path, tag: str, record: dict, keep_last: int) -> None:
    """Mark the checkpoint ``tag`` complete and latest (rank 0), and delete those past ``keep_last``."""
    write_atomically(root / tag / COMPLETE, lambda path: Path(path).write_text(json.dumps(record, indent=1)))
    write_atomically(root / LATEST, lambda path: Path(path).write_text(tag))
    _prune(root, keep_last)
    logger.info("saved checkpoint %s", root / tag)


def write_atomically(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(str(partial))
    os.replace(partial, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    found = [p for p in root.glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _prune(root: Path, keep_last: int) -> None:
    best = (root / BEST).read_text().strip() if (root / BEST).is_file() else None
    for old in complete_checkpoints(root)[:-keep_last]:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def mark_best(root: Path, step: int) -> None:
    """Point ``best`` at the checkpoint of ``step`` (rank 0; the checkpoint is complete)."""
    write_atomically(root / BEST, lambda path: Path(path).write_text(tag_for(step)))
    logger.info("best checkpoint so far: %s", root / tag_for(step))


def find_best(root: Path) -> Path:
    pointer = root / BEST
    if not pointer.is_file():
        raise CheckpointError(f"{root} has no best checkpoint: it is chosen by eval.select during training")
    return check_complete(root / pointer.read_text().strip())


def resolve(resume: str, root: Path) -> Path | None:
    """The checkpoint directory that ``checkpoint.resume`` names, or None to start fresh."""
    if resume == "":
        return None
    if resume in ("latest", "auto"):
        latest = find_latest(root)
        if latest is None and resume == "latest":
            raise CheckpointError(
                f"checkpoint.resume=latest but {root} holds no complete checkpoint: "
                "start without resume, use resume=auto (fresh when none), or give a checkpoint path"
            )
        return latest
    return check_complete(Path(resume))


def find_latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names (else the newest complete one); None when there is none."""
    pointer = root / LATEST
    candidates = complete_checkpoints(root)
    chosen = root / pointer.read_text().strip() if pointer.is_file() else (candidates[-1] if candidates else None)
    if chosen is None:
        return None
    for interrupted in sorted(p for p in root.glob("step_*") if p.name > chosen.name and p not in candidates):
        logger.warning("ignoring %s: its save did not complete (interrupted job); resuming from %s",
                       interrupted, chosen)
    return check_complete(chosen)


def check_complete(checkpoint: Path) -> Path:
    """``checkpoint``, if it is a checkpoint folder whose save completed."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist: give a step_* directory of a run's "
                              "checkpoints/ folder, or resume=latest")
    if not (checkpoint / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete (no {COMPLETE}: its save was interrupted "
                              "or it was copied partly); resume from an earlier one")
    return checkpoint


def find_checkpoint(path: Path, best: bool = False) -> Path:
    """The checkpoint ``path`` names: a ``step_*`` folder, or the latest (or ``best``) complete one of a
    run directory or of its ``checkpoints/`` folder."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a run directory or one of its checkpoints/step_* folders")
    if (path / COMPLETE).is_file() or any(path.glob("*model_states.pt")):  # a checkpoint folder
        if best:
            raise CheckpointError(f"--best picks a checkpoint of a run: give the run directory, not {path}")
        return check_complete(path)
    if (path / "checkpoints").is_dir():  # a run directory
        path = path / "checkpoints"
    elif not ((path / LATEST).is_file() or any(path.glob("step_*"))):  # nor a checkpoints/ folder
        raise CheckpointError(f"{path} is not a run directory or checkpoint: expected checkpoints/, or a "
                              f"step_* folder with DeepSpeed's files and {COMPLETE}")
    if best:
        return find_best(path)
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (none was saved, or every save was interrupted)")
    return latest


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


def load_engine(engine, checkpoint: Path, saved_world_size: int) -> None:
    """Restore weights, optimizer and schedule; through the universal form when the ZeRO
    partitions were written by another number of ranks."""
    if saved_world_size == engine.dp_world_size or engine.zero_optimization_stage() == 0:
        _load(engine, checkpoint)
        return
    logger.info("checkpoint %s was written by %d ranks, this run has %d: loading its universal form",
                checkpoint, saved_world_size, engine.dp_world_size)
    universal = to_universal(checkpoint)
    config = engine._config  # DeepSpeed reads this flag only while loading (engine.load_universal_checkpoint())
    previous, config.load_universal_checkpoint = config.load_universal_checkpoint, True
    try:
        _load(engine, universal)
    finally:
        config.load_universal_checkpoint = previous
    _restore_param_group_options(engine, universal)


def _load(engine, checkpoint: Path) -> None:
    path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {checkpoint}: the folder is damaged")


def to_universal(checkpoint: Path) -> Path:
    """``checkpoint/universal``, converted by rank 0 unless that was done before (collective: the others wait)."""
    wait_for_rank0(lambda: _convert_once(checkpoint))
    return checkpoint / UNIVERSAL


def _convert_once(checkpoint: Path) -> None:
    if (checkpoint / UNIVERSAL).is_dir():
        return
    logger.warning("converting %s to DeepSpeed's universal format on rank 0 while the other ranks wait (up to "
                   "train.wait_timeout_minutes); for a large model, convert it ahead of the job next time, with "
                   "several processes: python -m tuneclip_ds.checkpoint convert %s", checkpoint, checkpoint)
    # One process: forking a process that holds a process group (and maybe a CUDA context) is not safe.
    convert_to_universal(checkpoint, workers=1)


def convert_to_universal(checkpoint: Path, workers: int) -> Path:
    """``checkpoint/universal`` written by DeepSpeed's ``ds_to_universal`` with ``workers`` processes for each
    of its parallel parts; run in this process (0.5 s for the tiny test model against 5.6 s as a subprocess,
    mostly imports)."""
    from deepspeed.checkpoint import ds_to_universal

    universal = checkpoint / UNIVERSAL
    partial = universal.with_name(universal.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a conversion that was killed
    try:
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(checkpoint), output_folder=str(partial), num_extract_workers=workers,
            num_merge_workers=workers, keep_temp_folder=False, strict=True,
            inject_missing_state=True,  # ZeRO-1/2 files of a model without tensor parallelism lack its version entry
        ))
    except Exception as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"cannot resume {checkpoint} on another number of ranks: DeepSpeed's conversion to "
                              f"a universal checkpoint failed ({type(error).__name__}: {error}); resume on the "
                              "number of ranks that wrote it") from error
    (checkpoint / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer; unused here
    os.replace(partial, universal)
    return universal


def _restore_param_group_options(engine, universal: Path) -> None:
    """Each param group's own options (weight decay, betas, ...): at ZeRO-3, DeepSpeed 0.19.7 gives
    every group those of the first, which would put weight decay on the no-decay group."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    for group, options in zip(engine.optimizer.param_groups, saved["param_groups"], strict=True):
        group.update({key: value for key, value in options.items() if key != "params"})


def load_rank_state(checkpoint: Path, rank: int, saved_world_size: int, world_size: int) -> dict:
    """This rank's trainer state: its own file, or, from a checkpoint of another number of ranks,
    a state rebuilt from all of them (the data position cannot carry over, see below)."""
    if saved_world_size == world_size:
        return _read_rank_state(checkpoint, rank)
    first = _read_rank_state(checkpoint, 0)
    epoch = first["data"]["epoch"]
    if rank == 0:
        logger.warning(
            "checkpoint %s was written by %d ranks, this run has %d: each rank's data position does not "
            "carry over, so epoch %d restarts from its beginning (samples it has already given are seen again)",
            checkpoint, saved_world_size, world_size, epoch)
    # Per-sample loss state (GCL's estimators) is keyed by sample id: each rank keeps the ids it owns
    # among every old rank's share, read one file at a time. A loss without state saved an empty dict.
    loss = (_read_rank_state(checkpoint, r)["loss"] for r in range(saved_world_size)) if first["loss"] else {}
    # Every rank takes rank 0's RNG states, as every rank of a fresh run starts from the same seed.
    return {"data": {"epoch": epoch, "batches_in_epoch": 0}, "rng": first["rng"], "loss": loss}


def _read_rank_state(checkpoint: Path, rank: int) -> dict:
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


def convert(source: Path, workers: int) -> str:
    """Convert the checkpoint ``source`` names (a run directory: its latest) for resuming on another number of
    ranks; returns what was done."""
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    folder = find_checkpoint(source)
    if read_metadata(folder)["zero_stage"] == 0:
        return f"{folder} is a ZeRO-0 checkpoint: it resumes on any number of ranks as it is, nothing to convert"
    if (folder / UNIVERSAL).is_dir():
        return f"{folder / UNIVERSAL} exists already: a resume on another number of ranks loads it"
    universal = convert_to_universal(folder, workers)
    return f"wrote {universal}: a resume on another number of ranks loads it without converting"


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneclip_ds.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    converter = commands.add_parser("convert", help="convert a checkpoint for resuming on another number of ranks")
    converter.add_argument("checkpoint", type=Path, help="a run directory (its latest checkpoint) or a step_* folder")
    converter.add_argument("--workers", type=int, default=4,
                           help="processes for the conversion's parallel parts (each holds one rank's share)")
    args = parser.parse_args(argv)
    print(convert(args.checkpoint, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
