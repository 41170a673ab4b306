"""Evaluation data: image folders and local WebDataset shards, read in a fixed order and split by sample.

Sample ``i`` (its position in that order: sorted class folders and files, or sorted shards and
their members) belongs to rank ``i % world_size``, whatever the number of shards, and within a
rank to DataLoader worker ``(i // world_size) % num_workers``. Every reader walks the whole
listing but reads the bytes of its own samples only (tar members of other samples are skipped
unread), and every sample carries ``i`` so that results can be put back in order exactly.
"""

from __future__ import annotations

import io
import itertools
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tuneclip_ds.data.labels import read_label
from tuneclip_ds.data.pipeline import resolve_shards
from tuneclip_ds.data.shards import DataError, class_folder_items
from tuneclip_ds.eval.tasks import EvalTask

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tar members holding the image

Target = Union[int, list]  # a label (classification) or the captions of an image (retrieval)
Wanted = Callable[[int], bool]


@dataclass
class ImageFolder:
    """One sub-folder per class; labels follow the sorted folder names."""

    class_names: list[str]
    items: list[tuple[str, int]]  # (image path, label) in sample order

    @property
    def num_samples(self) -> int:
        return len(self.items)

    def samples(self, wanted: Wanted) -> Iterator[tuple[int, bytes, Target, str]]:
        """(index, encoded image, target, where it came from) of the wanted samples, in order."""
        for index, (path, label) in enumerate(self.items):
            if wanted(index):
                yield index, Path(path).read_bytes(), label, path


@dataclass
class Shards:
    """Local WebDataset shards: an image member, and a label (``cls`` member or json field) or a ``txt`` caption."""

    paths: list[str]
    task: EvalTask

    class_names = None  # shards do not name their classes: the task does
    num_samples = None  # unknown until read

    def samples(self, wanted: Wanted) -> Iterator[tuple[int, bytes, Target, str]]:
        index = -1
        for path in self.paths:
            try:
                with tarfile.open(path) as tar:
                    files = (member for member in tar if member.isfile())
                    for key, members in itertools.groupby(files, key=_sample_key):
                        index += 1
                        if wanted(index):
                            fields = {_extension(m): tar.extractfile(m).read() for m in members}
                            where = f"sample {key} of {path}"
                            yield index, *self._image_and_target(fields, where), where
            except tarfile.TarError as error:
                raise DataError(f"task {self.task.name}: cannot read shard {path}: {error}") from None

    def _image_and_target(self, fields: dict, where: str) -> tuple[bytes, Target]:
        image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
        if image is None:
            raise DataError(f"task {self.task.name}: {where} has no image ({', '.join(IMAGE_EXTENSIONS)} member)")
        if self.task.kind == "retrieval":
            captions = [line.strip() for line in fields.get("txt", b"").decode("utf-8").splitlines() if line.strip()]
            if not captions:
                raise DataError(f"task {self.task.name}: {where} has no caption (txt member, one caption per line)")
            return image, captions
        return image, read_label(fields, self.task.label_field, f"task {self.task.name}: {where}")


def _sample_key(member: tarfile.TarInfo) -> str:
    """WebDataset's grouping: the path up to the first dot of the file name."""
    folder, name = os.path.split(member.name)
    return os.path.join(folder, name.split(".", 1)[0])


def _extension(member: tarfile.TarInfo) -> str:
    return os.path.basename(member.name).split(".", 1)[-1].lower()


def open_data(task: EvalTask) -> ImageFolder | Shards:
    """The task's data source, checked: the path exists, folders hold images, shards are local."""
    path = task.data_path
    if "$" in path:
        raise DataError(f"task {task.name}: data path {path} does not exist (an environment variable in it is not set)")
    if "{" not in path and "::" not in path and not os.path.exists(path):  # a plain path, not a pattern or a list
        raise DataError(f"task {task.name}: data path {path} does not exist")
    if task.kind == "classification" and os.path.isdir(path) and not any(Path(path).glob("*.tar")):
        return ImageFolder(*class_folder_items(path, f"task {task.name}"))
    try:
        shards = resolve_shards(path)
    except DataError as error:
        raise DataError(f"task {task.name}: {error}") from None
    remote = [s for s in shards if not os.path.isfile(s)]
    if remote:
        raise DataError(f"task {task.name}: evaluation reads local shards only, {remote[0]} is not a local file")
    return Shards(shards, task)


class RankSamples(IterableDataset):
    """This rank's samples, decoded and preprocessed: ``(index, image tensor, target)``."""

    def __init__(self, data: ImageFolder | Shards, preprocess: Callable, rank: int, world_size: int):
        self.data = data
        self.preprocess = preprocess
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)

        def wanted(index: int) -> bool:
            return index % self.world_size == self.rank and (index // self.world_size) % num_workers == worker

        for index, image, target, where in self.data.samples(wanted):
            yield index, self.preprocess(_decode(image, where)), target


def _decode(image: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            return decoded.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode the image of {where}: {error}") from None


def collate(examples: list) -> tuple[torch.Tensor, torch.Tensor, list]:
    indices, images, targets = zip(*examples)
    return torch.tensor(indices, dtype=torch.int64), torch.stack(images), list(targets)


def rank_loader(data: ImageFolder | Shards, task: EvalTask, preprocess: Callable, rank: int, world_size: int):
    """Batches ``(indices, images, targets)`` of at most ``task.batch_size`` of this rank's samples."""
    return DataLoader(RankSamples(data, preprocess, rank, world_size), batch_size=task.batch_size,
                      num_workers=task.num_workers, collate_fn=collate)
