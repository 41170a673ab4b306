"""The model's text tokenizer, from local files only.

open_clip builds a Hugging Face tokenizer for models whose config names one
(``text_cfg.hf_tokenizer_name``: SigLIP, SigLIP2, MetaCLIP2, mT5/XLM-R towers)
and would download it from the hub. Here its files come, in this order, from
``model.tokenizer``, the pretrained folder (an open_clip hub folder holds them
beside the weights), or the local Hugging Face cache; nothing is ever fetched.
Other models use open_clip's own BPE vocabulary, which ships with open_clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tuneclip_ds.config import ModelConfig
from tuneclip_ds.errors import ModelLoadError, first_line

# Files that make a folder a Hugging Face tokenizer (one is enough) ...
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "vocab.txt", "vocab.json")
# ... and those read beside them; config.json names the model type when tokenizer_config.json names no class.
COMPANION_FILES = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "config.json")


def tokenizer_files(folder: Path) -> list[Path]:
    """The Hugging Face tokenizer files in ``folder`` (none when it holds no tokenizer)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return []
    return [folder / name for name in TOKENIZER_FILES + COMPANION_FILES if (folder / name).is_file()]


def build_tokenizer(cfg: ModelConfig, model_name: str, model_cfg: dict,
                    weights_folder: Path | None) -> tuple[Callable, Path | None]:
    """The tokenizer of the model open_clip knows as ``model_name`` (config ``model_cfg``) and, for a Hugging
    Face one, the folder its files were read from. ``weights_folder``: the pretrained folder, if any."""
    import open_clip

    text_cfg = model_cfg.get("text_cfg", {})
    folder = _hf_tokenizer_folder(cfg, model_name, text_cfg, weights_folder)
    if folder is None:
        return open_clip.get_tokenizer(model_name), None  # no Hugging Face tokenizer: open_clip's own BPE
    return _load_hf_tokenizer(folder, text_cfg), folder.resolve()


def _hf_tokenizer_folder(cfg: ModelConfig, model_name: str, text_cfg: dict, weights_folder: Path | None) -> Path | None:
    """Where the model's Hugging Face tokenizer files are; None when the model uses open_clip's BPE."""
    if cfg.tokenizer:
        folder = Path(cfg.tokenizer).expanduser()
        if not tokenizer_files(folder):
            raise ModelLoadError(f"model.tokenizer={cfg.tokenizer!r} is not a folder with Hugging Face tokenizer "
                                 f"files (one of {', '.join(TOKENIZER_FILES)})")
        return folder
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        _refuse_siglip_download(model_name)
        return None
    for folder in (weights_folder, _hub_cache_snapshot(hf_name)):
        if folder is not None and tokenizer_files(folder):
            return folder
    raise ModelLoadError(
        f"the model's text tokenizer {hf_name!r} (text_cfg.hf_tokenizer_name) is not on this machine, and nothing "
        f"is downloaded: put its tokenizer.json and tokenizer_config.json (or spiece.model) in "
        f"{weights_folder or 'the pretrained folder'}, or set model.tokenizer=FOLDER (a folder holding them); "
        "a copy in the local Hugging Face cache (HF_HUB_CACHE) is used when present"
    )


def _refuse_siglip_download(model_name: str) -> None:
    """open_clip gives a model named '*siglip*' without a tokenizer name a SigLIP vocabulary it downloads."""
    from open_clip.factory import parse_model_name

    schema, _ = parse_model_name(model_name)
    if schema is None and "siglip" in model_name.lower():
        raise ModelLoadError(
            f"model {model_name} names no tokenizer (text_cfg.hf_tokenizer_name), so open_clip would download a "
            "SigLIP sentencepiece vocabulary for it: set model.tokenizer=FOLDER (its Hugging Face tokenizer files)"
        )


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The snapshot of ``repo_id`` in the local Hugging Face cache, looked up without any network access."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # not in the cache; not a valid repository id
        return None


def _load_hf_tokenizer(folder: Path, text_cfg: dict) -> Callable:
    """open_clip's Hugging Face tokenizer with the model config's settings, as ``open_clip.get_tokenizer``
    builds it, but reading ``folder`` only."""
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

    try:
        return HFTokenizer(str(folder), context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
                           tokenizer_mode=text_cfg.get("tokenizer_mode"), local_files_only=True,
                           **text_cfg.get("tokenizer_kwargs", {}))
    except ImportError as error:
        raise ModelLoadError(f"the model's Hugging Face tokenizer needs `pip install transformers sentencepiece` "
                             f"({error})") from None
    except Exception as error:  # transformers and tokenizers fail on unreadable files in many ways
        raise ModelLoadError(f"the tokenizer files in {folder} cannot be read: {first_line(error)}") from None
