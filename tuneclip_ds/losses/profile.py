"""How many operations each hop of the ring adds to a loss call, counted with the torch profiler.

On a GPU every operation is a kernel launch of several microseconds, so at hundreds of ranks a ring
loss is bound by the number of operations per hop rather than by arithmetic. ``ops_per_hop`` counts
them on the CPU: one loss forward and one backward on ``W`` and ``W + 1`` gloo ranks, profiled on
rank 0 after a warm-up call, and the difference of the counts (everything outside the ring is the
same for both). Counted: every ``aten::`` or ``c10d::`` (send, receive, collectives) operation that
the call makes at the top level of the dispatch, i.e. not from inside another one; the autograd
engine's bookkeeping is not an operation, nor what gloo's own threads do for a collective. The
local batch stays within one tile, so a hop is one tile per direction.

    python -m tuneclip_ds.losses.profile infonce siglip gcl hgcl
"""

import argparse
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tuneclip_ds.distributed import spawn_ranks

LOSS_NAMES = ("infonce", "siglip", "gcl", "hgcl")
_DISPATCHED = ("aten::", "c10d::")
CALL = "tuneclip_ds.loss_call"  # the profiled range of a call


class OpsPerHop(NamedTuple):
    forward: float
    backward: float


# run(world_size, worker, *args) -> [worker(rank, world_size, group, *args) for each rank]
RunOnRanks = Callable[..., list]


def ops_per_hop(
    loss_name: str,
    world_size_pair: tuple[int, int] = (2, 3),
    dtype: torch.dtype = torch.float32,
    labels: bool = False,
    local_batch: int = 8,
    dim: int = 16,
    run: RunOnRanks | None = None,
) -> OpsPerHop:
    """Operations that one more hop of the ring adds to a forward and a backward of ``loss_name``
    (features of ``dtype``; ``labels``: built with ``same_label_positives``), per hop between the two
    world sizes of ``world_size_pair``. ``run`` runs a worker on the ranks of a gloo group (see
    ``RunOnRanks``; tests pass their process pool); by default fresh processes are spawned
    (``distributed.spawn_ranks``)."""
    if loss_name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {loss_name!r}; one of {', '.join(LOSS_NAMES)}")
    smaller, larger = world_size_pair
    if not 1 <= smaller < larger:
        raise ValueError(f"world_size_pair needs two world sizes, the first smaller: got {world_size_pair}")
    run = run or spawn_ranks
    counts = [run(world_size, count_loss_ops, loss_name, dtype, labels, local_batch, dim)[0]
              for world_size in world_size_pair]
    hops = larger - smaller
    return OpsPerHop(*((big - small) / hops for small, big in zip(*counts)))


def count_loss_ops(rank: int, world_size: int, group, loss_name: str, dtype: torch.dtype, labels: bool,
                   local_batch: int, dim: int) -> OpsPerHop:
    """On every rank of ``group`` (collective): the operations of one forward and one backward of the
    loss on this rank, after a warm-up call."""
    from tuneclip_ds.losses import build_loss

    loss_fn = build_loss(loss_name, group=group, tile_size=max(local_batch, 1), same_label_positives=labels)
    inputs = _loss_inputs(rank, local_batch, dim, dtype, labels)
    _loss(loss_fn, inputs).backward()  # warm-up: lazily made groups, estimator tables, batch size checks
    with _profile() as forward, torch.profiler.record_function(CALL):
        loss = _loss(loss_fn, inputs)
    with _profile() as backward, torch.profiler.record_function(CALL):
        loss.backward()
    return OpsPerHop(*(len(dispatched_ops(profile.events())) for profile in (forward, backward)))


def _loss_inputs(rank: int, local_batch: int, dim: int, dtype: torch.dtype, labels: bool) -> dict:
    generator = torch.Generator().manual_seed(rank)
    image, text = (F.normalize(torch.randn(local_batch, dim, generator=generator), dim=-1) for _ in range(2))
    inputs = dict(
        image=image.to(dtype).requires_grad_(),
        text=text.to(dtype).requires_grad_(),
        scale=torch.tensor(10.0, dtype=dtype, requires_grad=True),
        bias=torch.tensor(-5.0, dtype=dtype, requires_grad=True),
        sample_ids=torch.arange(local_batch) + rank * local_batch,
    )
    if labels:
        inputs["labels"] = inputs["sample_ids"] % 3
    return inputs


def _loss(loss_fn, inputs: dict) -> torch.Tensor:
    return loss_fn(inputs["image"], inputs["text"], inputs["scale"], inputs["bias"], sample_ids=inputs["sample_ids"],
                   labels=inputs.get("labels"))


def _profile():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def dispatched_ops(events, call: str = CALL) -> list[str]:
    """The names of the operations that the ``record_function`` range named ``call`` dispatched at the top
    level (no operation among their callers): those on its thread, and those that autograd's engine ran for
    it (on GPUs backward runs on a thread of its own). Gloo runs parts of a collective on threads of its
    own: not counted (NCCL has none)."""
    marker = next(event for event in events if event.name == call)
    return [event.name for event in events
            if event.name.startswith(_DISPATCHED) and _called_at_top_level(event, marker)]


def _called_at_top_level(event, marker) -> bool:
    callers = []
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(_DISPATCHED):
            return False
        callers.append(parent)
        parent = parent.cpu_parent
    if marker in callers:
        return True
    by_autograd = bool(callers) and callers[-1].name.startswith("autograd::engine::evaluate_function")
    return by_autograd and marker.time_range.start <= event.time_range.start <= marker.time_range.end


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("losses", nargs="*", help=f"of {', '.join(LOSS_NAMES)} (default: all)")
    options = parser.parse_args(argv)
    print(f"{'loss':8} {'features':9} {'labels':6} {'forward':>8} {'backward':>8}")
    for name in options.losses or LOSS_NAMES:
        for dtype in (torch.float32, torch.bfloat16):
            for labels in (False, True):
                counts = ops_per_hop(name, dtype=dtype, labels=labels)
                print(f"{name:8} {str(dtype).removeprefix('torch.'):9} {str(labels):6} "
                      f"{counts.forward:8g} {counts.backward:8g}")


if __name__ == "__main__":
    main()
