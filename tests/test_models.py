"""open_clip models from local weights only, in the formats open_clip reads."""

import json

import pytest
import torch

from tuneclip_ds.config import ModelConfig
from tuneclip_ds.models import ModelLoadError, build_model


def reference_state(tmp_path, name="tiny-ViT"):
    """A checkpoint as open_clip writes it (0-dim logit_scale), with recognisable values."""
    import open_clip

    torch.manual_seed(1)
    model = open_clip.create_model(name)
    with torch.no_grad():
        model.logit_scale.fill_(3.25)
    return model.state_dict()


def assert_loaded(model, state):
    loaded = model.state_dict()
    assert loaded["logit_scale"].shape == (1,)  # DeepSpeed-safe shape
    for key, value in state.items():
        assert torch.equal(loaded[key].reshape(value.shape), value), key


def test_random_init_has_nonscalar_temperature():
    bundle = build_model(ModelConfig(name="tiny-ViT-sigmoid"))
    assert bundle.model.logit_scale.shape == (1,) and bundle.model.logit_bias.shape == (1,)
    tokens = bundle.tokenizer(["a red circle"])
    assert tokens.shape == (1, 32)


def write_open_clip_train_checkpoint(state, path):
    """An ``epoch_N.pt`` as open_clip_train saves it under DDP: ``module.`` keys beside the optimizer's state."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(value.float()) for value in state.values()])
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": optimizer.state_dict()}, path)


@pytest.mark.parametrize("filename", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors", "epoch_3.pt"])
def test_weights_from_a_local_file(tmp_path, filename):
    from safetensors.torch import save_file

    state = reference_state(tmp_path)
    path = tmp_path / filename
    write = {".bin": torch.save, ".safetensors": save_file, ".pt": write_open_clip_train_checkpoint}[path.suffix]
    write(state, str(path))
    assert_loaded(build_model(ModelConfig(name="tiny-ViT", pretrained=str(path))).model, state)


def test_weights_from_an_open_clip_folder(tmp_path):
    import open_clip

    state = reference_state(tmp_path)
    folder = tmp_path / "hub-style"
    folder.mkdir()
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    config = {"model_cfg": open_clip.get_model_config("tiny-ViT"), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    assert_loaded(build_model(ModelConfig(name="tiny-ViT", pretrained=str(folder))).model, state)


def test_folder_with_one_weight_file(tmp_path):
    state = reference_state(tmp_path)
    torch.save(state, tmp_path / "epoch_5.pt")
    assert_loaded(build_model(ModelConfig(name="tiny-ViT", pretrained=str(tmp_path))).model, state)


@pytest.mark.parametrize(
    "name, pretrained, message",
    [
        ("tiny-ViT", "laion2b_s34b_b79k", "reads weights from disk only"),
        ("tiny-ViT", "/no/such/checkpoint.pt", "is not a local file or folder"),
        ("ViT-Nope", "", "is not an open_clip model"),
    ],
)
def test_bad_model_input(name, pretrained, message):
    with pytest.raises(ModelLoadError, match=message):
        build_model(ModelConfig(name=name, pretrained=pretrained))


def test_folder_without_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="folder with 0 weight files"):
        build_model(ModelConfig(name="tiny-ViT", pretrained=str(tmp_path)))


def test_checkpoint_of_another_model(tmp_path):
    torch.save(reference_state(tmp_path, "tiny-ViT"), tmp_path / "w.pt")
    with pytest.raises(ModelLoadError, match="does not fit model ViT-S-32"):
        build_model(ModelConfig(name="ViT-S-32", pretrained=str(tmp_path / "w.pt")))


def test_frozen_temperature_is_not_trained():
    model = build_model(ModelConfig(name="tiny-ViT", freeze_logit_scale=True)).model
    assert not model.logit_scale.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "logit_scale")
