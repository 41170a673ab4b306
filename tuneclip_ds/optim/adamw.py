"""AdamW parameter groups and the optimizer class: torch's, or DeepSpeed's own.

Every trainable parameter takes its rate and weight decay from the ``optim`` section. The logit scale and
bias train at ``optim.lr`` without weight decay. A parameter of the image or the text tower trains at its
tower's base rate (``optim.image_lr``, ``optim.text_lr``; default ``optim.lr``) times the tower's layer
decay to the power of its depth below the tower's top layer, with the tower's weight decay unless it is a
gain, a bias or another 1-d parameter. Parameters with the same settings share one AdamW group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tuneclip_ds.config import ConfigError, OptimConfig

TOWERS = ("image", "text")
LOGIT = "logit"  # the logit scale and bias, in no tower

# A tower's layers as BEiT and FT-CLIP count them: the embeddings are layer 0, transformer block k is layer
# k + 1, and what follows the blocks (final norm, pooling, projection) is the top layer, number of blocks + 1.
# The names are those of open_clip's VisionTransformer and text transformer (CLIP's own attributes, or
# CustomTextCLIP's ``text``) and of a timm ViT inside open_clip's TimmModel (``trunk``, then ``head``).
_BLOCK = re.compile(r"(?:transformer\.resblocks|trunk\.blocks)\.(\d+)\.")
_EMBEDDINGS = {"conv1", "class_embedding", "positional_embedding", "ln_pre", "token_embedding", "cls_emb",
               "trunk.patch_embed", "trunk.cls_token", "trunk.reg_token", "trunk.pos_embed", "trunk.norm_pre"}
_TOP = {"ln_post", "proj", "attn_pool", "attn_pool_contrastive", "ln_final", "text_projection", "head",
        "trunk.norm", "trunk.fc_norm", "trunk.attn_pool", "trunk.head"}
_UNPLACED_SHOWN = 20  # names a message lists
# What param_groups reads of the optim section: a checkpoint records them, for its export to rebuild the groups.
GROUP_OPTIONS = ("lr", "weight_decay", "layer_decay", "image_layer_decay", "text_layer_decay", "image_lr", "text_lr",
                 "image_weight_decay", "text_weight_decay")


@dataclass(frozen=True)
class Placement:
    tower: str  # one of TOWERS, or LOGIT
    layer: int | None  # None: outside the layers above (always for the logit scale and bias)
    top: int  # the tower's top layer


@dataclass(frozen=True)
class Setting:
    """What AdamW applies to one parameter; ``label`` says why, in its group's name."""

    tower: str
    lr: float
    weight_decay: float
    exempt: bool  # from weight decay
    label: str  # e.g. "image/layer3/decay", "text/no_decay", "logit"
    rank: tuple  # of the label in a group's name: image, text, logit; top layers first


def _split_tower(name: str) -> tuple[str, str]:
    """A parameter's tower and its name inside it: everything but the image tower and the logit scale and
    bias is the text tower, whose parts CLIP holds itself and CustomTextCLIP in ``text``."""
    if name in ("logit_scale", "logit_bias"):
        return LOGIT, name
    if name.startswith("visual."):
        return "image", name.removeprefix("visual.")
    return "text", name.removeprefix("text.")


def _block(inner: str) -> int | None:
    match = _BLOCK.match(inner)
    return int(match.group(1)) if match else None


def _layer(inner: str, top: int) -> int | None:
    block = _block(inner)
    if block is not None:
        return block + 1
    parts = inner.split(".")
    owners = {parts[0], ".".join(parts[:2])}  # a module of the tower, or of its timm trunk
    if owners & _EMBEDDINGS:
        return 0
    return top if owners & _TOP else None


def _place(names: list[str]) -> dict[str, Placement]:
    """Each parameter's tower and layer in it. A tower's depth counts all its blocks, frozen ones too."""
    split = {name: _split_tower(name) for name in names}
    blocks = dict.fromkeys((*TOWERS, LOGIT), 0)
    for tower, inner in split.values():
        block = _block(inner)
        if block is not None:
            blocks[tower] = max(blocks[tower], block + 1)
    return {name: Placement(tower, _layer(inner, blocks[tower] + 1), blocks[tower] + 1)
            for name, (tower, inner) in split.items()}


def _tower_option(optim: OptimConfig, tower: str, key: str) -> float:
    """``optim.<tower>_<key>``, or ``optim.<key>`` where that is not set."""
    own = getattr(optim, f"{tower}_{key}")
    return getattr(optim, key) if own is None else own


def _exempt(name: str, param: torch.nn.Parameter) -> bool:
    """No weight decay on gains, biases and other 1-d parameters (open_clip's class token), the logit scale and
    bias."""
    ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partitioned parameter's data is empty
    return ndim < 2 or name.endswith("bias") or "logit_scale" in name or "logit_bias" in name


def _setting(name: str, param: torch.nn.Parameter, place: Placement, optim: OptimConfig) -> Setting:
    if place.tower == LOGIT:
        return Setting(LOGIT, optim.lr, 0.0, exempt=True, label=LOGIT, rank=(len(TOWERS),))
    exempt = _exempt(name, param)
    kind = "no_decay" if exempt else "decay"
    decay = _tower_option(optim, place.tower, "layer_decay")
    depth = 0 if decay == 1 else place.top - place.layer
    label = f"{place.tower}/{kind}" if decay == 1 else f"{place.tower}/layer{place.layer}/{kind}"
    return Setting(place.tower, _tower_option(optim, place.tower, "lr") * decay**depth,
                   0.0 if exempt else _tower_option(optim, place.tower, "weight_decay"), exempt, label,
                   rank=(TOWERS.index(place.tower), depth, exempt))


def _check_placed(trainable: list[str], places: dict[str, Placement], optim: OptimConfig) -> None:
    """A layer decay needs every trainable parameter of its tower in a layer."""
    for tower in TOWERS:
        decay = _tower_option(optim, tower, "layer_decay")
        if decay == 1:
            continue
        unplaced = [name for name in trainable if places[name].tower == tower and places[name].layer is None]
        if not unplaced:
            continue
        own_key = f"optim.{tower}_layer_decay"
        key = own_key if getattr(optim, f"{tower}_layer_decay") is not None else "optim.layer_decay"
        more = len(unplaced) - _UNPLACED_SHOWN
        raise ConfigError(
            f"{key}={decay:g} needs the layer of every trainable parameter of the {tower} tower, but these are "
            f"in none it knows (embeddings, transformer blocks, final norm and projection of open_clip's and "
            f"timm's ViTs): {', '.join(unplaced[:_UNPLACED_SHOWN])}{f' and {more} more' if more > 0 else ''}. "
            f"Set {own_key}=1, or freeze them"
        )


def _settings(model: torch.nn.Module, optim: OptimConfig) -> list[tuple[torch.nn.Parameter, Setting]]:
    """Every trainable parameter with its setting, in ``named_parameters`` order. ``ConfigError`` lists the
    parameters of a tower with a layer decay other than 1 that are in none of its layers."""
    named = list(model.named_parameters())
    places = _place([name for name, _ in named])
    trainable = [(name, param) for name, param in named if param.requires_grad]
    _check_placed([name for name, _ in trainable], places, optim)
    return [(param, _setting(name, param, places[name], optim)) for name, param in trainable]


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """One AdamW group per distinct rate, weight decay and exemption from weight decay (so that a zero weight
    decay keeps the exempt parameters apart, as it always did: checkpoints keep their layout), parameters in
    ``named_parameters`` order. Groups with weight decay come first, then by falling rate: with every option
    at its default, the two groups "decay" and "no decay" of old. ``name`` joins the labels of its members."""
    groups: dict[tuple, dict] = {}
    labels: dict[tuple, dict[str, tuple]] = {}
    for param, setting in _settings(model, optim):
        key = (setting.exempt, -setting.lr, -setting.weight_decay)
        groups.setdefault(key, {"params": [], "lr": setting.lr, "weight_decay": setting.weight_decay})
        groups[key]["params"].append(param)
        labels.setdefault(key, {})[setting.label] = setting.rank
    return [{"name": "+".join(sorted(labels[key], key=labels[key].get)), **groups[key]} for key in sorted(groups)]


def group_options(optim: OptimConfig) -> dict[str, float | None]:
    return {key: getattr(optim, key) for key in GROUP_OPTIONS}


def tower_mean_rates(model: torch.nn.Module, optim: OptimConfig) -> dict[str, float]:
    """Each tower's base rate averaged over its trainable elements (a tower with none is left out)."""
    weighted, sizes = dict.fromkeys(TOWERS, 0.0), dict.fromkeys(TOWERS, 0)
    for param, setting in _settings(model, optim):
        if setting.tower in TOWERS:
            numel = getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partitioned parameter's data is empty
            weighted[setting.tower] += setting.lr * numel
            sizes[setting.tower] += numel
    return {tower: weighted[tower] / sizes[tower] for tower in TOWERS if sizes[tower]}


def build_optimizer(groups: list[dict], optim: OptimConfig, offload: bool) -> torch.optim.Optimizer:
    """``optim.implementation``: ``torch`` (torch.optim.AdamW, its fused kernel: 5-10x faster than its
    per-tensor default on CPUs, one kernel for all parameters on GPUs) or ``deepspeed`` (FusedAdam, compiled
    on first use). ZeRO-Offload always steps on the CPU with DeepSpeed's vectorised Adam."""
    kwargs = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if optim.implementation == "deepspeed":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=True, **kwargs)
