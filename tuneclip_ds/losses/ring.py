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

    The tensors of a block (any dtypes) travel packed in one buffer: one send and one receive per hop.
    While the caller works on one block the next one is already in flight. Yielded tensors are read
    by the pending send and are views of one of two receive buffers that take turns: the caller must
    not modify them, and must copy what it keeps beyond the next block.
    """
    packet = _Packet.of(block)
    if info.node_size > 1:
        yield from _hierarchical_blocks(packet, packet.pack(block), info)
        return
    if info.world_size == 1:
        yield info.rank, block
        return
    own = packet.pack(block)
    del block  # the caller's tensors may be freed: the own block is yielded from the buffer
    buffers = (own, torch.empty_like(own))
    views = [packet.unpack(buffer) for buffer in buffers]  # once per call, not once per hop
    shift = _Shift.along_ranks(info)
    pending = shift.start(buffers[0], buffers[1])
    yield info.rank, views[0]
    for step in range(1, info.world_size):
        incoming = step % 2
        pending.wait()
        if step < info.world_size - 1:  # into the buffer of the block the caller is done with
            pending = shift.start(buffers[incoming], buffers[1 - incoming])
        yield (info.rank - step) % info.world_size, views[incoming]


def _hierarchical_blocks(packet: "_Packet", buffer: torch.Tensor, info: GroupInfo):
    """``ring_blocks`` over nodes: blocks gathered in the node, node blocks (the buffers of the node's ranks,
    stacked) passed between nodes, and yielded rank by rank in the flat ring's order."""
    size, local = info.node_size, info.rank % info.node_size
    first_rank = info.rank - local
    own = _gather_in_node(buffer, info)
    shift = _Shift.along_nodes(info)
    incoming = shift.start(own, torch.empty_like(own))
    for index in range(local, -1, -1):  # this node's blocks from this rank's down
        yield first_rank + index, packet.unpack(own[index])
    for step in range(1, info.nodes):
        current = incoming.wait()
        incoming = shift.start(current, torch.empty_like(current)) if step < info.nodes - 1 else None
        current_first = (first_rank - step * size) % info.world_size
        for index in range(size - 1, -1, -1):
            yield current_first + index, packet.unpack(current[index])
    for index in range(size - 1, local, -1):  # its higher blocks close the flat ring's order
        yield first_rank + index, packet.unpack(own[index])


def _gather_in_node(tensor: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """``[node_size, *tensor.shape]``: the node's ranks' tensors in rank order."""
    gathered = tensor.new_empty((info.node_size, *tensor.shape))
    dist.all_gather(list(gathered.unbind(0)), tensor, group=info.node_group)
    return gathered


@dataclass(frozen=True)
class _Packet:
    """How the tensors of a block lie in one flat buffer, bit for bit: each tensor's bytes, viewed as the
    buffer's dtype (the smallest element of the block). Wider elements come first and the buffer is padded
    to a whole number of the widest, so that every view back to a tensor's dtype is aligned."""

    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    order: tuple[int, ...]  # the tensors' indices, by decreasing element size
    dtype: torch.dtype  # the buffer's
    padding: int  # elements of the buffer after the last tensor

    @classmethod
    def of(cls, block: tuple[torch.Tensor, ...]) -> "_Packet":
        sizes = [t.element_size() for t in block]
        order = tuple(sorted(range(len(block)), key=lambda i: -sizes[i]))
        narrowest = block[order[-1]]
        total = sum(t.numel() * size for t, size in zip(block, sizes))
        padding = -total % max(sizes) // narrowest.element_size()
        return cls(tuple(t.shape for t in block), tuple(t.dtype for t in block), order, narrowest.dtype, padding)

    def pack(self, block: tuple[torch.Tensor, ...]) -> torch.Tensor:
        parts = [block[i].reshape(-1).view(self.dtype) for i in self.order]
        return torch.cat(parts + [parts[0].new_zeros(self.padding)])

    def unpack(self, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lengths = [self.shapes[i].numel() * self.dtypes[i].itemsize // self.dtype.itemsize for i in self.order]
        parts = buffer.split(lengths + [self.padding])
        block = [None] * len(self.order)
        for i, part in zip(self.order, parts):
            block[i] = part.view(self.dtypes[i]).view(self.shapes[i])
        return tuple(block)


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

    def start(self, outgoing: torch.Tensor, buffer: torch.Tensor) -> "_PendingShift":
        """Start sending ``outgoing`` and receiving the same-shaped ``buffer``."""
        operations = [dist.P2POp(dist.isend, outgoing, group=self.info.group, group_peer=self.next_rank),
                      dist.P2POp(dist.irecv, buffer, group=self.info.group, group_peer=self.previous_rank)]
        return _PendingShift(buffer, dist.batch_isend_irecv(operations))


class _PendingShift:
    """The receive buffer of one ring step and the work handles that fill it."""

    def __init__(self, buffer: torch.Tensor, works: list[dist.Work]):
        self.buffer = buffer
        self.works = works

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.buffer
