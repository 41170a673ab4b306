"""open_clip model construction with weights from local files only."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch

from tuneclip_ds.config import ModelConfig
from tuneclip_ds.distributed import start_deepspeed_comm, wait_for_rank0
from tuneclip_ds.errors import ModelLoadError, first_line
from tuneclip_ds.tokenizer import build_tokenizer
from tuneclip_ds.weights import load_openai_archive, resolve_weights

logger = logging.getLogger(__name__)

# Tiny configs for CPU work ("tiny-ViT", "tiny-ViT-sigmoid") sit beside the package.
open_clip.add_model_config(Path(__file__).parent / "model_configs")


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    tokenizer_folder: Path | None  # where a Hugging Face tokenizer's files were read; None: open_clip's BPE
    open_clip_config: dict  # the model as an open_clip folder's open_clip_config.json describes it

    def export_record(self) -> dict:
        """What each checkpoint records so that ``python -m tuneclip_ds.export --folder`` can write a folder
        that open_clip loads without this package."""
        folder = self.tokenizer_folder
        return {"open_clip_config": self.open_clip_config, "tokenizer_folder": str(folder) if folder else None}


def build_model(cfg: ModelConfig, load_weights: bool = True) -> ClipBundle:
    """An fp32 open_clip model with its transforms and tokenizer (``load_weights=False``: the
    architecture ``cfg`` names, randomly initialised).

    ``logit_scale`` (and ``logit_bias``) are made 1-element tensors instead of
    0-dim ones: DeepSpeed mishandles 0-dim parameters (ZeRO-0 clipping,
    flattening); open_clip reshapes 0-dim values from checkpoints on load.
    """
    weights = resolve_weights(cfg.name, cfg.pretrained)
    name = weights.model_name
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ModelLoadError(
            f"model.name={cfg.name!r} is not an open_clip model; see open_clip.list_models() "
            f"or the configs in {Path(__file__).parent / 'model_configs'}"
        )
    # Before the weights: a missing tokenizer is reported at once, not after loading a large checkpoint.
    weights_folder = weights.file.parent if weights.file else None  # a hub folder holds its tokenizer files
    tokenizer, tokenizer_folder = build_tokenizer(cfg, name, model_cfg, weights_folder)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name,
            pretrained=weights.open_clip_pretrained if load_weights else None,
            load_weights=load_weights,
            precision="fp32",
            force_image_size=cfg.force_image_size,
            nonscalar_logit_scale=True,
            pretrained_text=False,  # a Hugging Face text tower starts random too, not from a download
        )
        if weights.torchscript and load_weights:
            load_openai_archive(model, weights.file)
    except OSError as error:  # the hub is offline (tuneclip_ds/__init__.py): a text tower's config not cached
        raise _uncached_text_tower(model_cfg, error) from None
    except (RuntimeError, AssertionError, KeyError) as error:  # open_clip's ways of saying "shapes differ"
        if not weights.file:
            raise
        raise ModelLoadError(
            f"checkpoint {weights.file} does not fit model {cfg.name}: {first_line(error)}. "
            f"Set model.name to the architecture the checkpoint was trained with"
        ) from None
    if weights.file and load_weights:
        logger.info("loaded %s weights from %s", cfg.name, weights.file)
    _apply_training_options(model, cfg)
    return ClipBundle(model, preprocess_train, preprocess_val, tokenizer, tokenizer_folder,
                      _open_clip_config(model, model_cfg, cfg, tokenizer_folder))


def _uncached_text_tower(model_cfg: dict, error: OSError) -> ModelLoadError:
    hf_name = model_cfg.get("text_cfg", {}).get("hf_model_name")
    if not hf_name:
        return ModelLoadError(f"the model could not be built: {first_line(error)}")
    return ModelLoadError(
        f"the text tower is the Hugging Face model {hf_name!r} (text_cfg.hf_model_name), whose config.json is not "
        f"in the local Hugging Face cache, and nothing is downloaded: fetch it once with "
        f"`hf download {hf_name} config.json` (the weights come from model.pretrained)"
    )


def _open_clip_config(model: torch.nn.Module, model_cfg: dict, cfg: ModelConfig,
                      tokenizer_folder: Path | None) -> dict:
    """``model_cfg`` as the model was built (image size, tokenizer) and its preprocessing, in the form of
    open_clip's folder config (``open_clip_config.json``): what lets an export load without this package."""
    model_cfg = copy.deepcopy(model_cfg)
    if cfg.force_image_size is not None:
        model_cfg["vision_cfg"]["image_size"] = cfg.force_image_size
    if tokenizer_folder is not None:  # open_clip reads a folder's tokenizer files only when the config names one
        text_cfg = model_cfg["text_cfg"]
        text_cfg["hf_tokenizer_name"] = text_cfg.get("hf_tokenizer_name") or str(tokenizer_folder)
    return {"model_cfg": model_cfg, "preprocess_cfg": dict(model.visual.preprocess_cfg)}


def _apply_training_options(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Frozen parts (open_clip's own lock methods) and gradient checkpointing."""
    if cfg.freeze_logit_scale:
        model.logit_scale.requires_grad_(False)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)


def build_partitioned_model(cfg: ModelConfig, ds_config: dict) -> ClipBundle:
    """The model for ZeRO-3, built under ``deepspeed.zero.Init``: no rank ever holds it whole on its device.

    Rank 0 alone builds the full model on the CPU (pretrained weights, or the
    seeded random initialisation the other ZeRO stages get; the others wait, for
    minutes with a large checkpoint) and fills the partitions one parameter at a
    time; the CPU copy is then dropped.
    """
    import deepspeed

    source = wait_for_rank0(lambda: build_model(cfg).model)
    start_deepspeed_comm()  # DeepSpeed's view of the process group (which zero.Init reads) is set up lazily
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        bundle = build_model(cfg, load_weights=False)
    _copy_from_rank0(bundle.model, source)
    return bundle


def _copy_from_rank0(model: torch.nn.Module, source: torch.nn.Module | None) -> None:
    import deepspeed

    params = dict(source.named_parameters()) if source is not None else {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # re-partitioned from rank 0 on exit
            if source is not None:
                param.data.copy_(params[name].data)
    from deepspeed.accelerator import get_accelerator

    # Buffers are not partitioned: every rank holds them, on its device (the engine moves none at ZeRO-3), and
    # NCCL sends from the GPU only.
    device = torch.device(get_accelerator().current_device_name())
    buffers = dict(source.named_buffers()) if source is not None else {}
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            full_name = f"{module_name}.{name}" if module_name else name
            value = buffers[full_name] if source is not None else buffer
            on_device = value.to(device=device, dtype=buffer.dtype, copy=True)  # zero.Init's dtype (bf16/fp16)
            torch.distributed.broadcast(on_device, src=0)
            setattr(module, name, on_device)  # a registered buffer stays one
