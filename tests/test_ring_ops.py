"""Operations per ring hop (issue 21: on GPUs each is a kernel launch, and at hundreds of ranks the
launches bound the loss) and host synchronisations inside a loss call, counted with the profiler
(``tuneclip_ds.losses.profile``) on gloo ranks."""

import pytest
import torch

import tuneclip_ds.losses.profile as profile
from tuneclip_ds.distributed import spawn_ranks
from tuneclip_ds.plan.loss_time import OPS_16BIT_EXTRA, OPS_PER_HOP
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
# What they are now with float32 features (bfloat16: see bfloat16_extra); without labels, the planner's table.
AFTER = {
    **{(name, False): ops[:2] for name, ops in OPS_PER_HOP.items()},
    ("infonce", True): (22, 25), ("siglip", True): (15, 13), ("gcl", True): (18, 24), ("hgcl", True): (20, 32),
}
HOST_SYNC = "aten::_local_scalar_dense"  # what .item(), int(), bool() of a tensor call


def bfloat16_extra(name: str, labels: bool) -> tuple[int, int]:
    """The operations per hop that bfloat16 features add (the planner's ``OPS_16BIT_EXTRA``); labelled InfoNCE's
    second pass, a sum over one direction, adds SigLIP's."""
    forward, backward = OPS_16BIT_EXTRA[name]
    if (name, labels) == ("infonce", True):
        return forward + OPS_16BIT_EXTRA["siglip"][0], backward + OPS_16BIT_EXTRA["siglip"][1]
    return forward, backward


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
    extra = bfloat16_extra(name, labels) if dtype == torch.bfloat16 else (0, 0)
    assert counts == tuple(map(sum, zip(AFTER[name, labels], extra))), (
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


PRODUCTS = {"aten::mm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addmm", "aten::addmm_", "aten::matmul"}
DIM = 24  # the features' dimension; no tile (local batch 8, tile size 4) has as many rows, columns or elements


def _feature_products(rank, world_size, group, name, labels, dtype):
    """The dtypes of the tensors that each product of features (an operand with ``DIM`` in its last two dimensions)
    of a forward and a backward of the loss receives."""
    from tuneclip_ds.losses import build_loss

    loss_fn = build_loss(name, group=group, tile_size=4, same_label_positives=labels)
    inputs = profile._loss_inputs(rank, 8, DIM, dtype, labels)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as call:
        profile._loss(loss_fn, inputs).backward()
    return [{dtype for dtype, shape in zip(event.input_dtypes, event.input_shapes) if shape}
            for event in call.events()
            if event.name in PRODUCTS and any(DIM in shape[-2:] for shape in event.input_shapes)]


@pytest.mark.parametrize("name,labels", list(BEFORE))
def test_the_tiles_products_run_in_the_features_dtype(pool, name, labels):
    """16-bit features: 16-bit products, as open_clip's logits under autocast (everything element-wise stays
    float32); float32 features: float32 products. The same products for each, on 2 ranks."""
    dtypes = {torch.float32: "float", torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}
    products = {dtype: run_on_ranks(pool, 2, _feature_products, name, labels, dtype)[0] for dtype in dtypes}
    assert len(products[torch.float32]) >= 4  # a similarity and a gradient product in forward and backward
    for dtype, name_in_profile in dtypes.items():
        assert products[dtype] == [{name_in_profile}] * len(products[torch.float32]), dtype


def _rank_and_sum(rank, world_size, group, offset):
    total = torch.tensor([rank + offset])
    torch.distributed.all_reduce(total, group=group)
    return rank, world_size, total.item()


def _fails_on_rank_1(rank, world_size, group):
    if rank == 1:
        raise ValueError("rank 1 gives up")
    return rank


def test_spawned_ranks_form_a_group_and_raise_a_ranks_error():
    """What ``ops_per_hop`` and ``plan.measure --ring-ops`` run their ranks with."""
    assert spawn_ranks(3, _rank_and_sum, 10) == [(rank, 3, 33) for rank in range(3)]
    with pytest.raises(Exception, match="ValueError: rank 1 gives up"):
        spawn_ranks(2, _fails_on_rank_1)
