"""Ring exchange shared by the gather-free losses, and the process-group helpers they use.

Rank ``k`` of a group of ``W`` ranks sends its block (a tuple of tensors) to ``k+1`` and receives
the block of ``k-1``, ``W-1`` times, so that every rank sees every block exactly once. The next
transfer is started before the caller works on the current block, so communication overlaps
computation. Tensors stay on their own device (gloo on CPU, nccl on GPU).
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GroupInfo:
    """A process group (``None``: single process) with this process's rank in it."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int


def resolve_group(group: dist.ProcessGroup | None = None) -> GroupInfo:
    """The given group, else the world when torch.distributed is initialised, else one process."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return GroupInfo(None, 0, 1)
        group = dist.group.WORLD
    return GroupInfo(group, dist.get_rank(group), dist.get_world_size(group))


def all_reduce_sum(tensor: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """Sum of ``tensor`` over the group (in place, also returned); no communication for W=1."""
    if info.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=info.group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """Element-wise max of ``tensor`` over the group (in place, also returned)."""
    if info.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=info.group)
    return tensor


def check_equal_local_batch(local_batch: int, info: GroupInfo, device: torch.device) -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks of the group hold ``local_batch``
    samples. The ring exchanges blocks of one shape: unequal blocks would hang the exchange or mix
    up rows. One all_reduce of two numbers (collective: every rank must call it)."""
    if info.world_size == 1:
        return
    extremes = all_reduce_max(torch.tensor([local_batch, -local_batch], device=device), info).tolist()
    largest, smallest = extremes[0], -extremes[1]
    if largest != smallest:
        raise ValueError(
            f"per-rank batch sizes differ: between {smallest} and {largest} samples across the "
            f"{info.world_size} ranks ({local_batch} on rank {info.rank}); the ring losses need the same "
            "local batch on every rank: drop the last incomplete batch (drop_last) or give every rank "
            "equal batches"
        )


def ring_blocks(
    block: tuple[torch.Tensor, ...], info: GroupInfo
) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """Yield ``(source_rank, block)`` for this rank's own block, then those of ranks k-1, k-2, ...

    While the caller works on one block the next one is already in flight. Yielded tensors are
    read by the pending send: the caller must not modify them.
    """
    current = tuple(t.contiguous() for t in block)
    for step in range(info.world_size):
        is_last = step == info.world_size - 1
        incoming = None if is_last else _start_shift(current, info)
        yield (info.rank - step) % info.world_size, current
        if incoming is not None:
            current = incoming.wait()


class _PendingShift:
    """Receive buffers of one ring step and the work handles that fill them."""

    def __init__(self, buffers: tuple[torch.Tensor, ...], works: list[dist.Work]):
        self.buffers = buffers
        self.works = works

    def wait(self) -> tuple[torch.Tensor, ...]:
        for work in self.works:
            work.wait()
        return self.buffers


def _start_shift(block: tuple[torch.Tensor, ...], info: GroupInfo) -> _PendingShift:
    """Start sending ``block`` to rank k+1 and receiving the same-shaped block from rank k-1."""
    next_rank = (info.rank + 1) % info.world_size
    previous_rank = (info.rank - 1) % info.world_size
    buffers = tuple(torch.empty_like(t) for t in block)
    operations = []
    # One tag per tensor so that tensors of a block cannot be matched out of order.
    for tag, (outgoing, buffer) in enumerate(zip(block, buffers)):
        operations.append(dist.P2POp(dist.isend, outgoing, group=info.group, group_peer=next_rank, tag=tag))
        operations.append(dist.P2POp(dist.irecv, buffer, group=info.group, group_peer=previous_rank, tag=tag))
    return _PendingShift(buffers, dist.batch_isend_irecv(operations))
