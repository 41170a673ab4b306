"""Export a checkpoint's weights for open_clip.

    python -m tuneclip_ds.export RUN_DIR_OR_CHECKPOINT --folder OUT                 # recommended
    python -m tuneclip_ds.export RUN_DIR_OR_CHECKPOINT --output model.pt [--safetensors]
    python -m tuneclip_ds.export RUN_DIR_OR_CHECKPOINT --ema --folder OUT             # the EMA of the weights

A run directory means its latest complete checkpoint. ``--folder`` writes an
open_clip folder: ``open_clip_config.json`` (the model's config as trained,
image size included, and its preprocessing), the weights as
``open_clip_model.safetensors`` and, for a model with a Hugging Face tokenizer,
its files. It needs nothing of this package to load::

    model, _, preprocess = open_clip.create_model_and_transforms('local-dir:OUT')
    tokenizer = open_clip.get_tokenizer('local-dir:OUT')

``--output`` writes the weights alone, for ``open_clip.create_model(MODEL,
pretrained=FILE)`` where open_clip knows MODEL's config (the line to use is
printed). The weights are fp32 (DeepSpeed's fp32 master copies where training
kept them) with a 0-dim ``logit_scale``/``logit_bias`` like open_clip's own
checkpoints; ``--dtype fp16`` (or bf16) halves them, for shipping; open_clip
casts the values to the model's precision on load. ``--ema`` writes the
run's EMA of the weights instead (``ema.decay``), with its frozen parameters
and buffers from the weights, in the same formats.

``--wise-ft ALPHA`` exports WiSE-FT weights: ``(1 - ALPHA) * start + ALPHA * fine-tuned``, the start being
the run's ``model.pretrained`` (see tuneclip_ds/wise_ft.py) and the fine-tuned weights the model's, or with
``--ema`` their EMA.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from tuneclip_ds import checkpoint, wise_ft
from tuneclip_ds.checkpoint import CheckpointError, find_checkpoint
from tuneclip_ds.config import OptimConfig
from tuneclip_ds.errors import InputError, command
from tuneclip_ds.tokenizer import tokenizer_files

STAGE0_STATES = "mp_rank_00_model_states.pt"
ZERO_DIM = ("logit_scale", "logit_bias")  # kept as [1] in training for DeepSpeed, 0-dim in open_clip files
FOLDER_CONFIG = "open_clip_config.json"
FOLDER_WEIGHTS = "open_clip_model.safetensors"  # the first name open_clip's 'local-dir:' loader looks for
OUR_CONFIGS = Path(__file__).parent / "model_configs"  # registered with open_clip by tuneclip_ds.models only


def fp32_weights(folder: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The model's state dict in fp32 from a DeepSpeed checkpoint folder."""
    try:
        if zero_stage == 0:
            return _stage0_weights(folder)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {folder} is damaged: {error}") from None


def _stage0_weights(folder: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0 keeps one replicated copy; with bf16/fp16 its optimizer holds the fp32 masters."""
    states = torch.load(folder / STAGE0_STATES, map_location="cpu", weights_only=False)
    module, optimizer = states["module"], states["optimizer"]
    if "fp32_groups" not in optimizer and "fp32_groups_flat" not in optimizer:
        return module  # fp32 training: the module's parameters are the masters
    parameters = {name: tensor for name, tensor in module.items() if name not in states["buffer_names"]}
    # The options that made the param groups (older checkpoints record none: theirs were the defaults' groups)
    options = checkpoint.read_metadata(folder).get("param_group_options", {})
    return {**module, **_name_masters(parameters, optimizer, dataclasses.replace(OptimConfig(), **options))}


class _CheckpointParameters:
    """Stands in for the model in ``engine.param_groups``: the saved tensors as trainable parameters."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.parameters = {name: torch.nn.Parameter(tensor) for name, tensor in tensors.items()}

    def named_parameters(self):
        return iter(self.parameters.items())


def _name_masters(parameters: dict[str, torch.Tensor], optimizer: dict, optim: OptimConfig) -> dict:
    """Names for the fp32 masters of DeepSpeed's ZeRO-0 bf16/fp16 wrapper (its ``optimizer`` state), which it
    keeps per param group in the order of the groups ``optim`` made: one per parameter (``fp32_groups``), or
    with its FusedAdam one flat tensor per group (``fp32_groups_flat``)."""
    from tuneclip_ds.optim import param_groups

    stand_in = _CheckpointParameters(parameters)
    names = {id(param): name for name, param in stand_in.named_parameters()}
    groups = [group["params"] for group in param_groups(stand_in, optim)]
    shapes = [[p.shape for p in group] for group in groups]
    if "fp32_groups" in optimizer:
        masters = optimizer["fp32_groups"]
    else:
        masters = [_cut(flat, group) for flat, group in zip(optimizer["fp32_groups_flat"], shapes)]
    if shapes != [[m.shape for m in group] for group in masters]:
        raise CheckpointError("the checkpoint's fp32 master weights do not follow the trainer's parameter groups "
                              "(was it written by another version?)")
    return {names[id(param)]: master
            for group, tensors in zip(groups, masters) for param, master in zip(group, tensors)}


def _cut(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """A param group's flat master cut into its parameters' masters (left whole if the sizes differ)."""
    from tuneclip_ds.optim.state import flat_layout

    if flat.numel() != sum(shape.numel() for shape in shapes):
        return [flat]
    return [master.value() for master in flat_layout(flat, shapes)]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def open_clip_state_dict(weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict:
    """One storage per tensor (safetensors refuses views of a shared buffer), 0-dim scale and bias."""
    exported = {}
    for name, tensor in weights.items():
        tensor = tensor.detach().to(dtype).clone()
        exported[name] = tensor.reshape(()) if name.rsplit(".", 1)[-1] in ZERO_DIM else tensor
    return exported


def export(source: Path, output: Path, safetensors: bool = False, best: bool = False, dtype: str = "fp32",
           wise_ft_alpha: float | None = None, ema: bool = False) -> str:
    """Write the weights (or with ``ema`` their EMA) of the checkpoint ``source`` names to ``output``; returns
    what was written."""
    if safetensors != (output.suffix == ".safetensors"):
        raise InputError(f"--output {output}: open_clip picks the format by the suffix, so use a .safetensors "
                         "name with --safetensors and another (e.g. .pt) without it")
    folder = find_checkpoint(source, best)
    metadata = checkpoint.read_metadata(folder)
    state_dict = _weights(folder, metadata, dtype, wise_ft_alpha, ema)
    output.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomically(output, lambda path: _save(state_dict, path, safetensors, metadata))
    return (_summary(output, folder, metadata, state_dict, dtype, wise_ft_alpha, ema) + "\n"
            + _load_hint(metadata, output))


def export_folder(source: Path, output: Path, best: bool = False, dtype: str = "fp32",
                  wise_ft_alpha: float | None = None, ema: bool = False) -> str:
    """Write the checkpoint ``source`` names as an open_clip folder ``output`` (config, weights or with ``ema``
    their EMA, tokenizer files) that ``open_clip`` loads as ``local-dir:OUTPUT``; returns what was written."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"--folder {output} exists and is not an empty folder: give a new folder")
    folder = find_checkpoint(source, best)
    metadata = checkpoint.read_metadata(folder)
    config, tokenizer = _folder_contents(folder, metadata)
    state_dict = _weights(folder, metadata, dtype, wise_ft_alpha, ema)
    _write_folder(output, config, state_dict, tokenizer, metadata)
    return (_summary(output, folder, metadata, state_dict, dtype, wise_ft_alpha, ema) + "\n"
            f"load it with open_clip.create_model_and_transforms('local-dir:{output}') "
            f"and open_clip.get_tokenizer('local-dir:{output}')")


def _write_folder(output: Path, config: dict, state_dict: dict, tokenizer: list[Path], metadata: dict) -> None:
    partial = output.with_name(output.name + ".partial")  # renamed when complete: no half-written folder
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / FOLDER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _save(state_dict, str(partial / FOLDER_WEIGHTS), True, metadata)
    for file in tokenizer:
        shutil.copyfile(file, partial / file.name)
    if output.exists():
        output.rmdir()  # empty (checked before)
    os.replace(partial, output)


def _folder_contents(folder: Path, metadata: dict) -> tuple[dict, list[Path]]:
    """The open_clip config and the tokenizer files the checkpoint's run recorded."""
    if "open_clip_config" not in metadata:
        raise CheckpointError(f"checkpoint {folder} does not record its model's open_clip config (it was saved "
                              "by an earlier version): export it with --output FILE instead")
    if metadata["tokenizer_folder"] is None:
        return metadata["open_clip_config"], []
    tokenizer = Path(metadata["tokenizer_folder"])
    files = tokenizer_files(tokenizer)
    if not files:
        raise CheckpointError(f"the run read its tokenizer from {tokenizer}, which no longer holds tokenizer files: "
                              "put them back there to export a folder")
    return metadata["open_clip_config"], files


def _weights(folder: Path, metadata: dict, dtype: str, wise_ft_alpha: float | None,
             ema: bool) -> dict[str, torch.Tensor]:
    """The fp32 weights, or with ``ema`` their EMA where the run kept one (trained parameters) and the weights
    elsewhere (frozen parameters, buffers); with ``wise_ft_alpha``, interpolated (in fp32) toward the run's
    starting weights, which are read first: a run without them fails before the long read. In ``dtype``."""
    if ema and metadata.get("ema") is None:
        raise InputError(f"--ema: checkpoint {folder} holds no EMA of the weights (its run did not set ema.decay): "
                         "export it without --ema")
    start = None if wise_ft_alpha is None else wise_ft.run_start_weights(folder)
    weights = fp32_weights(folder, metadata["zero_stage"])
    if ema:
        from tuneclip_ds.optim.ema import read_averages

        weights.update(read_averages(folder, {name: tensor.shape for name, tensor in weights.items()}))
    if start is not None:
        weights = wise_ft.wise_ft(start, weights, wise_ft_alpha)
    return open_clip_state_dict(weights, DTYPES[dtype])


def _summary(output: Path, folder: Path, metadata: dict, state_dict: dict, dtype: str,
             wise_ft_alpha: float | None, ema: bool) -> str:
    count = sum(tensor.numel() for tensor in state_dict.values())
    what = "the EMA of the weights (decay {decay:g}, {updates} updates) of ".format(**metadata["ema"]) if ema else ""
    mixed = "" if wise_ft_alpha is None else f" mixed with its starting weights by WiSE-FT (alpha {wise_ft_alpha:g})"
    return (f"wrote {output}: {what}{metadata['model']} at step {metadata['step']} from {folder}{mixed}, "
            f"{len(state_dict)} tensors, {count / 1e6:.2f}M values, {dtype}")


def _load_hint(metadata: dict, output: Path) -> str:
    """How to load a weights file: with the model's name where open_clip knows a config of that name that
    matches the model as trained (older checkpoints record no config: the name is trusted)."""
    name = metadata["model"]
    trained = metadata.get("open_clip_config", {}).get("model_cfg")
    create = f"open_clip.create_model({name!r}, pretrained={str(output)!r})"
    builtin = _config_file(_open_clip_configs(), name)
    if builtin is not None and trained in (None, builtin):
        return f"load it with {create}"
    ours = _config_file(OUR_CONFIGS, name)
    if ours is not None and trained in (None, ours):
        return (f"load it with {create} after open_clip.add_model_config({str(OUR_CONFIGS)!r}) ({name} is a config "
                "of tuneclip_ds, unknown to open_clip alone), or export with --folder: a folder that loads anywhere")
    return (f"open_clip has no config named {name!r} matching this model as trained (its own config, image size "
            "or tokenizer): export with --folder for a folder that loads as open_clip.create_model_and_transforms"
            "('local-dir:FOLDER')")


def _open_clip_configs() -> Path:
    """open_clip's own config folder, found without importing open_clip (slow, and it would not tell its
    configs from those registered later)."""
    return Path(importlib.util.find_spec("open_clip").origin).parent / "model_configs"


def _config_file(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _save(state_dict: dict, path: str, safetensors: bool, metadata: dict) -> None:
    if safetensors:
        from safetensors.torch import save_file

        save_file(state_dict, path, metadata={"model": metadata["model"], "step": str(metadata["step"])})
    else:
        torch.save(state_dict, path)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneclip_ds.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory (its latest checkpoint) or a step_* checkpoint")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--folder", type=Path, help="an open_clip folder to write (config, weights, tokenizer)")
    target.add_argument("--output", type=Path, help="the weights file to write, e.g. model.pt")
    parser.add_argument("--safetensors", action="store_true", help="with --output: write safetensors "
                        "(name ending .safetensors); a folder always holds safetensors")
    parser.add_argument("--best", action="store_true", help="the run's best-evaluated checkpoint (eval.select)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision of the written weights")
    parser.add_argument("--wise-ft", metavar="ALPHA", help="WiSE-FT: (1 - ALPHA) * the run's starting weights "
                        "(its model.pretrained) + ALPHA * the fine-tuned ones, ALPHA in [0, 1]")
    parser.add_argument("--ema", action="store_true", help="the EMA of the weights (a run with ema.decay)")
    args = parser.parse_args(argv)
    alpha = None if args.wise_ft is None else wise_ft.parse_alpha(args.wise_ft)
    if args.folder is None:
        print(export(args.source, args.output, args.safetensors, args.best, args.dtype, alpha, args.ema))
    elif args.safetensors:
        raise InputError("--safetensors goes with --output: a --folder always holds safetensors weights")
    else:
        print(export_folder(args.source, args.folder, args.best, args.dtype, alpha, args.ema))
    return 0


if __name__ == "__main__":
    sys.exit(main())
