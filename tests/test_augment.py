"""Image and caption augmentation (tuneclip_ds/data/augment.py): presets over open_clip's transform,
word edits, token dropout, multi-caption samples, weighted shard sampling; all seeded per sample."""

import collections
import random

import pytest
import torch
from PIL import Image
from torchvision import transforms

import tuneclip_ds  # noqa: F401  (before open_clip)
import open_clip
import tuneclip_ds.models  # noqa: F401  (registers tiny-ViT with open_clip)
from test_data import (ByteTokenizer, assert_same_batches, detokenize, loader_for, stream_for, take,
                       unequal_readers_corpus)
from tuneclip_ds.config import ConfigError, ImageAugmentationConfig, TextAugmentationConfig
from tuneclip_ds.data.augment import STOP_WORDS, CaptionAugmenter, image_train_transform, seeded


@pytest.fixture(scope="module")
def model():
    return open_clip.create_model("tiny-ViT")


def kinds(transform):
    return [type(step).__name__ for step in transform.transforms]


def test_no_augmentation_keeps_the_models_own_transform(model):
    default = object()
    assert image_train_transform(model, ImageAugmentationConfig(), default) is default


def test_the_strong_preset_and_explicit_fields_over_it(model):
    strong = image_train_transform(model, ImageAugmentationConfig(preset="strong"), None)
    assert kinds(strong)[:5] == ["RandomResizedCrop", "MaybeConvertMode", "color_jitter", "gray_scale", "RandomApply"]
    crop, _, jitter, gray, blur = strong.transforms[:5]
    assert crop.scale == (0.08, 1.0) and jitter.p == 0.8 and gray.p == 0.2 and blur.p == 0.5
    assert isinstance(blur.transforms[0], transforms.GaussianBlur) and kinds(strong)[5] == "MaybeToTensor"
    mine = image_train_transform(model, ImageAugmentationConfig(preset="strong", scale=(0.3, 1.0), blur_prob=0.0),
                                 None)
    assert mine.transforms[0].scale == (0.3, 1.0) and "RandomApply" not in kinds(mine)
    weak = image_train_transform(model, ImageAugmentationConfig(preset="weak"), None)
    assert weak.transforms[0].scale == (0.5, 1.0) and "color_jitter" not in kinds(weak)


def test_colour_jitter_probability_without_jitter_is_a_clear_error(model):
    with pytest.raises(ConfigError, match="color_jitter_prob needs data.augmentation.color_jitter"):
        image_train_transform(model, ImageAugmentationConfig(color_jitter_prob=0.5), None)


def test_augmentation_is_a_function_of_the_seed_epoch_and_sample(model):
    """open_clip's colour jitter and grayscale draw from Python's generator, torchvision from torch's:
    both are seeded per sample, whatever state they were in."""
    strong = image_train_transform(model, ImageAugmentationConfig(preset="strong"), None)
    image = Image.effect_noise((48, 40), 60).convert("RGB")

    def augmented(epoch, sample_id, disturb):
        random.seed(disturb), torch.manual_seed(disturb)
        with seeded(0, epoch, sample_id):
            return strong(image)

    first = augmented(0, 5, disturb=1)
    assert torch.equal(first, augmented(0, 5, disturb=2))
    assert not torch.equal(first, augmented(1, 5, disturb=1)) and not torch.equal(first, augmented(0, 6, disturb=1))
    state = random.getstate()
    with seeded(0, 0, 5):
        random.random()
    assert random.getstate() == state  # the caller's generator is left as it was


def test_seeding_the_cpu_generator_alone_draws_what_torch_manual_seed_did():
    """``seeded`` leaves the accelerators' generators alone (seeding them is slow); torch's CPU draws, hence
    every augmentation, are those of the full ``torch.manual_seed`` with the same key, as before."""
    torch.manual_seed(hash((0, 3, 7)) & 0x7FFF_FFFF_FFFF_FFFF)
    expected = torch.rand(4)
    caller = torch.random.get_rng_state()
    with seeded(0, 3, 7):
        assert torch.equal(torch.rand(4), expected)
    assert torch.equal(torch.random.get_rng_state(), caller)


def augmenter(**options):
    return CaptionAugmenter(TextAugmentationConfig(**options), ByteTokenizer(), seed=0)


def caption(augment, text, epoch=0, sample_id=0, metadata=None):
    return augment.caption({"txt": text.encode()}, metadata or {}, epoch, sample_id)


def test_word_edits():
    words = [f"w{i}" for i in range(2000)]
    kept = caption(augmenter(delete=0.3), " ".join(words)).split()
    assert 0.65 < len(kept) / len(words) < 0.75 and kept == [w for w in words if w in set(kept)]  # order kept
    sentence = "a photo of the dog and a cat on the grass , with two birds"
    no_stops = caption(augmenter(stop_words=1.0), sentence).split()
    assert no_stops == [w for w in sentence.split() if w not in STOP_WORDS]
    swapped = caption(augmenter(swap=0.2), " ".join(words)).split()
    assert sorted(swapped) == sorted(words) and 0 < sum(a != b for a, b in zip(swapped, words)) <= 2 * 400
    assert caption(augmenter(delete=0.99), "lonely") == "lonely"  # never emptied


def test_caption_edits_depend_on_the_seed_epoch_and_sample_only():
    text = " ".join(f"w{i}" for i in range(50))
    augment = augmenter(delete=0.5, swap=0.1)
    assert caption(augment, text, 3, 7) == caption(augmenter(delete=0.5, swap=0.1), text, 3, 7)
    assert caption(augment, text, 3, 7) != caption(augment, text, 4, 7) != caption(augment, text, 4, 8)


def test_one_caption_per_epoch_from_lines_or_json():
    augment = augmenter(multi_caption=True)
    lines = "a red square\n\nthe blue circle\n a green star "
    drawn = collections.Counter(caption(augment, lines, epoch) for epoch in range(300))
    assert set(drawn) == {"a red square", "the blue circle", "a green star"} and min(drawn.values()) > 70
    assert caption(augment, "ignored", 0, 0, {"captions": ["from json"]}) == "from json"
    with pytest.raises(ValueError, match="no caption"):
        caption(augment, " \n ")


def test_token_dropout_keeps_start_end_and_padding():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    augment = CaptionAugmenter(TextAugmentationConfig(token_dropout=0.5), tokenizer, seed=0)
    tokens = tokenizer([" ".join(["word"] * 60), "a cat"])
    dropped = augment.tokens(tokens, epoch=0, sample_ids=[0, 1])
    start, end = tokens[0, 0], tokens[0, 61]
    for before, after in zip(tokens, dropped):
        content = before[(before != 0) & (before != start) & (before != end)]
        kept = after[(after != 0) & (after != start) & (after != end)]
        remaining = iter(content.tolist())
        assert after[0] == start and (after == end).sum() == 1 and all(t in remaining for t in kept.tolist())
        assert after[after.tolist().index(end) + 1:].eq(0).all()  # padding after the end token
    assert 15 < len(dropped[0].nonzero()) - 2 < 45
    assert torch.equal(dropped, augment.tokens(tokens, epoch=0, sample_ids=[0, 1]))
    assert torch.equal(augmenter().tokens(tokens, 0, [0, 1]), tokens)


def test_an_augmented_stream_resumes_exactly(tmp_path, model):
    unequal_readers_corpus(tmp_path)
    options = dict(captions=augmenter(delete=0.3, swap=0.2, token_dropout=0.2))
    preprocess = image_train_transform(model, ImageAugmentationConfig(preset="strong"), None)
    straight, states = take(stream_for(tmp_path, preprocess, 0, **options), 14)
    captions = [detokenize(text) for batch in straight for text in batch["text"]]
    assert sum(text.startswith("caption ") and len(text.split()) == 2 for text in captions) < len(captions)
    for taken in (3, 9, 11):
        resumed, _ = take(stream_for(tmp_path, preprocess, 0, state=states[taken - 1], **options), 14 - taken)
        assert_same_batches(resumed, straight[taken:])


def test_the_run_builds_its_loader_with_the_configured_augmentation(synthetic_shards):
    from tuneclip_ds.builders import build_batches
    from tuneclip_ds.config import load_config
    from tuneclip_ds.models import build_model

    config = load_config(None, ["train.steps=1", "model.name=tiny-ViT", f"data.train_shards={synthetic_shards}",
                                "data.num_workers=0", "data.augmentation.preset=strong",
                                "data.text_augmentation.stop_words=0.9"])
    batches = build_batches(config, build_model(config.model), rank=0, world_size=1).loader.batches
    assert "RandomApply" in kinds(batches.preprocess) and batches.captions.config.stop_words == 0.9
    assert next(iter(batches))["image"].shape == (config.train.batch_size, 3, 32, 32)


def test_transforms_not_ending_in_normalisation_keep_float_images(model):
    from tuneclip_ds.data.device_images import split_normalization

    erasing = image_train_transform(model, ImageAugmentationConfig(use_timm=True, re_prob=0.25), None)
    assert type(erasing.transforms[-1]).__name__ == "RandomErasing"  # works on normalised tensors
    assert split_normalization(erasing) == (erasing, None)
    pixels, normalization = split_normalization(image_train_transform(model, ImageAugmentationConfig(preset="strong"),
                                                                      None))
    assert kinds(pixels)[-2:] == ["RandomApply", "PILToTensor"] and normalization.mean == open_clip.OPENAI_DATASET_MEAN


def test_the_run_mixes_its_sources(synthetic_shards):
    from tuneclip_ds.builders import build_batches
    from tuneclip_ds.config import load_config
    from tuneclip_ds.models import build_model

    sources = (f"[{{shards: {synthetic_shards}, num_samples: 1024}}, "
               f"{{shards: {synthetic_shards}, weight: 2, num_samples: 1024}}]")
    config = load_config(None, ["train.steps=1", "model.name=tiny-ViT", f"data.sources={sources}",
                                "data.num_workers=0"])
    batch = next(iter(build_batches(config, build_model(config.model), rank=0, world_size=1).loader))
    second = batch["sample_id"] >= 1024  # the second source's ids follow the first's 1024
    assert batch["source_counts"] == [int((~second).sum()), int(second.sum())] and sum(batch["source_counts"]) == 32


def test_a_preset_equals_open_clips_transform_built_with_its_fields(model):
    """The strong preset, blur switched off: open_clip's own transform made from an AugmentationCfg with the
    preset's fields gives the same tensors under the same seed."""
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

    ours = image_train_transform(model, ImageAugmentationConfig(preset="strong", blur_prob=0.0), None)
    fields = dict(scale=(0.08, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8, gray_scale_prob=0.2)
    theirs = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=True,
                                aug_cfg=AugmentationCfg(**fields))
    image = Image.effect_noise((48, 40), 60).convert("RGB")
    for sample_id in range(8):
        with seeded(0, 0, sample_id):
            expected = theirs(image)
        with seeded(0, 0, sample_id):
            assert torch.equal(ours(image), expected)
