"""model.pretrained in the layouts found on disk: Hugging Face cache entries, OpenAI's TorchScript archives, and
damaged files reported as one clear message."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from test_launch import launch
from test_models import assert_loaded, reference_state
from tuneclip_ds.config import ModelConfig
from tuneclip_ds.models import ModelLoadError, build_model


def shifted(state):
    """Other weights of the same shapes (to tell which of two files was loaded)."""
    return {key: value + 1 for key, value in state.items()}


def open_clip_config(path):
    import open_clip

    path.write_text(json.dumps({"model_cfg": open_clip.get_model_config("tiny-ViT"), "preprocess_cfg": {}}))


def hub_snapshot(repo, commit, files):
    """snapshots/COMMIT as huggingface_hub leaves it: each file a relative symlink to its blob in blobs/."""
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, write in files.items():
        incoming = repo / "blobs" / "incoming"
        write(incoming)
        blob = incoming.rename(repo / "blobs" / hashlib.sha256(incoming.read_bytes()).hexdigest())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def open_clip_repo_files(state):
    """What an open_clip repository on the hub holds: its config and the same weights in two formats."""
    return {
        "open_clip_config.json": open_clip_config,
        "open_clip_model.safetensors": lambda path: save_file(state, str(path)),
        "open_clip_pytorch_model.bin": lambda path: torch.save(state, path),
    }


@pytest.mark.parametrize("ref", [True, False], ids=["refs-main", "one-snapshot"])
def test_hugging_face_cache_entry(tmp_path, ref):
    state = reference_state(tmp_path)
    repo = tmp_path / "models--timm--tiny-ViT"
    hub_snapshot(repo, "c0ffee", open_clip_repo_files(state))
    if ref:  # refs/main names the newer of two snapshots
        hub_snapshot(repo, "0ld", open_clip_repo_files(shifted(state)))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("c0ffee")
    assert_loaded(build_model(ModelConfig(name="tiny-ViT", pretrained=str(repo))).model, state)


def test_snapshot_with_weights_only_prefers_safetensors(tmp_path):
    state = reference_state(tmp_path)
    snapshot = hub_snapshot(tmp_path / "models--org--tiny", "c0ffee", {
        "open_clip_model.safetensors": lambda path: save_file(state, str(path)),
        "open_clip_pytorch_model.bin": lambda path: torch.save(shifted(state), path),
        "model.safetensors": lambda path: path.write_bytes(b"transformers weights: not open_clip's"),
    })
    assert_loaded(build_model(ModelConfig(name="tiny-ViT", pretrained=str(snapshot))).model, state)


def test_cache_entry_with_several_snapshots_and_no_ref(tmp_path):
    repo = tmp_path / "models--org--tiny"
    for commit in ("aaa111", "bbb222"):
        hub_snapshot(repo, commit, {"open_clip_config.json": open_clip_config})
    with pytest.raises(ModelLoadError, match=r"2 snapshots \(aaa111, bbb222\) and no refs/main"):
        build_model(ModelConfig(name="tiny-ViT", pretrained=str(repo)))


def test_open_clip_folder_without_weights(tmp_path):
    open_clip_config(tmp_path / "open_clip_config.json")
    with pytest.raises(ModelLoadError, match="holds open_clip_config.json but no weights file"):
        build_model(ModelConfig(name="tiny-ViT", pretrained=str(tmp_path)))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache where huggingface_hub looks for it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("model", [{"name": "tiny-ViT", "pretrained": "hf-hub:timm/tiny-ViT"},
                                   {"name": "hf-hub:timm/tiny-ViT"}])  # open_clip's spelling
def test_hf_hub_name_from_the_local_cache(tmp_path, hub_cache, model):
    state = reference_state(tmp_path)
    repo = hub_cache / "models--timm--tiny-ViT"
    hub_snapshot(repo, "c0ffee", open_clip_repo_files(state))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee\n")
    assert_loaded(build_model(ModelConfig(**model)).model, state)


def test_hf_hub_model_name_with_other_weights(hub_cache):
    with pytest.raises(ModelLoadError, match="model.name=hf-hub:timm/tiny-ViT names its weights already"):
        build_model(ModelConfig(name="hf-hub:timm/tiny-ViT", pretrained="weights.pt"))


def test_the_hub_is_offline_unless_the_user_says_otherwise():
    """Importing the package keeps huggingface_hub and transformers off the network; HF_HUB_OFFLINE=0 wins."""
    script = "import tuneclip_ds, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    for setting, expected in ((None, "True"), ("0", "False")):
        extra = {"HF_HUB_OFFLINE": setting} if setting else {}
        result = subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True, text=True,
                                check=True)
        assert result.stdout.strip() == expected


def test_hf_hub_name_not_in_the_cache(hub_cache):
    with pytest.raises(ModelLoadError) as error:
        build_model(ModelConfig(name="tiny-ViT", pretrained="hf-hub:timm/tiny-ViT"))
    assert str(hub_cache / "models--timm--tiny-ViT") in str(error.value)
    assert "`hf download timm/tiny-ViT`" in str(error.value)


@pytest.fixture
def tiny_quickgelu(monkeypatch):
    """``tiny-ViT-quickgelu``, registered for this test only: tiny-ViT with OpenAI's activation."""
    import open_clip

    config = dict(open_clip.get_model_config("tiny-ViT"), quick_gelu=True)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-ViT-quickgelu", config)
    return "tiny-ViT-quickgelu"


class StateHolder(torch.nn.Module):
    """A module whose state dict is ``state`` (dotted keys become submodules), as a TorchScript archive holds it."""

    def __init__(self, state):
        super().__init__()
        for key, value in state.items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_buffer(leaf, value)

    def forward(self, x):
        return x


def openai_archive(path, state):
    """An archive as OpenAI's `clip` package caches it: fp16 weights under open_clip's names, 3 extra entries."""
    extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(32),
             "vocab_size": torch.tensor(49408)}
    torch.jit.script(StateHolder({**{k: v.half() for k, v in state.items()}, **extra})).save(str(path))


def test_openai_torchscript_archive(tmp_path, tiny_quickgelu):
    state = reference_state(tmp_path, tiny_quickgelu)
    openai_archive(tmp_path / "ViT-T-8.pt", state)
    model = build_model(ModelConfig(name=tiny_quickgelu, pretrained=str(tmp_path / "ViT-T-8.pt"))).model
    assert all(value.dtype == torch.float32 for value in model.state_dict().values())
    assert_loaded(model, {key: value.half().float() for key, value in state.items()})


def test_openai_archive_at_another_image_size(tmp_path, tiny_quickgelu):
    """Its position embeddings are interpolated exactly as open_clip interpolates those of its own files."""
    state = {key: value.half().float() for key, value in reference_state(tmp_path, tiny_quickgelu).items()}
    openai_archive(tmp_path / "ViT-T-8.pt", state)
    torch.save(state, tmp_path / "open_clip.bin")
    loaded = [build_model(ModelConfig(name=tiny_quickgelu, pretrained=str(tmp_path / name), force_image_size=48)).model
              for name in ("ViT-T-8.pt", "open_clip.bin")]
    assert loaded[0].visual.positional_embedding.shape != state["visual.positional_embedding"].shape
    assert_loaded(loaded[0], loaded[1].state_dict())


def test_openai_archive_into_a_gelu_architecture(tmp_path, tiny_quickgelu):
    openai_archive(tmp_path / "ViT-T-8.pt", reference_state(tmp_path, tiny_quickgelu))
    with pytest.raises(ModelLoadError, match="TorchScript archive.*set model.name=tiny-ViT-quickgelu"):
        build_model(ModelConfig(name="tiny-ViT", pretrained=str(tmp_path / "ViT-T-8.pt")))


def first_half(tmp_path, save):
    """The first half of a real checkpoint, as an interrupted download leaves it."""
    save(reference_state(tmp_path), tmp_path / "whole")
    whole = (tmp_path / "whole").read_bytes()
    return whole[:len(whole) // 2]


DAMAGED = {
    "random.pt": lambda tmp: os.urandom(100_000),
    "random.bin": lambda tmp: os.urandom(100_000),
    "random.safetensors": lambda tmp: os.urandom(100_000),
    "truncated.safetensors": lambda tmp: first_half(tmp, lambda state, path: save_file(state, str(path))),
    "truncated.pt": lambda tmp: first_half(tmp, torch.save),
    "empty.bin": lambda tmp: b"",
}


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_file_is_named(tmp_path, name):
    damaged = tmp_path / name
    damaged.write_bytes(DAMAGED[name](tmp_path))
    with pytest.raises(ModelLoadError, match=f"{damaged} is not a readable checkpoint"):
        build_model(ModelConfig(name="tiny-ViT", pretrained=str(damaged)))


def test_damaged_file_through_the_command_line(tmp_path):
    damaged = tmp_path / "open_clip_model.safetensors"
    damaged.write_bytes(os.urandom(100_000))
    result = launch([sys.executable, "-m", "tuneclip_ds.train"], tmp_path, str(tmp_path),
                    f"model.pretrained={damaged}")
    assert result.returncode == 2
    naming = [line for line in result.stderr.splitlines() if str(damaged) in line]
    assert len(naming) == 1 and "ERROR" in naming[0] and "not a readable checkpoint" in naming[0], result.stderr
    assert "Traceback" not in result.stderr
