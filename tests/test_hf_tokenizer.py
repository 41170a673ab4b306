"""A model with a Hugging Face tokenizer (SigLIP-style), its files read from local folders only: training,
evaluation and a standalone open_clip export of tiny-ViT-sigmoid with a word-level tokenizer built here."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_eval_training import train_with_evaluation, write_suite
from test_export import train_overrides
from tuneclip_ds import export
from tuneclip_ds.config import ModelConfig
from tuneclip_ds.errors import ModelLoadError
from tuneclip_ds.models import build_model
from tuneclip_ds.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
NOT_CACHED = "tuneclip-tests/words"  # the test model's hf_tokenizer_name: no cache holds it
CONTEXT_LENGTH = 32  # tiny-ViT-sigmoid's
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}  # not the defaults
STAGE = 2


def corpus_captions(count: int) -> list[str]:
    from tuneclip_ds.data.synthetic import resolve_difficulty, synthetic_sample

    return [synthetic_sample(i, 32, resolve_difficulty(0.3), 0, "train").caption for i in range(count)]


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    """A word-level tokenizer of the synthetic captions and zero-shot prompts (pad 0, eos 1), saved as a
    Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tuneclip_ds.data.synthetic import CLASS_NAMES, ZEROSHOT_TEMPLATES

    prompts = [template.format(name) for template in ZEROSHOT_TEMPLATES for name in CLASS_NAMES]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(corpus_captions(256) + prompts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder = tmp_path_factory.mktemp("words")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def reference_ids(words: Path, texts: list[str]) -> torch.Tensor:
    """The tokenizer's own encoding (the tokenizers library alone), padded to the model's context."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(words / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="<pad>", length=CONTEXT_LENGTH)
    tokenizer.enable_truncation(CONTEXT_LENGTH)
    return torch.tensor([encoding.ids for encoding in tokenizer.encode_batch(texts)])


def sigmoid_config(words: Path) -> dict:
    """tiny-ViT-sigmoid's open_clip config with a Hugging Face tokenizer: ``words``' vocabulary."""
    from tokenizers import Tokenizer

    model_cfg = json.loads((REPO / "tuneclip_ds" / "model_configs" / "tiny-ViT-sigmoid.json").read_text())
    vocab_size = Tokenizer.from_file(str(words / "tokenizer.json")).get_vocab_size()
    model_cfg["text_cfg"].update(hf_tokenizer_name=NOT_CACHED, vocab_size=vocab_size)
    return model_cfg


def write_hub_folder(folder: Path, model_cfg: dict, tokenizer: Path | None) -> Path:
    """An open_clip folder as the hub holds one: config, (random) weights and the tokenizer's files."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS}))
    torch.manual_seed(0)
    save_file(open_clip.create_model(f"local-dir:{folder}").state_dict(), str(folder / "open_clip_model.safetensors"))
    for file in tokenizer.iterdir() if tokenizer else ():
        shutil.copy(file, folder)
    return folder


@pytest.fixture(scope="module")
def hub(words, tmp_path_factory) -> Path:
    return write_hub_folder(tmp_path_factory.mktemp("hub") / "tiny-sigmoid", sigmoid_config(words), words)


@pytest.fixture(scope="module")
def hub_without_tokenizer(words, tmp_path_factory) -> Path:
    return write_hub_folder(tmp_path_factory.mktemp("hub") / "no-tokenizer", sigmoid_config(words), None)


@pytest.fixture(scope="module")
def run(gloo_pools, synthetic_shards, hub, tmp_path_factory) -> dict:
    """One short run from ``hub`` at another image size, evaluated when it starts and at its end."""
    from tuneclip_ds.data.synthetic import write_synthetic_corpus

    root = tmp_path_factory.mktemp("hf_run")
    write_synthetic_corpus(str(root / "val"), num_samples=48, samples_per_shard=48, image_size=32, split="val",
                           progress=False)
    suite = write_suite(root, root / "val")
    overrides = train_overrides(synthetic_shards, root, STAGE) + [
        "model.name=tiny-ViT-sigmoid", f"model.pretrained={hub}", "model.force_image_size=48", "loss.name=siglip",
        f"eval.tasks={suite}", "eval.select=average",
    ]
    gloo_pools(1).run(train_with_evaluation, overrides)
    return {"dir": root / "run", "suite": suite}


@pytest.fixture
def no_network(monkeypatch, tmp_path) -> list:
    """An empty Hugging Face cache, and every network connection refused and recorded: the list of attempts."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture
def offline(no_network, monkeypatch) -> list:
    """``no_network`` with hub downloads allowed (HF_HUB_OFFLINE unset): only our own code keeps off the network."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return no_network


def cached_snapshot(repo_id: str) -> Path:
    """A snapshot folder of ``repo_id`` in the Hugging Face cache, as huggingface_hub lays it out."""
    import huggingface_hub.constants

    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return repo / "snapshots" / ("0" * 40)


def test_tokens_come_from_the_pretrained_folders_tokenizer(hub, words):
    bundle = build_model(ModelConfig(pretrained=str(hub)), load_weights=False)
    captions = corpus_captions(16)
    tokens = bundle.tokenizer(captions)
    assert torch.equal(tokens, reference_ids(words, captions))
    assert (tokens == 1).sum(dim=1).tolist() == [1] * 16 and not (tokens == 2).any()  # one eos each, no unknown word
    assert bundle.tokenizer_folder == hub.resolve()


def test_model_tokenizer_wins(hub_without_tokenizer, words, offline):
    bundle = build_model(ModelConfig(pretrained=str(hub_without_tokenizer), tokenizer=str(words)), load_weights=False)
    captions = corpus_captions(4)
    assert torch.equal(bundle.tokenizer(captions), reference_ids(words, captions))
    assert bundle.tokenizer_folder == words.resolve() and offline == []


def test_a_tokenizer_in_the_hugging_face_cache_is_used(hub_without_tokenizer, words, offline, tmp_path):
    snapshot = cached_snapshot(NOT_CACHED)
    shutil.copytree(words, snapshot)
    bundle = build_model(ModelConfig(pretrained=str(hub_without_tokenizer)), load_weights=False)
    assert bundle.tokenizer_folder == snapshot.resolve() and offline == []


def test_a_tokenizer_that_is_nowhere_local_is_one_clear_error_at_once(hub_without_tokenizer, offline):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        build_model(ModelConfig(pretrained=str(hub_without_tokenizer)))
    assert time.monotonic() - start < 5 and offline == []
    message = str(error.value)
    assert f"{NOT_CACHED!r}" in message and str(hub_without_tokenizer) in message
    assert "put its tokenizer.json and tokenizer_config.json (or spiece.model) in" in message
    assert "or set model.tokenizer=FOLDER" in message


@pytest.mark.parametrize("name, hf_name", [("ViT-B-16-SigLIP", "timm/ViT-B-16-SigLIP"),
                                           ("ViT-B-16-SigLIP2", "timm/ViT-B-16-SigLIP2"),
                                           ("xlm-roberta-base-ViT-B-32", "xlm-roberta-base")])
def test_open_clips_own_configs_never_download_their_tokenizer(name, hf_name, offline):
    import open_clip

    with pytest.raises(ModelLoadError, match=f"tokenizer '{hf_name}' .* is not on this machine"):
        build_tokenizer(ModelConfig(name=name), name, open_clip.get_model_config(name), None)
    assert offline == []


def test_a_siglip_name_without_a_tokenizer_name_needs_model_tokenizer(words, offline):
    model_cfg = sigmoid_config(words)
    del model_cfg["text_cfg"]["hf_tokenizer_name"]  # open_clip would download SigLIP's vocabulary for this name
    with pytest.raises(ModelLoadError, match="would download a SigLIP sentencepiece vocabulary.*model.tokenizer"):
        build_tokenizer(ModelConfig(name="tiny-SigLIP"), "tiny-SigLIP", model_cfg, None)
    tokenizer, folder = build_tokenizer(ModelConfig(name="tiny-SigLIP", tokenizer=str(words)), "tiny-SigLIP",
                                        model_cfg, None)
    captions = ["a red circle"]
    assert folder == words.resolve() and torch.equal(tokenizer(captions), reference_ids(words, captions))
    assert offline == []


HF_TEXT_TOWER = "tuneclip-tests/tiny-bert"


@pytest.fixture
def hf_text_tower(words, monkeypatch) -> str:
    """tiny-ViT with a Hugging Face BERT text tower (as the XLM-R and mT5 CLIPs have), registered for this test."""
    import open_clip

    model_cfg = sigmoid_config(words)
    model_cfg["text_cfg"] = {"hf_model_name": HF_TEXT_TOWER, "hf_tokenizer_name": NOT_CACHED,
                             "hf_pooler_type": "cls_pooler", "hf_proj_type": "linear",
                             "context_length": CONTEXT_LENGTH, "vocab_size": model_cfg["text_cfg"]["vocab_size"]}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-ViT-hf-text", model_cfg)
    return "tiny-ViT-hf-text"


def test_a_hugging_face_text_tower_is_built_from_the_local_cache(hf_text_tower, words, no_network):
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
               max_position_embeddings=CONTEXT_LENGTH).save_pretrained(cached_snapshot(HF_TEXT_TOWER))
    bundle = build_model(ModelConfig(name=hf_text_tower, tokenizer=str(words)))
    config = bundle.model.text.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("bert", 24, 1)
    assert no_network == []


def test_a_hugging_face_text_tower_not_cached_is_one_clear_error_at_once(hf_text_tower, words, no_network):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=f"the Hugging Face model '{HF_TEXT_TOWER}' .* not in the local "
                                             f"Hugging Face cache.*`hf download {HF_TEXT_TOWER} config.json`"):
        build_model(ModelConfig(name=hf_text_tower, tokenizer=str(words)))
    assert time.monotonic() - start < 5 and no_network == []


def empty_folder(folder: Path, words: Path, monkeypatch) -> Path:
    return folder


def unreadable_tokenizer(folder: Path, words: Path, monkeypatch) -> Path:
    shutil.copy(words / "tokenizer_config.json", folder)
    (folder / "tokenizer.json").write_text("{not json")
    return folder


def words_without_transformers(folder: Path, words: Path, monkeypatch) -> Path:
    import open_clip.tokenizer

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'transformers'")

    monkeypatch.setattr(open_clip.tokenizer, "HFTokenizer", missing)
    return words


@pytest.mark.parametrize("make_folder, message", [
    (empty_folder, "is not a folder with Hugging Face tokenizer files"),
    (unreadable_tokenizer, "tokenizer files in .* cannot be read"),
    (words_without_transformers, "needs `pip install transformers sentencepiece`"),
])
def test_bad_model_tokenizer(tmp_path, words, monkeypatch, make_folder, message):
    folder = make_folder(tmp_path, words, monkeypatch)
    with pytest.raises(ModelLoadError, match=message):
        build_model(ModelConfig(name="tiny-ViT", tokenizer=str(folder)), load_weights=False)


def test_evaluation_command_reads_the_run_with_its_tokenizer(run, tmp_path):
    """The command's evaluation of the run (exported to an open_clip folder on the fly) equals the trainer's."""
    from tuneclip_ds.eval.cli import main as eval_main

    records = [json.loads(line) for line in (run["dir"] / "eval.jsonl").read_text().splitlines()]
    assert [record["stage2_step"] for record in records] == [0, 3]
    assert eval_main(["--model", "tiny-ViT-sigmoid", "--pretrained", str(run["dir"]), "--tasks", str(run["suite"]),
                      "--output", str(tmp_path / "cli.json")]) == 0
    metrics = json.loads((tmp_path / "cli.json").read_text())["metrics"]
    assert metrics == pytest.approx({name: records[-1][name] for name in metrics}, abs=1e-6)


LOAD_IN_PLAIN_OPEN_CLIP = """
import json, sys
import tuneclip_ds._torchvision_compat  # lets torchvision import on a CPU-only torch; registers nothing
import open_clip, torch
from PIL import Image

folder, images, captions, output = json.loads(sys.argv[1])
ours = sorted(name for name in sys.modules if name.startswith("tuneclip_ds"))
assert ours == ["tuneclip_ds", "tuneclip_ds._torchvision_compat"], ours
assert "tiny-ViT-sigmoid" not in open_clip.list_models()
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
pixels, tokens = torch.stack([preprocess(Image.open(path)) for path in images]), tokenizer(captions)
with torch.no_grad():
    features = {"image": model.eval().encode_image(pixels), "text": model.encode_text(tokens)}
torch.save({"pixels": pixels, "tokens": tokens, **features}, output)
"""


def load_in_plain_process(folder: Path, images: list[str], captions: list[str], output: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    arguments = json.dumps([str(folder), images, captions, str(output)])
    result = subprocess.run([sys.executable, "-c", LOAD_IN_PLAIN_OPEN_CLIP, arguments], capture_output=True,
                            text=True, cwd=output.parent, env=env)
    assert result.returncode == 0, result.stderr
    return torch.load(output)


def sample_images(folder: Path, count: int) -> list[str]:
    from tuneclip_ds.data.synthetic import resolve_difficulty, synthetic_sample

    paths = []
    for index in range(count):
        path = folder / f"{index}.png"
        path.write_bytes(synthetic_sample(index, 32, resolve_difficulty(0.3), 0, "val").image)
        paths.append(str(path))
    return paths


def test_exported_folder_loads_in_plain_open_clip(run, hub, words, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "exported"
    assert export.main([str(run["dir"]), "--folder", str(folder)]) == 0
    assert f"open_clip.get_tokenizer('local-dir:{folder}')" in capsys.readouterr().out
    tokenizer_files = sorted(path.name for path in words.iterdir())
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        ["open_clip_config.json", "open_clip_model.safetensors", *tokenizer_files])
    assert all((folder / name).read_bytes() == (words / name).read_bytes() for name in tokenizer_files)

    images, captions = sample_images(tmp_path, 4), corpus_captions(4)
    loaded = load_in_plain_process(folder, images, captions, tmp_path / "loaded.pt")

    # The checkpoint's fp32 weights in the model as this package builds it for the run.
    ours = build_model(ModelConfig(pretrained=str(hub), force_image_size=48), load_weights=False)
    ours.model.load_state_dict(export.fp32_weights(run["dir"] / "checkpoints" / "step_00000003", STAGE))
    pixels = torch.stack([ours.preprocess_val(Image.open(path)) for path in images])
    assert pixels.shape[-2:] == (48, 48) and torch.equal(loaded["pixels"], pixels)  # the run's preprocessing
    assert torch.equal(loaded["tokens"], reference_ids(words, captions))
    with torch.no_grad():
        torch.testing.assert_close(loaded["image"], ours.model.eval().encode_image(pixels))
        torch.testing.assert_close(loaded["text"], ours.model.encode_text(loaded["tokens"]))


def test_a_weights_file_of_this_model_points_to_folder_export(run, tmp_path, capsys):
    assert export.main([str(run["dir"]), "--output", str(tmp_path / "model.pt")]) == 0
    printed = capsys.readouterr().out
    assert "export with --folder" in printed and "open_clip.create_model(" not in printed


def test_folder_export_in_half_precision(run, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "half"
    assert export.main([str(run["dir"]), "--folder", str(folder), "--dtype", "bf16"]) == 0
    assert {tensor.dtype for tensor in load_file(folder / "open_clip_model.safetensors").values()} == {torch.bfloat16}
