"""What an evaluation loads: a model from weights, or from a training run exported once per node, on the
device of this rank; and the model evaluated on a suite (shared by the command line and the WiSE-FT sweep)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from tuneclip_ds.distributed import local_rank, once_per_node
from tuneclip_ds.eval.runner import evaluate
from tuneclip_ds.eval.tasks import Suite

logger = logging.getLogger("tuneclip_ds.eval")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_checkpoint(pretrained: str) -> Path | None:
    """The checkpoint folder of the training run or checkpoint ``pretrained`` names; None for weights."""
    from tuneclip_ds import checkpoint

    path = Path(pretrained)
    if not pretrained or not path.is_dir() or (path / "open_clip_config.json").is_file():
        return None
    markers = [path / "checkpoints", path / checkpoint.LATEST, path / checkpoint.COMPLETE]
    if not any(marker.exists() for marker in markers) and not any(path.glob("*model_states.pt")):
        return None  # an open_clip folder with one weights file
    return checkpoint.find_checkpoint(path)


@contextlib.contextmanager
def exported_weights(pretrained: str):
    """The weights to load: ``pretrained`` itself, or the open_clip folder exported from the training run or
    checkpoint it names. That conversion (to full fp32 weights: the size of the model in CPU memory) runs once
    per node, by its local rank 0, into a temporary folder that it removes afterwards."""
    source = training_checkpoint(pretrained)
    if source is None:
        yield pretrained
        return
    workdir = once_per_node(lambda: _export_to_temporary_folder(source))
    try:
        yield str(workdir / "model")
    finally:
        # The node's other ranks have built their models by now: evaluation's collectives need every rank.
        if local_rank() == 0:
            shutil.rmtree(workdir, ignore_errors=True)


def _export_to_temporary_folder(source: Path) -> Path:
    from tuneclip_ds import export

    workdir = Path(tempfile.mkdtemp(prefix="tuneclip_eval_"))
    try:
        logger.info("%s", export.export_folder(source, workdir / "model"))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return workdir


def load_model(args: argparse.Namespace, weights: str, device: torch.device, rank: int):
    """The ClipBundle of --model with ``weights``, its model on ``device``."""
    from tuneclip_ds.config import ModelConfig
    from tuneclip_ds.models import build_model

    bundle = build_model(ModelConfig(name=args.model, pretrained=weights, tokenizer=args.tokenizer))
    if not args.pretrained and rank == 0:
        logger.warning("no --pretrained weights: evaluating a randomly initialised %s", args.model)
    bundle.model.to(device)
    return bundle


def evaluate_model(args: argparse.Namespace, bundle, suite: Suite, device: torch.device, rank: int,
                   world_size: int) -> dict[str, float]:
    return evaluate(bundle.model, suite, bundle.preprocess_val, bundle.tokenizer, device, rank, world_size,
                    autocast_dtype=AUTOCAST_DTYPES[args.precision])


def resolve_device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
    return device
