"""Where ``model.pretrained`` points: the checkpoint layouts found on disk, resolved without a download.

A checkpoint file (open_clip's ``.bin`` / ``.safetensors``, open_clip_train's ``epoch_N.pt``, OpenAI's
TorchScript archive), a folder (open_clip's, with ``open_clip_config.json``, or one holding weights only),
a Hugging Face cache entry (``models--org--name``) or ``hf-hub:org/name`` read from the local cache.
Files are checked here (headers only, cheap) so that every rank, ZeRO-3's included, fails alike.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from tuneclip_ds.errors import ModelLoadError

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The names open_clip gives its weights on the hub, most wanted first: hub repos often hold the same weights
# twice, and some also hold Hugging Face transformers weights (model.safetensors) that open_clip cannot load.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
# torch.save's format before zip archives (torch < 1.6): a pickled magic number first.
LEGACY_TORCH_HEADER = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class Weights:
    """What build_model gives open_clip, and the file behind it."""

    model_name: str  # open_clip's name: the architecture, or local-dir:FOLDER (config and weights from there)
    file: Path | None  # the weights file read (None: random initialisation)
    torchscript: bool = False  # OpenAI's archive: read with torch.jit, which open_clip's loader refuses

    @property
    def open_clip_pretrained(self) -> str | None:
        """open_clip's ``pretrained`` argument (a local-dir folder names its own weights)."""
        if self.file is None or self.torchscript or self.model_name.startswith(LOCAL_DIR_PREFIX):
            return None
        return str(self.file)


def resolve_weights(name: str, pretrained: str) -> Weights:
    """The weights ``model.name`` / ``model.pretrained`` name; never a hub download."""
    if name.startswith(HF_HUB_PREFIX):  # open_clip's spelling of a hub model: config and weights from there
        if pretrained:
            raise ModelLoadError(f"model.name={name} names its weights already: leave model.pretrained empty, or "
                                 f"set model.name to the architecture of model.pretrained={pretrained!r}")
        pretrained = name
    if not pretrained:
        return Weights(name, None)
    if pretrained.startswith(HF_HUB_PREFIX):
        return _from_folder(name, _cached_repo(pretrained[len(HF_HUB_PREFIX):]), pretrained)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return _from_file(name, path)
    if path.is_dir():
        return _from_folder(name, path, pretrained)
    raise ModelLoadError(
        f"model.pretrained={pretrained!r} is not a local file or folder. This trainer reads weights "
        f"from disk only (no hub downloads): download the checkpoint (e.g. the open_clip "
        f"'open_clip_pytorch_model.bin' or 'open_clip_model.safetensors' of {name}) and pass its path, "
        f"or hf-hub:ORG/NAME for a model in the local Hugging Face cache"
    )


def load_openai_archive(model: torch.nn.Module, path: Path) -> None:
    """OpenAI's TorchScript weights into an open_clip model (OpenAI's key names are open_clip's CLIP's)."""
    archive = torch.jit.load(str(path), map_location="cpu").state_dict()
    state = {key: value.float() for key, value in archive.items() if key not in OPENAI_EXTRA_KEYS}  # fp16 in the file
    state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    # Position embeddings interpolated to a forced image or context size, as open_clip's own file loader does
    open_clip.model.resize_pos_embed(state, model)
    open_clip.model.resize_text_pos_embed(state, model)
    model.load_state_dict(state)


def _from_file(name: str, path: Path) -> Weights:
    torchscript = _checkpoint_format(path) == "torchscript"
    if torchscript:
        _require_quick_gelu(name, path)
    return Weights(name, path, torchscript)


def _from_folder(name: str, folder: Path, pretrained: str) -> Weights:
    if (folder / "snapshots").is_dir():
        folder = _snapshot(folder, pretrained)
    if (folder / "open_clip_config.json").is_file():
        # open_clip reads config, preprocessing and weights from the folder; the file checked is the one it picks
        chosen = open_clip.factory._find_checkpoint_in_dir(folder)
        if chosen is None:
            raise ModelLoadError(f"model.pretrained={pretrained!r}: {folder} holds open_clip_config.json but no "
                                 f"weights file (*.safetensors, *.bin or *.pth, e.g. {OPEN_CLIP_WEIGHTS[0]})")
        _checkpoint_format(Path(chosen))
        return Weights(f"{LOCAL_DIR_PREFIX}{folder}", Path(chosen))
    return _from_file(name, _weights_in(folder, pretrained))


def _weights_in(folder: Path, pretrained: str) -> Path:
    """The folder's one weights file, or its open_clip weights when it holds several (hub snapshots do)."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    named = [p for p in weights if p.name in OPEN_CLIP_WEIGHTS]
    if named:
        return min(named, key=lambda p: OPEN_CLIP_WEIGHTS.index(p.name))
    if len(weights) == 1:
        return weights[0]
    raise ModelLoadError(
        f"model.pretrained={pretrained!r} is a folder with {len(weights)} weight files "
        f"({', '.join(p.name for p in weights) or 'none'}): point it at one file"
    )


def _snapshot(repo: Path, pretrained: str) -> Path:
    """The snapshot of a Hugging Face cache entry that refs/main names, else its only one."""
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        if not snapshot.is_dir():
            raise ModelLoadError(f"model.pretrained={pretrained!r}: {ref} names snapshot {snapshot.name}, which "
                                 f"{snapshots} lacks (an unfinished download?): download the model again")
        return snapshot
    found = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return snapshots / found[0]
    raise ModelLoadError(
        f"model.pretrained={pretrained!r} is a Hugging Face cache entry with {len(found)} snapshots "
        f"({', '.join(found) or 'none'}) and no refs/main: point it at one folder in {snapshots}"
    )


def _cached_repo(repo_id: str) -> Path:
    """The cache entry of ``repo_id`` where huggingface_hub keeps it (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/...)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    if not folder.is_dir():
        raise ModelLoadError(
            f"model.pretrained=hf-hub:{repo_id}: {folder} does not exist, and this trainer does not download "
            f"(the cache is HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub). "
            f"Download the model once with `hf download {repo_id}`, or pass the path of its weights"
        )
    return folder


def _checkpoint_format(path: Path) -> str:
    """'torch', 'torchscript', 'safetensors' or 'numpy' (big_vision's .npz), read from the file's header or zip
    directory; a file that cannot be one is a ModelLoadError naming it."""
    try:
        if path.suffix == ".safetensors":
            return _safetensors_format(path)
        if zipfile.is_zipfile(path):
            return _zip_format(path)
        with path.open("rb") as file:
            head = file.read(len(LEGACY_TORCH_HEADER))
    except (OSError, zipfile.BadZipFile) as error:
        raise _unreadable(path, f"{type(error).__name__}: {error}") from None
    if head == LEGACY_TORCH_HEADER:
        return "torch"
    if not head:
        raise _unreadable(path, "the file is empty")
    if head.startswith(b"PK\x03\x04"):
        raise _unreadable(path, "a zip archive cut short (an interrupted download or copy?)")
    raise _unreadable(path, "neither a PyTorch checkpoint nor a safetensors file")


def _safetensors_format(path: Path) -> str:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):  # checks the header and that the file holds every tensor
            return "safetensors"
    except SafetensorError as error:
        raise _unreadable(path, f"not a complete safetensors file ({error})") from None


def _zip_format(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        records = {name.split("/", 1)[-1] for name in archive.namelist()}  # torch's names: ARCHIVE/RECORD
    if path.suffix == ".npz":
        return "numpy"
    if "constants.pkl" in records:  # what torch itself takes for a TorchScript archive
        return "torchscript"
    if "data.pkl" in records:
        return "torch"
    raise _unreadable(path, "a zip archive that is not a PyTorch checkpoint")


def _unreadable(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(f"model.pretrained: {path} is not a readable checkpoint: {reason}. "
                          f"Download or export it again")


def _require_quick_gelu(name: str, path: Path) -> None:
    """OpenAI's CLIPs use QuickGELU: loading them into a GELU architecture would change every activation."""
    config = open_clip.get_model_config(name)
    if config is None or config.get("quick_gelu"):
        return  # an unknown name is reported when the model is built
    quick = f"{name}-quickgelu"
    fix = (f"set model.name={quick}" if open_clip.get_model_config(quick)
           else 'use an architecture whose config has "quick_gelu": true')
    raise ModelLoadError(f"model.pretrained: {path} is a TorchScript archive (OpenAI's CLIP format), whose models "
                         f"use QuickGELU, but model.name={name} uses GELU: {fix}")
