"""The training pipeline: WebDataset shards -> decoded, preprocessed, tokenized batches for one rank.

Shards are shuffled per epoch with a seed shared by all ranks, then split explicitly by
(rank, world_size) and across DataLoader workers, so ranks and workers read disjoint
shards. Samples are shuffled in a buffer, decoded with PIL and batched inside each worker;
a sample that fails to decode is skipped and counted, a broken tar file is skipped with a
warning.
"""

import glob
import io
import json
import logging
import os
import random

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tuneclip_ds.data.shards import DataError

logger = logging.getLogger("tuneclip_ds.data")

_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_HOW_TO_MAKE_SHARDS = (
    "generate a synthetic corpus with `python -m tuneclip_ds.data.synthetic --out DIR --num-samples N` "
    "or write shards from your data with `python -m tuneclip_ds.data.shards --csv FILE --out DIR`"
)
# This many undecodable samples in a row means a systematic problem (wrong format, broken
# preprocess), not a few corrupt samples: fail instead of skipping forever.
_MAX_FAILURES_IN_A_ROW = 1000


class MissingSampleIdError(DataError):
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


def build_train_loader(shards, preprocess, tokenizer, batch_size: int, num_workers: int, rank: int,
                       world_size: int, seed: int, shuffle_buffer: int = 1000, resampled: bool = False):
    """Batches ``{"image", "text", "sample_id", "num_skipped"}`` for this rank; see :class:`TrainLoader`.

    ``shards``: a spec for :func:`resolve_shards` or a list of paths. ``preprocess``: PIL image -> tensor.
    ``tokenizer``: list of str -> LongTensor [n, ctx]. Partial last batches are dropped.
    """
    if isinstance(shards, (str, os.PathLike)):
        shards = resolve_shards(shards)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    readers = world_size * max(1, num_workers)
    if not resampled and len(shards) < readers:
        raise DataError(
            f"{len(shards)} shards for {world_size} ranks x {max(1, num_workers)} data workers: each of the "
            f"{readers} readers needs at least one shard. Write more, smaller shards (--samples-per-shard), "
            "use fewer data workers, or sample shards with replacement (resampled=True)"
        )
    batches = RankBatches(shards, preprocess, tokenizer, batch_size, rank, world_size, seed, shuffle_buffer, resampled)
    return TrainLoader(batches, num_workers)


class TrainLoader:
    """Re-iterable loader: each ``iter()`` is a new epoch, with its own shard and sample order.

    Not resampled: one pass over this rank's shards (ranks may get different numbers of batches).
    Resampled: an endless stream. ``epoch`` is the epoch the next ``iter()`` uses; ``set_epoch``
    changes it (e.g. on resume).
    """

    def __init__(self, batches: "RankBatches", num_workers: int):
        self.batches = batches
        # Batching happens inside the stream, so the DataLoader only moves batches out of the workers.
        self.loader = DataLoader(batches, batch_size=None, num_workers=num_workers)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.batches.epoch = self.epoch  # set before iter(): workers get their copy of the stream then
        self.epoch += 1
        return self._at_least_one_batch(iter(self.loader))

    def _at_least_one_batch(self, batches):
        """Fail on an epoch without batches: a caller restarting epochs would otherwise loop forever."""
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
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

    def __iter__(self):
        worker = _worker_id()
        shard_urls = self._resampled_shards(worker) if self.resampled else self._epoch_shards()
        samples = wds.tarfile_to_samples(handler=_skip_broken_shard)(shard_urls)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return self._batches(samples)

    def _epoch_shards(self):
        order = list(self.shards)
        random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(order)  # same order on all ranks
        for_this_rank = order[self.rank :: self.world_size]  # explicit node split: no env lookup
        return wds.split_by_worker(dict(url=url) for url in for_this_rank)

    def _resampled_shards(self, worker: int):
        rng = random.Random(f"resampled/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        while True:
            yield dict(url=rng.choice(self.shards))

    def _batches(self, samples):
        batch, skipped, failures_in_a_row = [], 0, 0
        for sample in samples:
            try:
                image, caption, sample_id = self._decode(sample)
            except MissingSampleIdError:
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
            batch.append((image, caption, sample_id))
            if len(batch) == self.batch_size:
                yield self._collate(batch, skipped)
                batch, skipped = [], 0

    def _decode(self, sample: dict):
        image_key = next((key for key in _IMAGE_KEYS if key in sample), None)
        if image_key is None:
            raise KeyError(f"no image field (one of {_IMAGE_KEYS})")
        with Image.open(io.BytesIO(sample[image_key])) as image:
            image = image.convert("RGB")
        caption = sample["txt"].decode("utf-8")
        metadata = json.loads(sample["json"]) if "json" in sample else {}
        sample_id = sample_id_of(sample, metadata)
        return self._augment(image, sample_id), caption, sample_id

    def _augment(self, image, sample_id: int) -> torch.Tensor:
        """The transform under a seed of (run seed, epoch, sample id), so that random augmentation
        is the same whichever rank, worker or resumed run reads the sample."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, sample_id)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.preprocess(image)

    def _collate(self, batch: list, num_skipped: int) -> dict:
        images, captions, ids = zip(*batch)
        return {
            "image": torch.stack(images),
            "text": self.tokenizer(list(captions)),
            "sample_id": torch.tensor(ids, dtype=torch.int64),
            "num_skipped": num_skipped,
        }


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


def _worker_id() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _skip_broken_shard(exn: Exception) -> bool:
    """webdataset handler for unreadable or truncated tar files: warn and go on with the next shard."""
    logger.warning("skipping the rest of a broken shard: %r", exn)
    return True
