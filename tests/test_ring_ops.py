"""Operations per ring hop (issue 21: on GPUs each is a kernel launch, and at hundreds of ranks the
launches bound the loss) and host synchronisations inside a loss call, counted with the profiler
(``tuneclip_ds.losses.profile``) on gloo ranks."""

import pytest
import torch

import tuneclip_ds.losses.profile as profile
from tuneclip_ds.plan.loss_time import OPS_PER_HOP
from gloo_pool import GlooPool
from test_losses import run_on_ranks

# (forward, backward) operations per hop at commit ee8d65a (one send/receive pair per tensor, per-tile
# autograd, one direction at a time), the same for float32 and bfloat16 features; key: (loss, labels).
BEFORE = {
    ("infonce", False): (34, 89), ("infonce", True): (78, 131),
    ("siglip", False): (47, 39), ("siglip", True): (59, 51),
    ("gcl", False): (40, 101), ("gcl", True): (59, 118),
    ("hgcl", False): (46, 121), ("hgcl", True): (65, 138),
}
# What they are now with float32 features (bfloat16: one more, the visiting block's cast, each way;
# labelled InfoNCE: two more, it runs two passes of features); without labels, the planner's table.
AFTER = {
    **{(name, False): ops[:2] for name, ops in OPS_PER_HOP.items()},
    ("infonce", True): (22, 25), ("siglip", True): (15, 13), ("gcl", True): (18, 24), ("hgcl", True): (20, 32),
}
HOST_SYNC = "aten::_local_scalar_dense"  # what .item(), int(), bool() of a tensor call


@pytest.fixture(scope="module")
def pool():
    gloo_pool = GlooPool(3)
    yield gloo_pool
    gloo_pool.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,labels", list(BEFORE))
def test_each_hop_takes_at_least_three_times_fewer_operations(pool, name, labels, dtype):
    counts = profile.ops_per_hop(name, dtype=dtype, labels=labels,
                                 run=lambda world_size, worker, *args: run_on_ranks(pool, world_size, worker, *args))
    cast = int(dtype != torch.float32) * (2 if (name, labels) == ("infonce", True) else 1)
    assert counts == (AFTER[name, labels][0] + cast, AFTER[name, labels][1] + cast), (
        "without labels, update OPS_PER_HOP in tuneclip_ds/plan/loss_time.py")
    for now, before in zip(counts, BEFORE[name, labels]):
        assert 3 * now <= before


def _host_syncs_worker(rank, world_size, group, name, labels, reserve=True):
    """The host synchronisations and all_reduces of a forward and of a backward of the loss (after a
    warm-up call); GCL/HGCL with the estimator table reserved for the corpus, as the trainer does, or not."""
    from tuneclip_ds.losses import build_loss

    loss_fn = build_loss(name, group=group, tile_size=4, same_label_positives=labels)
    if reserve and hasattr(loss_fn, "estimators"):
        loss_fn.estimators.reserve(8 * world_size, loss_fn.group_info(), torch.device("cpu"))
    inputs = profile._loss_inputs(rank, 8, 16, torch.float32, labels)  # ids in [0, 8 W)
    profile._loss(loss_fn, inputs).backward()
    with profile._profile() as forward:
        loss = profile._loss(loss_fn, inputs)
    with profile._profile() as backward:
        loss.backward()
    return [[event.name for event in p.events() if event.name in (HOST_SYNC, "c10d::allreduce_")]
            for p in (forward, backward)]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name,labels", list(BEFORE))
def test_a_loss_call_does_not_wait_for_the_host(pool, name, labels, world_size):
    """Several tiles per block. The local batch sizes were checked in the warm-up call: the only all_reduces
    left in InfoNCE and SigLIP are the loss value's (and the smoothing's, not used here)."""
    for forward, backward in run_on_ranks(pool, world_size, _host_syncs_worker, name, labels):
        assert HOST_SYNC not in forward and backward == []
        if name in ("infonce", "siglip"):
            assert forward == ["c10d::allreduce_"] * (world_size > 1)


@pytest.mark.parametrize("name", ["gcl", "hgcl"])
def test_an_unreserved_estimator_table_reads_the_largest_id_to_grow(pool, name):
    for forward, backward in run_on_ranks(pool, 2, _host_syncs_worker, name, False, False):
        assert forward.count(HOST_SYNC) == 1 and backward == []
