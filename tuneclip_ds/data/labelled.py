"""Labelled training data as image-text pairs (FLYP): a sample's caption is a prompt template filled with the
name of its class, drawn anew every epoch.

The shards hold an image and a class label (a ``cls`` member or a json field, as evaluation reads them;
``python -m tuneclip_ds.data.shards --class-folder DIR`` writes them from an image folder). The template of
a sample is drawn from (seed, epoch, sample id) alone, like its image augmentation, so whichever rank, worker
or resumed run reads the sample in an epoch gives it the same caption. Batches also carry ``label``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch

from tuneclip_ds.config import LabelsConfig
from tuneclip_ds.data.labels import LabelError, fill_template, read_classnames, read_label, read_templates
from tuneclip_ds.data.pipeline import RankBatches, resolve_shards, sample_id_of
from tuneclip_ds.data.shards import DataError


@dataclass(frozen=True)
class ClassPrompts:
    """The captions of each class (every template filled with its name; label ``i`` is the ``i``-th class)
    and where a sample's label is."""

    captions: list[list[str]]
    label_field: str = "cls"

    @classmethod
    def from_config(cls, labels: LabelsConfig) -> "ClassPrompts":
        """Read (and check) the class names and templates that ``data.labels`` names."""
        owner = "data.labels"
        templates = read_templates(labels.templates, owner)
        # Filled once, as strings: open_clip's templates are lambdas, which data-loader workers could not unpickle.
        captions = [[fill_template(t, name) for t in templates] for name in read_classnames(labels.classnames, owner)]
        return cls(captions, labels.label_field)

    def label_of(self, sample: dict, where: str) -> int:
        """The sample's label, checked against the class names."""
        label = read_label(sample, self.label_field, where)
        if not 0 <= label < len(self.captions):
            raise LabelError(f"{where} has label {label}, outside the {len(self.captions)} class names of "
                             "data.labels.classnames (labels 0..n-1): the class names do not match the labels")
        return label

    def caption(self, label: int, seed: int, epoch: int, sample_id: int) -> str:
        """The caption of ``label`` in the template drawn for (seed, epoch, sample id)."""
        draw = random.Random(f"template/{seed}/{epoch}/{sample_id}")  # a string seed: the same in every process
        options = self.captions[label]
        return options[draw.randrange(len(options))]


class LabelledBatches(RankBatches):
    """:class:`RankBatches` of labelled samples: captions from :class:`ClassPrompts`, and a ``label`` per sample."""

    def __init__(self, prompts: ClassPrompts, *args):
        super().__init__(*args)
        self.prompts = prompts

    def _decode(self, sample: dict):
        where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
        label = self.prompts.label_of(sample, where)
        metadata = json.loads(sample["json"]) if "json" in sample else {}
        caption = self.prompts.caption(label, self.seed, self.epoch, sample_id_of(sample, metadata))
        # The caption goes in as the sample's text, so that what decoding does to a text applies to it too.
        return *super()._decode({**sample, "txt": caption.encode("utf-8")}), label

    def _collate(self, batch: list, num_skipped: int, position: tuple[int, int]) -> dict:
        collated = super()._collate([decoded[:-1] for decoded in batch], num_skipped, position)
        collated["label"] = torch.tensor([decoded[-1] for decoded in batch], dtype=torch.int64)
        return collated


def resolve_labelled_shards(spec: str) -> list:
    """:func:`resolve_shards`, telling how to convert an image folder given where shards are expected."""
    try:
        return resolve_shards(spec)
    except DataError:
        if os.path.isdir(spec) and any(entry.is_dir() for entry in os.scandir(spec)):
            raise DataError(
                f"{spec} holds sub-folders but no *.tar shards: training reads shards. Write them from an image "
                f"folder (a sub-folder per class) with `python -m tuneclip_ds.data.shards --class-folder {spec} "
                "--out SHARDS`, then set data.train_shards=SHARDS and data.labels.classnames=SHARDS/classnames.txt"
            ) from None
        raise
