"""Labelled training data (FLYP): class folders to shards, captions from class names and templates drawn per
(seed, epoch, sample id), exact resume, and clear errors for bad inputs."""

import functools
import json
import os
import pickle

import pytest
import torch
import yaml

from test_data import (assert_same_batches, corpus, detokenize, loader_for, make_images, png_bytes,  # noqa: F401
                       preprocess, read_shards, take, write_raw_tar)
from tuneclip_ds.config import ConfigError, LabelsConfig, load_config
from tuneclip_ds.data import shards
from tuneclip_ds.data.labelled import ClassPrompts, LabelledBatches, resolve_labelled_shards
from tuneclip_ds.data.labels import LabelError, fill_template
from tuneclip_ds.data.pipeline import resolve_shards
from tuneclip_ds.data.shards import DataError
from tuneclip_ds.data.stream import BatchStream
from tuneclip_ds.data.synthetic import CLASS_NAMES, ZEROSHOT_TEMPLATES

SYNTHETIC_LABELS = LabelsConfig(classnames="synthetic", templates="synthetic", label_field="label")


def labelled_loader(folder, preprocess, labels=SYNTHETIC_LABELS, **kwargs):
    make_batches = functools.partial(LabelledBatches, ClassPrompts.from_config(labels))
    return loader_for(folder, preprocess, make_batches=make_batches, **kwargs)


def captions_and_labels(loader) -> dict:
    """{sample id: (caption, label)} of one epoch."""
    found = {}
    for batch in loader:
        captions = map(detokenize, batch["text"])
        found.update(zip(batch["sample_id"].tolist(), zip(captions, batch["label"].tolist())))
    return found


@pytest.fixture(scope="module")
def labelled_corpus(tmp_path_factory):
    """64 synthetic samples in 8 shards: a json "label" each."""
    folder = tmp_path_factory.mktemp("labelled")
    corpus(folder)
    return folder


def test_captions_are_templates_of_the_class_drawn_per_seed_epoch_and_id(labelled_corpus, preprocess):
    stored = read_shards(resolve_shards(str(labelled_corpus)))
    loader = labelled_loader(labelled_corpus, preprocess)
    epochs = [captions_and_labels(loader) for _ in range(2)]
    prompts = ClassPrompts.from_config(SYNTHETIC_LABELS)
    for epoch, found in enumerate(epochs):
        assert sorted(found) == list(range(64))
        for sample_id, (caption, label) in found.items():
            assert label == json.loads(stored[sample_id]["json"])["label"]
            assert caption == prompts.caption(label, seed=0, epoch=epoch, sample_id=sample_id)
            assert caption in {fill_template(t, CLASS_NAMES[label]) for t in ZEROSHOT_TEMPLATES}
    changed = sum(epochs[0][i][0] != epochs[1][i][0] for i in range(64))
    assert 20 < changed < 64  # a template drawn anew each epoch (1 in 3 draws repeats)
    two_workers = labelled_loader(labelled_corpus, preprocess, num_workers=2)
    assert captions_and_labels(two_workers) == epochs[0]  # whichever worker reads a sample


def test_a_resumed_labelled_stream_gives_the_batches_of_an_uninterrupted_one(labelled_corpus, preprocess):
    def stream(state=None):
        batches = BatchStream(labelled_loader(labelled_corpus, preprocess, shuffle_buffer=6))
        if state is not None:
            batches.load_state_dict(state)
        return batches

    straight, states = take(stream(), 24)  # 16 batches an epoch
    for taken in (5, 16, 19):
        resumed, _ = take(stream(states[taken - 1]), 24 - taken)
        assert_same_batches(resumed, straight[taken:])


def test_class_folder_converter_labels_ids_and_class_names(tmp_path, preprocess, capsys):
    folder = tmp_path / "photos"
    for name, count in (("dog", 3), ("cat", 2)):
        make_images(folder / name, count)
    make_images(folder / "cat" / "indoor", 1, ".jpg")
    shards.main(["--class-folder", str(folder), "--out", str(tmp_path / "out"), "--samples-per-shard", "2"])
    assert "class names in label order" in capsys.readouterr().out
    assert (tmp_path / "out" / "classnames.txt").read_text() == "cat\ndog\n"
    stored = read_shards(resolve_shards(str(tmp_path / "out")))
    # ids: sorted class folders, then each one's sorted image paths
    expected = [("cat", "img0.png"), ("cat", "img1.png"), ("cat", "indoor/img0.jpg"),
                ("dog", "img0.png"), ("dog", "img1.png"), ("dog", "img2.png")]
    for sample_id, (name, path) in enumerate(expected):
        assert stored[sample_id]["cls"] == str(["cat", "dog"].index(name)).encode()
        assert stored[sample_id]["txt"].decode() == name
        assert stored[sample_id]["json"].decode().endswith(f'{os.path.join(folder, name, path)}"}}')
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}\n")
    labels = LabelsConfig(classnames=str(tmp_path / "out" / "classnames.txt"), templates=str(templates))
    found = captions_and_labels(labelled_loader(tmp_path / "out", preprocess, labels, batch_size=1))
    assert found == {i: (f"a photo of a {name}", ["cat", "dog"].index(name)) for i, (name, _) in enumerate(expected)}
    by_folder = LabelsConfig(classnames=str(folder), templates=str(templates))  # the folder names, the same order
    assert captions_and_labels(labelled_loader(tmp_path / "out", preprocess, by_folder, batch_size=1)) == found


def test_bad_class_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere is not a directory"):
        shards.class_folder_to_shards(tmp_path / "nowhere", tmp_path / "out")
    make_images(tmp_path / "flat", 2)
    with pytest.raises(DataError, match="flat has no class sub-folders"):
        shards.class_folder_to_shards(tmp_path / "flat", tmp_path / "out")
    make_images(tmp_path / "classes" / "dog", 1)
    (tmp_path / "classes" / "cat").mkdir()
    with pytest.raises(DataError, match="class folder .*cat has no images"):
        shards.class_folder_to_shards(tmp_path / "classes", tmp_path / "out")
    with pytest.raises(DataError, match="--class-folder .*classes --out SHARDS.*data.labels.classnames"):
        resolve_labelled_shards(str(tmp_path / "classes"))


def labelled_tar(path, label_member):
    write_raw_tar(path, [("000000000.png", png_bytes()), ("000000000.json", b'{"id": 0}'), label_member])


@pytest.mark.parametrize("label_member, message", [
    (("000000000.cls", b"30"), "has label 30, outside the 30 class names"),
    (("000000000.cls", b"cat"), "has label 'cat' in its 'cls', not an integer"),
    (("000000000.txt", b"a caption"), "has no label: no 'cls' member and no 'cls' field in its json"),
])
def test_bad_labels_stop_the_pipeline_with_the_sample_named(tmp_path, preprocess, label_member, message):
    labelled_tar(tmp_path / "a.tar", label_member)
    labels = LabelsConfig(classnames="synthetic", templates="synthetic")
    with pytest.raises(LabelError, match=f"sample 000000000 of .*a.tar {message}"):
        captions_and_labels(labelled_loader(tmp_path, preprocess, labels, batch_size=1))


def test_imagenet_prompts_are_filled_strings_that_data_workers_can_unpickle():
    prompts = ClassPrompts.from_config(LabelsConfig(classnames="imagenet", templates="openai"))
    assert len(prompts.captions) == 1000 and all(len(captions) == 80 for captions in prompts.captions)
    assert pickle.loads(pickle.dumps(prompts)) == prompts  # open_clip's templates themselves are lambdas
    assert prompts.captions[0][0] == "a bad photo of a tench."


def test_bad_class_names_and_templates_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.labels: classnames='missing.txt' is neither a built-in"):
        ClassPrompts.from_config(LabelsConfig(classnames="missing.txt"))
    no_slot = tmp_path / "templates.txt"
    no_slot.write_text("a photo\n")
    with pytest.raises(ConfigError, match="data.labels: template 'a photo' .* has no {} or {c}"):
        ClassPrompts.from_config(LabelsConfig(classnames="synthetic", templates=str(no_slot)))


def test_labels_config_is_checked_when_it_loads(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"steps": 1}, "data": {"labels": {"templates": "simple"}}}))
    with pytest.raises(ConfigError, match="data.labels.classnames is missing"):
        load_config(config_file)
    labelled = load_config(config_file, ["data.labels.classnames=imagenet", "loss.same_label_positives=true"])
    assert labelled.data.labels == LabelsConfig(classnames="imagenet", templates="simple")
    with pytest.raises(ConfigError, match="override data.labels=null.*same_label_positives needs labelled data"):
        load_config(config_file, ["data.labels=null", "loss.same_label_positives=true"])


def test_the_loss_built_from_the_config_takes_labels():
    from tuneclip_ds.builders import build_loss_from_config

    config = load_config(None, ["train.steps=1", "data.labels.classnames=synthetic", "loss.same_label_positives=true"])
    loss_fn = build_loss_from_config(config.loss)
    assert loss_fn.same_label_positives
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="needs the labels"):
        loss_fn(features, features, torch.tensor(10.0))
    assert torch.isfinite(loss_fn(features, features, torch.tensor(10.0), labels=torch.tensor([0, 0, 1, 2])))
