"""The few collectives evaluation needs, on the default process group; no-ops for a world of one."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def in_lockstep(items: Iterable[T], world_size: int, device: torch.device) -> Iterator[T | None]:
    """This rank's items, then ``None`` until every rank has run out.

    Ranks hold different amounts of data, but under ZeRO-3 every forward is a collective
    (parameters are gathered in it): a rank without data left runs a throw-away forward
    on ``None`` steps so that all ranks make the same calls.
    """
    items = iter(items)
    while True:
        item = next(items, None)
        if world_size > 1:
            anyone_left = torch.tensor([item is not None], dtype=torch.int32, device=device)
            dist.all_reduce(anyone_left, op=dist.ReduceOp.MAX)
            if not anyone_left.item():
                return
        elif item is None:
            return
        yield item


def all_reduce_sum(counts: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(counts)
    return counts


def gather_sorted(rows: torch.Tensor, keys: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``rows`` (2-d), stably sorted by their integer ``keys``: the same on all ranks.

    Rows with equal keys keep their rank-local order, so the result is the order one process gets.
    """
    if world_size > 1:
        rows = torch.cat(_all_gather_rows(rows, world_size))
        keys = torch.cat(_all_gather_rows(keys[:, None], world_size))[:, 0]
    order = torch.sort(keys, stable=True).indices
    return rows[order], keys[order]


def _all_gather_rows(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """all_gather of 2-d tensors whose number of rows differs between ranks.

    A rank without rows may not know the row width either (an empty ``(0, 0)`` tensor): shapes
    are exchanged first, tensors padded to the largest, and the padding cut off again.
    """
    shape = torch.tensor(tensor.shape, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    rows, width = torch.stack(shapes).amax(0).tolist()
    padded = tensor.new_zeros(rows, width)
    padded[: tensor.shape[0], : tensor.shape[1]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [part[: int(s[0])] for part, s in zip(gathered, shapes)]
