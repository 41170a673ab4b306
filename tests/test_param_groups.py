"""AdamW parameter groups: layer-wise rate decay, per-tower rates and weight decays, at any ZeRO stage."""

import re

import pytest
import torch

from tuneclip_ds.config import ConfigError, OptimConfig
from tuneclip_ds.optim import param_groups, tower_mean_rates

# Every option set apart from its default or its fallback: the image tower takes its own rate and optim's
# layer decay and weight decay, the text tower optim's rate and its own layer decay and weight decay.
OPTIONS = {"lr": 1e-3, "weight_decay": 0.1, "layer_decay": 0.6, "image_lr": 2e-3, "text_layer_decay": 0.8,
           "text_weight_decay": 0.02}
OVERRIDES = [f"optim.{key}={value}" for key, value in OPTIONS.items()]

# Each parameter's layer by its full name, written out for the models below (BEiT's and FT-CLIP's count):
# embeddings 0, transformer block k: k + 1, final norm, pooling and projection: "top" (blocks + 1).
LAYERS = [
    (r"visual\.(conv1\.weight|class_embedding|positional_embedding|ln_pre\.(weight|bias))", 0),
    (r"visual\.transformer\.resblocks\.(?P<block>\d+)\..+", "block"),
    (r"visual\.(ln_post\.(weight|bias)|proj)", "top"),
    (r"visual\.trunk\.(patch_embed\.proj\.(weight|bias)|pos_embed)", 0),  # a timm ViT (SigLIP)
    (r"visual\.trunk\.blocks\.(?P<block>\d+)\..+", "block"),
    (r"visual\.trunk\.(norm\.(weight|bias)|attn_pool\..+)", "top"),
    (r"(text\.)?(token_embedding\.weight|positional_embedding)", 0),  # CLIP's own, or CustomTextCLIP's .text
    (r"(text\.)?transformer\.resblocks\.(?P<block>\d+)\..+", "block"),
    (r"(text\.)?(ln_final\.(weight|bias)|text_projection(\.weight|\.bias)?)", "top"),
]
BLOCKS = {"tiny-ViT": 2, "tiny-ViT-sigmoid": 2, "ViT-B-32": 12, "ViT-B-16-SigLIP": 12}  # in each tower


def build_on_meta(name: str, **kwargs) -> torch.nn.Module:
    """The architecture without memory or initialisation (nothing to download)."""
    import open_clip

    import tuneclip_ds.models  # noqa: F401  (registers the tiny model configs)

    with torch.device("meta"):
        return open_clip.create_model(name, device="meta", nonscalar_logit_scale=True, **kwargs)


def expected_layer(name: str, blocks: int) -> int:
    (layer, match), = [(layer, match) for pattern, layer in LAYERS if (match := re.fullmatch(pattern, name))]
    return {"block": lambda: int(match.group("block")) + 1, "top": lambda: blocks + 1}.get(layer, lambda: layer)()


def expected_setting(name: str, shape: torch.Size, blocks: int, options: dict) -> tuple[float, float]:
    """(rate, weight decay) of a parameter, from the options' definitions."""
    options = {**OptimConfig().__dict__, **options}
    if name in ("logit_scale", "logit_bias"):
        return options["lr"], 0.0
    tower = "image" if name.startswith("visual.") else "text"

    def option(key):
        return options[f"{tower}_{key}"] if options[f"{tower}_{key}"] is not None else options[key]

    rate = option("lr") * option("layer_decay") ** (blocks + 1 - expected_layer(name, blocks))
    exempt = len(shape) < 2 or name.endswith("bias")
    return rate, 0.0 if exempt else option("weight_decay")


def reference_groups(options: dict, blocks: int):
    """``groups(model)`` for ``reference_adamw``: one group per parameter, with its expected setting."""
    def groups(model):
        return [dict(zip(("lr", "weight_decay"), expected_setting(name, param.shape, blocks, options)), params=[param])
                for name, param in model.named_parameters() if param.requires_grad]

    return groups


def settings_by_name(model, groups) -> dict[str, tuple[float, float]]:
    names = {id(param): name for name, param in model.named_parameters()}
    settings = {names[id(param)]: (group["lr"], group["weight_decay"]) for group in groups for param in group["params"]}
    assert len(settings) == sum(len(group["params"]) for group in groups)  # each parameter in one group
    return settings


@pytest.mark.parametrize("model_name", list(BLOCKS))
def test_each_parameter_gets_the_rate_and_weight_decay_of_its_tower_and_layer(model_name):
    model = build_on_meta(model_name)
    groups = param_groups(model, OptimConfig(**OPTIONS))
    settings = settings_by_name(model, groups)
    assert settings.keys() == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        rate, weight_decay = expected_setting(name, param.shape, BLOCKS[model_name], OPTIONS)
        assert settings[name] == (pytest.approx(rate, rel=1e-12), weight_decay), name
    assert len({(group["lr"], group["weight_decay"]) for group in groups}) == len(groups)  # one group per setting


def test_groups_merge_equal_settings_and_are_named_and_ordered():
    model = build_on_meta("tiny-ViT")
    groups = param_groups(model, OptimConfig(lr=1e-3, layer_decay=0.5))
    assert [group["name"] for group in groups] == [
        "image/layer3/decay+text/layer3/decay", "image/layer2/decay+text/layer2/decay",
        "image/layer1/decay+text/layer1/decay", "image/layer0/decay+text/layer0/decay",
        "image/layer3/no_decay+text/layer3/no_decay+logit", "image/layer2/no_decay+text/layer2/no_decay",
        "image/layer1/no_decay+text/layer1/no_decay", "image/layer0/no_decay"]
    assert [group["lr"] for group in groups] == [1e-3, 5e-4, 2.5e-4, 1.25e-4] * 2
    assert [group["weight_decay"] for group in groups] == [0.1] * 4 + [0.0] * 4


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_default_options_give_the_two_groups_of_old(weight_decay):
    """Decay, then no decay, each in ``named_parameters`` order: checkpoints keep their layout (also with a weight
    decay of 0, which does not merge them)."""
    model = build_on_meta("ViT-B-16-SigLIP")
    decay, no_decay = param_groups(model, OptimConfig(weight_decay=weight_decay))
    assert (decay["name"], decay["lr"], decay["weight_decay"]) == ("image/decay+text/decay", 1e-5, weight_decay)
    assert (no_decay["name"], no_decay["lr"], no_decay["weight_decay"]) == ("image/no_decay+text/no_decay+logit",
                                                                           1e-5, 0.0)
    exempt = [param.ndim < 2 or name.endswith("bias") for name, param in model.named_parameters()]
    parameters = [param for _, param in model.named_parameters()]
    assert decay["params"] == [param for param, skip in zip(parameters, exempt) if not skip]
    assert no_decay["params"] == [param for param, skip in zip(parameters, exempt) if skip]


def test_a_locked_tower_trains_its_unlocked_top_at_the_rates_of_its_layers():
    from tuneclip_ds.config import ModelConfig
    from tuneclip_ds.models import build_model

    model = build_model(ModelConfig(name="tiny-ViT", lock_image=True, lock_image_unlocked_groups=2),
                        load_weights=False).model
    settings = settings_by_name(model, param_groups(model, OptimConfig(**OPTIONS)))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert settings.keys() == trainable and "visual.transformer.resblocks.1.ln_1.weight" in trainable
    assert not [name for name in trainable if name.startswith(("visual.conv1", "visual.transformer.resblocks.0"))]
    for name in trainable:
        rate, weight_decay = expected_setting(name, model.get_parameter(name).shape, 2, OPTIONS)
        assert settings[name] == (pytest.approx(rate, rel=1e-12), weight_decay), name


def expected_mean_rates(options: dict) -> dict[str, float]:
    """Each tower's rate averaged over the elements of tiny-ViT's tower."""
    towers = {"image": [], "text": []}
    for name, param in build_on_meta("tiny-ViT").named_parameters():
        if name != "logit_scale":
            rate = expected_setting(name, param.shape, BLOCKS["tiny-ViT"], options)[0]
            towers["image" if name.startswith("visual.") else "text"].append((rate, param.numel()))
    return {tower: sum(rate * size for rate, size in found) / sum(size for _, size in found)
            for tower, found in towers.items()}


def test_tower_mean_rates_weigh_each_element():
    model = build_on_meta("tiny-ViT")
    assert tower_mean_rates(model, OptimConfig(**OPTIONS)) == pytest.approx(expected_mean_rates(OPTIONS), rel=1e-12)


def test_unplaceable_parameters_are_listed_only_where_their_tower_decays():
    model = build_on_meta("RN50")  # a ResNet image tower: its stages are no transformer blocks
    with pytest.raises(ConfigError) as error:
        param_groups(model, OptimConfig(layer_decay=0.7))
    message = str(error.value)
    assert message.startswith("optim.layer_decay=0.7 needs the layer of every trainable parameter of the image tower")
    assert "visual.layer1.0.conv1.weight" in message and "visual.attnpool.c_proj.bias" not in message  # the first 20
    assert "Set optim.image_layer_decay=1, or freeze them" in message
    with pytest.raises(ConfigError, match=r"^optim\.image_layer_decay=0\.9 needs"):
        param_groups(model, OptimConfig(image_layer_decay=0.9))
    groups = param_groups(model, OptimConfig(text_layer_decay=0.7))  # the text tower is a transformer
    assert len({param for group in groups for param in group["params"]}) == len(list(model.parameters()))


def partitioned_groups(rank, world_size, overrides):
    """The groups of the ZeRO-3 model (built partitioned, as training builds it), by parameter name."""
    from tuneclip_ds.builders import build_training_model
    from tuneclip_ds.config import load_config

    config = load_config(None, ["train.steps=1", "train.zero_stage=3", "train.precision=fp32"] + overrides)
    model = build_training_model(config, world_size).model
    names = {id(param): name for name, param in model.named_parameters()}
    assert all(param.numel() == 0 for param in model.parameters())  # partitioned: no rank holds a full parameter
    return [{**group, "params": [names[id(param)] for param in group["params"]]}
            for group in param_groups(model, config.optim)]


@pytest.mark.parametrize("model_name", ["tiny-ViT-sigmoid", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_zero3_partitioned_model_gets_the_groups_of_the_whole_model(pool, model_name):
    model = build_on_meta(model_name)
    names = {id(param): name for name, param in model.named_parameters()}
    whole = [{**group, "params": [names[id(param)] for param in group["params"]]}
             for group in param_groups(model, OptimConfig(**OPTIONS))]
    ranks = pool.run(partitioned_groups, [f"model.name={model_name}"] + OVERRIDES)
    assert ranks[0] == ranks[1] == whole
