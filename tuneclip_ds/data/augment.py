"""Training-time augmentation of images and captions (``data.augmentation``, ``data.text_augmentation``).

Images: open_clip's own training transform with an ``AugmentationCfg`` (its fields, or a preset), plus
Gaussian blur, which open_clip lacks. Captions: one caption per epoch of a multi-caption sample, then
word-level edits (deletion, swaps, stop-word removal) before tokenising, and token dropout after.

Every random choice is drawn from a seed of (run seed, epoch, sample id), as the image transform is
(``seeded``), so a sample is augmented alike on any rank or data worker, and a resumed run repeats it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import warnings

import torch

from tuneclip_ds.config import ConfigError, ImageAugmentationConfig, TextAugmentationConfig

# Named image presets: open_clip AugmentationCfg fields (and blur_prob). "weak" crops harder than open_clip's
# default (scale 0.9-1); "strong" follows the SimCLR-style recipe used by the improved CLIP baselines
# (random resized crop from 8 %, colour jitter 0.4/0.4/0.4/0.1 at p 0.8, grayscale at p 0.2, blur at p 0.5).
IMAGE_PRESETS = {
    "none": {},
    "weak": {"scale": (0.5, 1.0)},
    "strong": {"scale": (0.08, 1.0), "color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8,
               "gray_scale_prob": 0.2, "blur_prob": 0.5},
}
BLUR_SIGMA = (0.1, 2.0)

# Common English function words (the stop words that caption augmentation may drop).
STOP_WORDS = frozenset("""
a an the and or but nor so yet of in on at to for from by with without into onto over under above below
between through during before after about against among around behind beside near off out up down
is are was were be been being am has have had having do does did this that these those there here it its
it's they them their he him his she her we us our you your i me my as than then too very just also
""".split())


@contextlib.contextmanager
def seeded(seed: int, epoch: int, sample_id: int):
    """torch's CPU and Python's global generators seeded by (seed, epoch, sample id), restored afterwards:
    torchvision draws from torch's, open_clip's colour jitter and grayscale and timm's crops from Python's.
    Not ``torch.manual_seed``, which also seeds every accelerator's generators, each call recording a stack
    trace while they are not initialised (as in data workers): most of a small image's time."""
    key = hash((seed, epoch, sample_id)) & 0x7FFF_FFFF_FFFF_FFFF
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(key)
            random.seed(key)
            yield
    finally:
        random.setstate(python_state)


def image_settings(augmentation: ImageAugmentationConfig) -> dict:
    """The preset's fields, overridden by the fields set explicitly (None: not set)."""
    explicit = {name: value for name, value in dataclasses.asdict(augmentation).items()
                if name != "preset" and value is not None}
    return {**IMAGE_PRESETS[augmentation.preset], **explicit}


def image_train_transform(model: torch.nn.Module, augmentation: ImageAugmentationConfig, default):
    """The training transform for ``model``: ``default`` (open_clip's, as built with the model) unless
    ``data.augmentation`` asks for more."""
    settings = image_settings(augmentation)
    if not settings:
        return default
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

    if settings.get("color_jitter_prob") and "color_jitter" not in settings:
        raise ConfigError("data.augmentation.color_jitter_prob needs data.augmentation.color_jitter "
                          "(brightness, contrast, saturation, hue)")
    blur_prob = settings.pop("blur_prob", 0.0)
    preprocess = PreprocessCfg(**model.visual.preprocess_cfg)
    with warnings.catch_warnings():
        # open_clip 3.3 names the colour jitter and grayscale fields it did use as unused; the config refuses
        # the truly unused ones (timm's) up front
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        transform = image_transform_v2(preprocess, is_train=True, aug_cfg=AugmentationCfg(**settings))
    if blur_prob:
        _add_blur(transform, blur_prob, preprocess.size)
    return transform


def _add_blur(transform, probability: float, image_size) -> None:
    """Insert a random Gaussian blur (kernel about a tenth of the image, odd) before the tensor conversion."""
    from torchvision import transforms

    side = image_size if isinstance(image_size, int) else max(image_size)
    kernel = max(3, side // 10 | 1)
    blur = transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=BLUR_SIGMA)], p=probability)
    steps = transform.transforms
    to_tensor = next(i for i, step in enumerate(steps) if "ToTensor" in type(step).__name__)
    steps.insert(to_tensor, blur)


class CaptionAugmenter:
    """``data.text_augmentation`` for one run: ``caption`` picks and edits a sample's caption, ``tokens``
    drops tokens of the tokenised batch."""

    def __init__(self, config: TextAugmentationConfig, tokenizer, seed: int):
        self.config = config
        self.seed = seed
        # The ids of an empty caption: the start, end and padding tokens, whatever the tokenizer.
        empty = tokenizer([""])[0]
        self.special_tokens = torch.unique(empty)
        self.padding = int(empty[-1])

    def caption(self, sample: dict, metadata: dict, epoch: int, sample_id: int) -> str:
        """The sample's caption for this epoch: one of several (``multi_caption``), edited word by word."""
        rng = random.Random(f"caption/{self.seed}/{epoch}/{sample_id}")
        caption = self._choose(sample, metadata, rng)
        return " ".join(self._edit(caption.split(), rng))

    def _choose(self, sample: dict, metadata: dict, rng: random.Random) -> str:
        if not self.config.multi_caption:
            return sample["txt"].decode("utf-8")
        captions = metadata.get("captions") or sample["txt"].decode("utf-8").splitlines()
        captions = [caption for caption in map(str.strip, captions) if caption]
        if not captions:
            raise ValueError("no caption (an empty txt and no json 'captions')")
        return rng.choice(captions)

    def _edit(self, words: list[str], rng: random.Random) -> list[str]:
        config = self.config
        if config.stop_words:
            words = _keep_some(words, lambda word: word.lower().strip(",.;:!?") in STOP_WORDS
                               and rng.random() < config.stop_words)
        if config.delete:
            words = _keep_some(words, lambda word: rng.random() < config.delete)
        for _ in range(round(config.swap * len(words)) if len(words) > 1 else 0):
            first, second = rng.sample(range(len(words)), 2)
            words[first], words[second] = words[second], words[first]
        return words

    def tokens(self, tokens: torch.Tensor, epoch: int, sample_ids: list[int]) -> torch.Tensor:
        """``tokens`` [n, context] with each caption token (not start, end or padding) dropped with probability
        ``token_dropout``; the kept ones move up, padding fills the end."""
        if not self.config.token_dropout:
            return tokens
        dropped = torch.full_like(tokens, self.padding)
        for row, sample_id in enumerate(sample_ids):
            rng = random.Random(f"tokens/{self.seed}/{epoch}/{sample_id}")
            draws = torch.tensor([rng.random() for _ in range(tokens.shape[1])])
            keep = torch.isin(tokens[row], self.special_tokens) | (draws >= self.config.token_dropout)
            kept = tokens[row][keep]
            dropped[row, : len(kept)] = kept
        return dropped


def _keep_some(words: list[str], drop) -> list[str]:
    """``words`` without those ``drop`` picks, or the first word alone if it would pick them all (a caption
    is never emptied)."""
    kept = [word for word in words if not drop(word)]
    return kept or words[:1]

