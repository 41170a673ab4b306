"""The training pipeline: WebDataset shards -> decoded, preprocessed, tokenized batches for one rank.

Shards are shuffled per epoch with a seed shared by all ranks, then split explicitly by
(rank, world_size) and across DataLoader workers ("readers"), so ranks and readers read disjoint
shards. Samples are shuffled in a buffer, decoded with PIL and batched inside each worker;
a sample that fails to decode is skipped and counted, a broken tar file is skipped with a
warning.

Each batch carries its reader and how many samples that reader has taken from its shuffle buffer
so far (decoded or not): a resumed epoch drops that many samples right after the shuffle buffer,
before decoding them, and starts asking the readers where the interrupted epoch would have gone on.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import os
import random
from dataclasses import dataclass

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from tuneclip_ds.data.augment import CaptionAugmenter, seeded
from tuneclip_ds.data.device_images import Normalization, split_normalization
from tuneclip_ds.data.shards import DataError, ShardFormatError
from tuneclip_ds.data.tar_members import read_tar_members
from tuneclip_ds.data.workers import resolve_workers

logger = logging.getLogger("tuneclip_ds.data")

_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_HOW_TO_MAKE_SHARDS = (
    "generate a synthetic corpus with `python -m tuneclip_ds.data.synthetic --out DIR --num-samples N` "
    "or write shards from your data with `python -m tuneclip_ds.data.shards --csv FILE --out DIR`"
)
# This many undecodable samples in a row means a systematic problem (wrong format, broken
# preprocess), not a few corrupt samples: fail instead of skipping forever.
_MAX_FAILURES_IN_A_ROW = 1000


class MissingSampleIdError(ShardFormatError):
    """A sample has neither a json ``id`` nor an integer ``__key__``."""


def resolve_shards(spec) -> list:
    """Shard paths from a directory (its *.tar, sorted), a brace pattern, or a ``::``-separated list of these.

    Local paths must exist; remote URLs (``s3://...``, ``pipe:...``) are passed to webdataset unchecked.
    """
    shards = []
    for part in os.fspath(spec).split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
            if not found:
                raise DataError(f"no *.tar shards in directory {part}: {_HOW_TO_MAKE_SHARDS}")
            shards.extend(found)
            continue
        expanded = list(braceexpand(part))
        missing = [path for path in expanded if not _is_remote(path) and not os.path.isfile(path)]
        if missing:
            raise DataError(
                f"shard {missing[0]} does not exist ({len(missing)} of the {len(expanded)} shards of {part!r} are "
                f"missing): check the path, or {_HOW_TO_MAKE_SHARDS}"
            )
        shards.extend(expanded)
    return shards


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def build_train_loader(shards, preprocess, tokenizer, batch_size: int, num_workers: int | None, rank: int,
                       world_size: int, seed: int, shuffle_buffer: int = 1000, resampled: bool = False,
                       captions: CaptionAugmenter | None = None, sources: list[Source] | None = None,
                       pin_memory: bool = False, make_batches=None):
    """Batches ``{"image", "text", "sample_id", "num_skipped"}`` for this rank; see :class:`TrainLoader`.

    ``shards``: a spec for :func:`resolve_shards` or a list of paths. ``preprocess``: PIL image -> tensor; one
    that ends in open_clip's tensor conversion and normalisation gives uint8 images and the batch's
    ``normalization`` to apply on the device (``device_images.to_model_input``). ``pin_memory``: for
    asynchronous copies to a GPU.
    ``num_workers``: DataLoader workers (0: read in this process; None: automatic, see ``workers.py``).
    ``tokenizer``: list of str -> LongTensor [n, ctx]. ``captions``: caption augmentation (none: the
    ``txt`` as it is). ``sources``: several sources mixed by weight (then ``shards`` is ignored). Partial last
    batches are dropped. ``make_batches``: a :class:`RankBatches` subclass (or a partial of one) for another
    kind of samples (labelled data).
    """
    if isinstance(shards, (str, os.PathLike)):
        shards = resolve_shards(shards)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard_counts = [len(source.shards) for source in sources or [Source(shards)]]
    num_workers = resolve_workers(num_workers, shard_counts, world_size, resampled, rank)
    pixels, normalization = split_normalization(preprocess)
    make_batches = make_batches or RankBatches
    batches = make_batches(sources[0].shards if sources else shards, pixels, tokenizer, batch_size, rank, world_size,
                           seed, shuffle_buffer, resampled)
    batches.captions, batches.sources, batches.normalization = captions, sources, normalization
    return TrainLoader(batches, num_workers, pin_memory)


@dataclass(frozen=True)
class Source:
    """One of several mixed sources: its shards, its weight, and the offset added to its sample ids (which
    must lie in [0, num_samples): the sources' ids then stay distinct)."""

    shards: list
    weight: float = 1.0
    id_offset: int = 0
    num_samples: int | None = None

    def global_id(self, sample_id: int, where: str) -> int:
        if not 0 <= sample_id < (self.num_samples or math.inf):
            raise ShardFormatError(
                f"{where} has id {sample_id}, outside its source's [0, {self.num_samples}) (data.sources[].num_samples): "
                "ids of mixed sources must lie in [0, num_samples), the sources' ids are then offset to stay distinct")
        return self.id_offset + sample_id


@dataclass
class ReadPosition:
    """How far a rank is in an epoch: the samples each reader (DataLoader worker) has taken from its
    shuffle buffer, and the reader of the next batch. The DataLoader asks its workers in turn, leaving
    out those that have run dry, so this fixes the rest of the epoch."""

    samples_read: list[int]
    next_reader: int = 0

    @classmethod
    def start(cls, readers: int) -> "ReadPosition":
        return cls([0] * readers)

    @property
    def readers(self) -> int:
        return len(self.samples_read)

    def copy(self) -> "ReadPosition":
        return ReadPosition(list(self.samples_read), self.next_reader)

    def advance(self, batch: dict) -> None:
        """Move past ``batch`` (taken from the epoch's loader)."""
        reader, samples_read = batch["position"]
        self.samples_read[reader] = samples_read
        self.next_reader = (reader + 1) % self.readers


class TrainLoader:
    """Re-iterable loader: each ``iter()`` is a new epoch, with its own shard and sample order.

    Not resampled: one pass over this rank's shards (ranks may get different numbers of batches).
    Resampled: an endless stream. ``epoch`` is the epoch the next ``iter()`` uses; ``set_epoch``
    changes it (e.g. on resume), optionally with the position to resume that epoch from.
    """

    def __init__(self, batches: "RankBatches", num_workers: int, pin_memory: bool = False):
        self.batches = batches
        # Batching happens inside the stream, so the DataLoader only moves batches out of the workers.
        self.loader = DataLoader(batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self.readers = max(1, num_workers)
        self.epoch = 0
        self.position: ReadPosition | None = None  # where the next iter() starts; None: the epoch's start

    def set_epoch(self, epoch: int, position: ReadPosition | None = None) -> None:
        self.epoch, self.position = epoch, position

    def __iter__(self):
        # Set before iter(): workers get their copy of the stream then.
        self.batches.epoch = self.epoch
        self.batches.start = self.position or ReadPosition.start(self.readers)
        self.epoch, self.position = self.epoch + 1, None
        return self._at_least_one_batch(iter(self.loader), resumed=any(self.batches.start.samples_read))

    def _at_least_one_batch(self, batches, resumed: bool):
        """Fail on an epoch without batches: a caller restarting epochs would otherwise loop forever.
        (A resumed epoch may have none left.)"""
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty and not resumed:
            stream = self.batches
            raise DataError(
                f"rank {stream.rank} got no full batch of {stream.batch_size} from its share of "
                f"{len(stream.shards)} shards: too few samples for this batch size and world size, or none "
                "could be decoded (see the warnings above)"
            )


class RankBatches(IterableDataset):
    """One epoch of batches from this rank's shards; in a DataLoader worker, from that worker's share."""

    def __init__(self, shards, preprocess, tokenizer, batch_size, rank, world_size, seed, shuffle_buffer, resampled):
        self.shards = list(shards)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.epoch = 0
        self.start = ReadPosition.start(1)  # where the epoch resumes (set by TrainLoader)
        self.captions: CaptionAugmenter | None = None
        self.sources: list[Source] | None = None  # several sources mixed by weight
        self.normalization: Normalization | None = None  # set: the preprocess gives uint8 pixels

    def __iter__(self):
        reader = self._reader()
        already_read = self.start.samples_read[reader]
        samples = itertools.islice(self.shuffled_samples(reader), already_read, None)  # dropped undecoded
        return self._batches(samples, reader, already_read)

    def _reader(self) -> int:
        """The reader this worker plays: worker i plays reader (i + start.next_reader) mod the number
        of readers, so that a resumed epoch asks the readers in the order the interrupted one would."""
        info = get_worker_info()
        worker = 0 if info is None else info.id
        return (worker + self.start.next_reader) % self.start.readers

    def shuffled_samples(self, reader: int):
        """The raw samples (tar members by extension) of ``reader``'s shards, out of its shuffle buffer; with
        several sources, drawn from them by weight until one runs dry (each sample tagged ``__source__``)."""
        if not self.sources:
            return self._shuffled(self.shards, reader, key="")
        streams = [_tagged(self._shuffled(source.shards, reader, key=f"/{index}"), index)
                   for index, source in enumerate(self.sources)]
        rng = random.Random(f"mix/{self.seed}/{self.epoch}/{self.rank}/{reader}")
        return _mixed(streams, [source.weight for source in self.sources], rng)

    def _shuffled(self, shards: list, reader: int, key: str):
        """``shards``' samples for ``reader``, shuffled; ``key`` tells the random orders of sources apart."""
        shard_urls = (self._resampled_shards(shards, reader, key) if self.resampled
                      else self._epoch_shards(shards, reader, key))
        members = read_tar_members(shard_urls, handler=_skip_broken_shard)
        samples = group_by_keys(members, handler=_skip_broken_shard)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{reader}{key}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return samples

    def _epoch_shards(self, shards: list, reader: int, key: str = ""):
        order = list(shards)
        random.Random(f"shards/{self.seed}/{self.epoch}{key}").shuffle(order)  # same order on all ranks
        for_this_rank = order[self.rank :: self.world_size]  # explicit node split: no env lookup
        return (dict(url=url) for url in for_this_rank[reader :: self.start.readers])

    def _resampled_shards(self, shards: list, reader: int, key: str = ""):
        rng = random.Random(f"resampled/{self.seed}/{self.epoch}/{self.rank}/{reader}{key}")
        while True:
            yield dict(url=rng.choice(shards))

    def _batches(self, samples, reader: int, already_read: int):
        """Batches of the decoded ``samples``, each with its ``position``: (reader, samples read)."""
        batch, skipped, failures_in_a_row = [], 0, 0
        for samples_read, sample in enumerate(samples, start=already_read + 1):
            try:
                decoded = self._decode(sample)
            except ShardFormatError:
                raise  # the shards' format, not one corrupt sample: skipping would skip them all
            except Exception as exn:  # any corrupt sample is skipped, whatever the decoder raises
                skipped += 1
                failures_in_a_row += 1
                logger.warning("skipping sample %s of %s: %r", sample.get("__key__"), sample.get("__url__"), exn)
                if failures_in_a_row >= _MAX_FAILURES_IN_A_ROW:
                    raise DataError(f"{failures_in_a_row} samples in a row failed to decode, last {exn!r}: "
                                    "check the shard format (image as jpg/png/webp, caption as txt)")
                continue
            failures_in_a_row = 0
            batch.append(decoded)
            if len(batch) == self.batch_size:
                yield self._collate(batch, skipped, (reader, samples_read))
                batch, skipped = [], 0

    def _decode(self, sample: dict):
        image_key = next((key for key in _IMAGE_KEYS if key in sample), None)
        if image_key is None:
            raise KeyError(f"no image field (one of {_IMAGE_KEYS})")
        with Image.open(io.BytesIO(sample[image_key])) as image:
            image = image.convert("RGB")
        metadata = json.loads(sample["json"]) if "json" in sample else {}
        sample_id = sample_id_of(sample, metadata)
        if self.sources:
            where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
            sample_id = self.sources[sample["__source__"]].global_id(sample_id, where)
        if self.captions is None:
            caption = sample["txt"].decode("utf-8")
        else:
            caption = self.captions.caption(sample, metadata, self.epoch, sample_id)
        # seeded by (run seed, epoch, sample id): the same whichever rank, worker or resumed run reads it
        with seeded(self.seed, self.epoch, sample_id):
            return self.preprocess(image), caption, sample_id

    def _collate(self, batch: list, num_skipped: int, position: tuple[int, int]) -> dict:
        images, captions, ids = zip(*batch)
        tokens = self.tokenizer(list(captions))
        if self.captions is not None:
            tokens = self.captions.tokens(tokens, self.epoch, ids)
        batch = {
            "image": torch.stack(images),
            "text": tokens,
            "sample_id": torch.tensor(ids, dtype=torch.int64),
            "num_skipped": num_skipped,
            "position": position,
        }
        if self.normalization is not None:
            batch["normalization"] = self.normalization
        if self.sources:
            batch["source_counts"] = [sum(source.id_offset <= i < source.id_offset + (source.num_samples or math.inf)
                                          for i in ids) for source in self.sources]
        return batch


def _tagged(samples, source: int):
    for sample in samples:
        sample["__source__"] = source
        yield sample


def _mixed(streams: list, weights: list[float], rng: random.Random):
    """Samples of ``streams`` drawn with probabilities in proportion to ``weights``, until one runs dry (so that
    the shares hold to the end of the epoch)."""
    while True:
        sample = next(rng.choices(streams, weights)[0], None)
        if sample is None:
            return
        yield sample


def sample_id_of(sample: dict, metadata: dict) -> int:
    """The json ``id``, else the ``__key__`` as an integer (img2dataset-style keys)."""
    if "id" in metadata:
        return int(metadata["id"])
    try:
        return int(sample["__key__"])
    except ValueError:
        raise MissingSampleIdError(
            f"sample {sample['__key__']!r} in {sample.get('__url__')} has no integer id (no json 'id' field, "
            "and its key is not an integer): rewrite the shards with `python -m tuneclip_ds.data.shards`, "
            "which numbers samples 0..n-1"
        ) from None


def _skip_broken_shard(exn: Exception) -> bool:
    """webdataset handler for unreadable or truncated tar files: warn and go on with the next shard."""
    logger.warning("skipping the rest of a broken shard: %r", exn)
    return True
