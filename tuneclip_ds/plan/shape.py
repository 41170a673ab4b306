"""What the planner needs to know of a model: parameter counts and the shape of each tower.

The model is built on the ``meta`` device (shapes without storage), so even ViT-bigG-14 takes
no memory and a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tuneclip_ds.errors import InputError


@dataclass(frozen=True)
class Tower:
    """One tower's transformer, as far as its activations depend on it (per sample)."""

    name: str
    tokens: int  # sequence length of one sample
    width: int
    layers: int
    heads: int
    mlp_width: int
    mlp_saved: int  # tensors of mlp_width the MLP keeps for backward: 2 with GELU, 3 with QuickGELU
    outer: int  # tensors of width kept outside the blocks (the norms before and after them)


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int  # every parameter once
    largest_layer: int  # the most parameters one module holds itself (ZeRO-3 gathers a module at a time)
    largest_param: int  # the elements of the largest parameter (its gradient is made whole in backward)
    image_params: int
    embed_dim: int  # the width of the features the loss compares
    towers: tuple[Tower, Tower]  # image, text

    @property
    def text_params(self) -> int:
        """The text tower and the model's own parameters (temperature, bias)."""
        return self.params - self.image_params


def model_shape(name: str, force_image_size: int | None = None) -> ModelShape:
    """The shape of the open_clip model ``name`` (or one of tuneclip_ds/model_configs)."""
    import open_clip

    from tuneclip_ds.models import ModelLoadError  # importing it registers the tiny configs

    if open_clip.get_model_config(name) is None:
        raise ModelLoadError(f"--model {name!r} is not an open_clip model; see open_clip.list_models() "
                             "or the configs in tuneclip_ds/model_configs")
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta", force_image_size=force_image_size)
    return ModelShape(
        name=name,
        params=count_params(model),
        largest_layer=largest_layer(model),
        largest_param=max(p.numel() for p in model.parameters()),
        image_params=count_params(model.visual),
        embed_dim=open_clip.get_model_config(name)["embed_dim"],
        towers=(_image_tower(name, model.visual), _text_tower(name, model)),
    )


def count_params(module: nn.Module) -> int:
    # parameters() yields a shared parameter once. DeepSpeed tells shared ones apart by their
    # data pointer, which is 0 for every tensor on the meta device.
    return sum(p.numel() for p in module.parameters())


def largest_layer(model: nn.Module) -> int:
    """DeepSpeed's ``largest_layer_params``: the most parameters held directly by one module."""
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())


def _image_tower(name: str, visual: nn.Module) -> Tower:
    trunk = getattr(visual, "trunk", None)  # a timm ViT (SigLIP So400m)
    if trunk is not None:
        return _tower("image", trunk.blocks, trunk.patch_embed.num_patches + trunk.num_prefix_tokens, outer=3)
    transformer = _transformer(name, visual, "image")
    # patches and the class token; the norms before and after the blocks keep three tensors
    return _tower("image", transformer.resblocks, math.prod(visual.grid_size) + 1, outer=3)


def _text_tower(name: str, model: nn.Module) -> Tower:
    text = getattr(model, "text", model)  # CLIP holds the text tower's parts itself
    # the final norm keeps its input; the pooled token is gathered by index, a copy
    return _tower("text", _transformer(name, text, "text").resblocks, text.context_length, outer=1)


def _transformer(name: str, tower: nn.Module, what: str) -> nn.Module:
    transformer = getattr(tower, "transformer", None)
    if not hasattr(transformer, "resblocks"):
        raise InputError(f"--model {name}: its {what} tower ({type(tower).__name__}) is not a transformer the "
                         "planner models (open_clip's or timm's ViT and open_clip's text transformer)")
    return transformer


def _tower(name: str, blocks: nn.ModuleList, tokens: int, outer: int) -> Tower:
    from open_clip.transformer import QuickGELU

    block = blocks[0]
    first_linear = next(m for m in block.mlp.modules() if isinstance(m, nn.Linear))
    quick_gelu = any(isinstance(m, QuickGELU) for m in block.mlp.modules())
    return Tower(
        name=name,
        tokens=tokens,
        width=first_linear.in_features,
        layers=len(blocks),
        heads=block.attn.num_heads,
        mlp_width=first_linear.out_features,
        mlp_saved=3 if quick_gelu else 2,  # QuickGELU, x * sigmoid(1.702 x), keeps x and the sigmoid
        outer=outer,
    )
