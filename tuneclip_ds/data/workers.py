"""How many DataLoader workers ("readers") a rank reads its shards with.

Ranks and readers read disjoint shards, so every one of the ``world_size x workers`` readers needs a shard
(unless shards are drawn with replacement). An explicit ``data.num_workers`` that asks for more is an error;
the automatic default (``None``) takes what the CPUs allow and lowers it to what the shards allow.
"""

from __future__ import annotations

import logging

from tuneclip_ds.data.shards import DataError
from tuneclip_ds.distributed import cpus_per_rank

logger = logging.getLogger("tuneclip_ds.data")

# More workers than this do not pay: one decodes and crops about 600 256-px JPEGs into 224-px images per second
# of processor time (benchmarks/input_speed.py), so 8 give several thousand a second, more than a GPU trains even
# ViT-B/16 on, while each more holds its own shuffle buffer and prefetched batches in memory and needs shards
# of its own (every rank's every worker reads different shards).
MAX_AUTOMATIC_WORKERS = 8


def automatic_workers() -> int:
    """This rank's CPUs less one for the training process itself, at least 1, at most MAX_AUTOMATIC_WORKERS."""
    return min(MAX_AUTOMATIC_WORKERS, max(1, cpus_per_rank() - 1))


def resolve_workers(num_workers: int | None, shard_counts: list[int], world_size: int, resampled: bool,
                    rank: int) -> int:
    """The DataLoader workers of each rank: ``num_workers``, or with None the automatic number, lowered to
    what the fewest shards of the sources (``shard_counts``) give each of the ``world_size`` ranks.

    Raises DataError when the shards cannot give each reader one: an explicit ``num_workers`` too large, or
    fewer shards than ranks."""
    if num_workers is None:
        num_workers = _automatic_within_shards(min(shard_counts), world_size, resampled, rank)
    _check_a_shard_per_reader(shard_counts, world_size * max(1, num_workers), world_size, resampled)
    return num_workers


def _automatic_within_shards(fewest_shards: int, world_size: int, resampled: bool, rank: int) -> int:
    for_cpus = automatic_workers()
    chosen = for_cpus if resampled else min(for_cpus, max(1, fewest_shards // world_size))
    if rank == 0:
        lowered = f"; {fewest_shards} shards for {world_size} ranks: not {for_cpus}" if chosen < for_cpus else ""
        logger.info("data.num_workers: %d data-loading workers per rank (automatic: this rank's %d CPU(s) less one "
                    "for training, at least 1, at most %d%s; set data.num_workers to choose)", chosen,
                    cpus_per_rank(), MAX_AUTOMATIC_WORKERS, lowered)
    return chosen


def _check_a_shard_per_reader(shard_counts: list[int], readers: int, world_size: int, resampled: bool) -> None:
    if resampled:
        return
    for index, count in enumerate(shard_counts):
        if count < readers:
            where = f"source {index}: " if len(shard_counts) > 1 else ""
            raise DataError(
                f"{where}{count} shards for {world_size} ranks x {readers // world_size} data workers: "
                f"each of the {readers} readers needs at least one shard. Write more, smaller shards "
                "(--samples-per-shard), use fewer data workers (data.num_workers), or sample shards with "
                "replacement (data.resampled=true)"
            )
