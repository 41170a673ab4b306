"""Ring exchange shared by the gather-free losses, and the process-group helpers they use.

Rank ``k`` of a group of ``W`` ranks sends its block (a tuple of tensors) to ``k+1`` and receives
the block of ``k-1``, ``W-1`` times, so that every rank sees every block exactly once. The next
transfer is started before the caller works on the current block, so communication overlaps
computation. Tensors stay on their own device (gloo on CPU, nccl on GPU).

Hierarchical (``topology="hierarchical"``, ranks laid out as nodes of ``L`` consecutive ranks): the
blocks of a node are first gathered inside it (the fast local fabric), then node-sized blocks travel a
ring across nodes, between the ranks of the same local index: ``N-1`` hops for ``N`` nodes instead of
``W-1``. The caller sees the same blocks in the same order as on the flat ring (so the losses give
identical results): its own node's blocks from its own down, the other nodes' as they arrive, its own
node's higher blocks last.
"""

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from tuneclip_ds.distributed import ranks_per_node


TOPOLOGIES = ("ring", "hierarchical")


@dataclass(frozen=True)
class GroupInfo:
    """A process group (``None``: single process) with this process's rank in it, and for the
    hierarchical ring the ranks per node and this rank's node group."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    node_size: int = 1  # 1: the flat ring
    node_group: dist.ProcessGroup | None = None

    @property
    def nodes(self) -> int:
        return self.world_size // self.node_size


def resolve_group(group: dist.ProcessGroup | None = None, topology: str = "ring") -> GroupInfo:
    """The given group, else the world when torch.distributed is initialised, else one process; for
    ``topology="hierarchical"`` on the world, with nodes of ``LOCAL_WORLD_SIZE`` ranks when that makes more
    than one node of more than one rank (else, and on other groups, the flat ring: the same results)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown ring topology {topology!r}; one of {', '.join(TOPOLOGIES)}")
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return GroupInfo(None, 0, 1)
        group = dist.group.WORLD
    info = GroupInfo(group, dist.get_rank(group), dist.get_world_size(group))
    node_size = ranks_per_node()
    if topology == "ring" or group != dist.group.WORLD or not 1 < node_size < info.world_size:
        return info
    if info.world_size % node_size:
        raise ValueError(f"the hierarchical ring needs the same number of ranks on every node: {info.world_size} "
                         f"ranks do not split into nodes of LOCAL_WORLD_SIZE={node_size}")
    return replace(info, node_size=node_size, node_group=_node_group(info.rank // node_size, node_size))


_NODE_GROUPS: dict[int, list[dist.ProcessGroup]] = {}  # by ranks per node: the group of each node


def _node_group(node: int, node_size: int) -> dist.ProcessGroup:
    """The group of ``node``'s ranks (consecutive ranks of the world). Every rank makes every node's group,
    once, in the same order, as ``new_group`` requires."""
    if node_size not in _NODE_GROUPS:
        world = dist.get_world_size()
        _NODE_GROUPS[node_size] = [dist.new_group(list(range(first, first + node_size)))
                                   for first in range(0, world, node_size)]
    return _NODE_GROUPS[node_size][node]


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
    if info.node_size > 1:
        yield from _hierarchical_blocks(current, info)
        return
    shift = _Shift.along_ranks(info)
    for step in range(info.world_size):
        is_last = step == info.world_size - 1
        incoming = None if is_last else shift.start(current)
        yield (info.rank - step) % info.world_size, current
        if incoming is not None:
            current = incoming.wait()


def _hierarchical_blocks(block: tuple[torch.Tensor, ...], info: GroupInfo):
    """``ring_blocks`` over nodes: blocks gathered in the node, node blocks (each tensor stacked over the
    node's ranks) passed between nodes, and yielded rank by rank in the flat ring's order."""
    size, local = info.node_size, info.rank % info.node_size
    first_rank = info.rank - local
    own = tuple(_gather_in_node(t, info) for t in block)
    shift = _Shift.along_nodes(info)
    incoming = shift.start(own)
    for index in range(local, -1, -1):  # this node's blocks from this rank's down
        yield first_rank + index, tuple(t[index] for t in own)
    for step in range(1, info.nodes):
        current = incoming.wait()
        incoming = shift.start(current) if step < info.nodes - 1 else None
        current_first = (first_rank - step * size) % info.world_size
        for index in range(size - 1, -1, -1):
            yield current_first + index, tuple(t[index] for t in current)
    for index in range(size - 1, local, -1):  # its higher blocks close the flat ring's order
        yield first_rank + index, tuple(t[index] for t in own)


def _gather_in_node(tensor: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """``[node_size, *tensor.shape]``: the node's ranks' tensors in rank order."""
    gathered = tensor.new_empty((info.node_size, *tensor.shape))
    dist.all_gather(list(gathered.unbind(0)), tensor, group=info.node_group)
    return gathered


@dataclass(frozen=True)
class _Shift:
    """Sends to ``next_rank`` and receives from ``previous_rank`` (ranks of the group)."""

    info: GroupInfo
    next_rank: int
    previous_rank: int

    @classmethod
    def along_ranks(cls, info: GroupInfo) -> "_Shift":
        return cls(info, (info.rank + 1) % info.world_size, (info.rank - 1) % info.world_size)

    @classmethod
    def along_nodes(cls, info: GroupInfo) -> "_Shift":
        """Between the ranks of the same local index on neighbouring nodes."""
        return cls(info, (info.rank + info.node_size) % info.world_size, (info.rank - info.node_size) % info.world_size)

    def start(self, block: tuple[torch.Tensor, ...]) -> "_PendingShift":
        """Start sending ``block`` and receiving the same-shaped block."""
        buffers = tuple(torch.empty_like(t) for t in block)
        operations = []
        # One tag per tensor so that tensors of a block cannot be matched out of order.
        for tag, (outgoing, buffer) in enumerate(zip(block, buffers)):
            operations.append(dist.P2POp(dist.isend, outgoing, group=self.info.group, group_peer=self.next_rank,
                                         tag=tag))
            operations.append(dist.P2POp(dist.irecv, buffer, group=self.info.group, group_peer=self.previous_rank,
                                         tag=tag))
        return _PendingShift(buffers, dist.batch_isend_irecv(operations))


class _PendingShift:
    """Receive buffers of one ring step and the work handles that fill them."""

    def __init__(self, buffers: tuple[torch.Tensor, ...], works: list[dist.Work]):
        self.buffers = buffers
        self.works = works

    def wait(self) -> tuple[torch.Tensor, ...]:
        for work in self.works:
            work.wait()
        return self.buffers

